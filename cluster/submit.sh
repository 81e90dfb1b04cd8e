#!/usr/bin/env bash
# Submit an omni-ray training job to a running Ray cluster (the README command, with the upload rules applied).
#   cluster/submit.sh [--address http://HEAD:8265] CONFIG [key=value ...]
# RAY_ADDRESS / --address: the head's dashboard address. Clusters with token auth (Ray >= 2.60): export the token
# as RAY_AUTH_TOKEN, or keep it in ~/.ray/auth_token on the submitting machine.
set -euo pipefail
cd "$(dirname "$0")/.."
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
if [ "${1:-}" = "--address" ]; then address=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--address URL] CONFIG [key=value ...]" >&2; exit 2; }
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
  -- omni-ray train "$@"
