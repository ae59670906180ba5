#!/usr/bin/env bash
# All GPU checks in one go, for a lent GPU machine with a short budget (about 10 minutes).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT, else runs/gpu-check
#
# 1. `pytest -m gpu` (EDM -> features -> ECT+AYT in fp32 and bf16, seeded dropout on CUDA and
#    CPU/CUDA mask equality, compiled bf16 training, tangents, continuous CD in fp32/bf16, compiled
#    continuous, an EDM pickle as init, MeanFlow pixel/MFD in fp32/bf16/compiled), log in OUT_DIR/pytest-gpu.log;
# 2. the CUDA throughput benchmark: `Trainer.step()` per distance (tiny and CIFAR-10 DDPM++ presets,
#    fp32/bf16/compile; --phases reads the step's profiler ranges) and 1-step sampling, written to
#    OUT_DIR/BENCHMARKS.md section by section (a timeout keeps what was done); copy it back with
#    `python benchmarks/throughput.py --merge OUT_DIR/BENCHMARKS.md --write BENCHMARKS.md`.
#
# Uses the machine's own torch when it has one (no download). Packages that machine lacks and
# cannot download (torch-fidelity, lpips) are installed from ./.whl when present:
#   pip download --no-deps --only-binary=:all: -d .whl torch-fidelity==0.4.0 lpips==0.1.4
# (.whl/ is git-ignored: pass it to the device runner's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu-check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"

site=/tmp/ayt-site
if [ -d .whl ] && ! "$python" -c "import torch_fidelity, lpips" 2>/dev/null; then
    "$python" -m pip install --quiet --no-deps --target "$site" .whl/*.whl
fi
for pkg in safetensors yaml tqdm scipy sklearn matplotlib tensorboard hypothesis pytest; do
    "$python" -c "import $pkg" 2>/dev/null || echo "warning: $pkg is missing on this machine" >&2
done
export PYTHONPATH="$site:$PWD/src:${PYTHONPATH:-}"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/device.txt"

status=0
timeout 240 "$python" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log" || status=$?
timeout 330 "$python" benchmarks/throughput.py --device cuda --phases --compile --write "$out/BENCHMARKS.md" \
    2>&1 | tail -n 40 | tee "$out/throughput.log" || status=$?
exit "$status"
