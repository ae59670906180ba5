#!/usr/bin/env bash
# MeanFlow on a lent GPU in one go (a few minutes): the CUDA tests of MeanFlow, then the cost per
# step of MeanFlow (pixel, MFD) next to ECT on the CIFAR-10 DDPM++ preset at batch 128, bf16.
#   bash benchmarks/meanflow_gpu.sh [OUT_DIR]      # default OUT_DIR: $OUT, else runs/meanflow-gpu
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/meanflow-gpu}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
python3 -m pytest -q -m gpu -k meanflow tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log"
python3 benchmarks/meanflow_cost.py --device cuda --preset cifar10-ddpmpp --batch 128 --precision bf16 \
    --rounds 10 --warmup 3 2>&1 | tee "$out/cost-cifar10-bf16.txt"
