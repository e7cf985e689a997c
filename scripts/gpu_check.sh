#!/usr/bin/env bash
# Runs the test suite and the demo on each backend on a GPU machine, and prints which device each backend used.
#
# Usage: scripts/gpu_check.sh [BACKEND ...]     (default: tensorflow jax torch)
# Uses $PYTHON (default python3), which needs keras, keras_lsuv's test requirements and the backends to check;
# a backend whose package is missing is reported and skipped. Exits non-zero if any check of an installed
# backend fails or if a backend computed on the CPU.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(tensorflow jax torch)
status=0
for b in "${backends[@]}"; do
  echo "=== KERAS_BACKEND=$b"
  if ! KERAS_BACKEND=$b "$PYTHON" -c "import keras" >/dev/null 2>&1; then
    echo "$b: not installed here, skipped"
    continue
  fi
  KERAS_BACKEND=$b "$PYTHON" scripts/which_device.py || status=1
  KERAS_BACKEND=$b "$PYTHON" -m pytest tests -q -p no:cacheprovider --ignore=tests/distribution || status=1
  KERAS_BACKEND=$b "$PYTHON" examples/demo.py || status=1
done
exit $status
