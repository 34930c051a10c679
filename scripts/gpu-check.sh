#!/bin/sh
# Checks modalign on a CUDA machine against the CPU, in under 5 minutes, with nothing fetched.
#
# Expects torch, torchvision and transformers installed. Installs this project with
# `pip install --no-deps --no-index`, plus any wheels in --wheels DIR (open_clip_torch, timm,
# ftfy, regex, clip-anytorch: small, no weights; random-weight models only). Prints one line per
# check and exits non-zero on a failure.
#
#   sh scripts/gpu-check.sh [--wheels DIR] [--no-install] [--device cuda|cpu] [--steps N]
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
wheels=""
install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    *) break ;;
  esac
done
PY=${PYTHON:-python3}
if [ "$install" = 1 ]; then

  if [ -n "$wheels" ]; then
    $PY -m pip install -q --no-deps --no-index "$wheels"/*.whl
  fi
  $PY -m pip install -q --no-deps --no-index --no-build-isolation -e "$here"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec $PY "$here/scripts/gpu_check.py" "$@"
