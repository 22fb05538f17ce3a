#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA, PyTorch, timm and transformers installed: the CUDA tests,
# then `make bench`'s rows on the GPU in fp32 and under bf16 autocast for every model, and bf16 with torch.compile
# for ViT-S/16 (compiling every model and library takes minutes). Each benchmark mode is bounded by
# $MODE_TIMEOUT seconds (180), so that one slow mode cannot take the others' results with it.
#   bash benchmarks/gpu_check.sh [RESULTS_DIR] [extra throughput.py arguments, e.g. --repeats 5]
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
shift $(($# > 0 ? 1 : 0))
mkdir -p "$results"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$results/cuda-tests.log"
status=${PIPESTATUS[0]}
for mode in fp32 bf16 bf16-compile; do
  flags=$(case $mode in fp32) ;; bf16) echo --bf16 ;; bf16-compile) echo --bf16 --compile --models vit-s16 ;; esac)
  # shellcheck disable=SC2086  # the flags are words
  timeout "${MODE_TIMEOUT:-180}" python3 benchmarks/throughput.py --device cuda $flags "$@" \
    --json "$results/throughput-cuda-$mode.json" 2>&1 | tee "$results/throughput-cuda-$mode.log" || status=1
done
exit "$status"
