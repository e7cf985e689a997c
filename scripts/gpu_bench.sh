#!/usr/bin/env bash
# On a GPU machine: the first calls in fresh processes (the first-call section's MLP, conv stack and transformer:
# the model's first forward call and lsuv_init's, three processes each), the real-model benchmark (GPT-2 24 x 1024
# at 8 x 512 tokens, ResNet50 224² batch 64: forward, full LSUV, rescale only, step 1 alone), the step-1 candidates
# and the initializer, on every installed backend.
# Prints markdown tables; writes nothing into the repository.
#
# Usage: scripts/gpu_bench.sh [BACKEND ...]     (default: tensorflow jax torch)
# Uses $PYTHON (default python3), which needs keras, keras_lsuv and the backends to measure (and `lsuv` for the
# peer row); a backend whose package is missing is reported and skipped.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
backends=()
for b in "${@:-tensorflow jax torch}"; do
  for name in $b; do
    if KERAS_BACKEND=$name "$PYTHON" -c "import keras" >/dev/null 2>&1; then
      backends+=("$name")
    else
      echo "$name: not installed here, skipped"
    fi
  done
done
[ ${#backends[@]} -gt 0 ] || { echo "no backend installed"; exit 1; }
list=$(IFS=,; echo "${backends[*]}")
status=0
for b in "${backends[@]}"; do
  KERAS_BACKEND=$b "$PYTHON" scripts/which_device.py | tail -1 || status=1
done
"$PYTHON" benchmarks/run.py --gpu --backends "$list" || status=1
"$PYTHON" benchmarks/step1.py --backends "$list" || status=1
"$PYTHON" benchmarks/initializer.py --no-svd --backends "$list" || status=1
exit $status
