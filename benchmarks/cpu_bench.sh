#!/usr/bin/env bash
# CPU benchmark: sd15-random (real SD 1.5 architecture, random weights) at 256x256, 4 steps, fp32:
# diffusers' pipeline against sdtrt on ONNX Runtime and on PyTorch, side by side in one process.
# Target (benchmarks/RESULTS.md): onnxruntime end-to-end <= 0.7x the time of diffusers. About 10 minutes on
# a 2-core machine, most of it the one-off fp32 ONNX export (not timed).
#   usage: bash benchmarks/cpu_bench.sh [OUTDIR]     (needs `make install` first)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
stamp=$(date -u +%Y-%m-%d)
mkdir -p "$out"
SDTRT=${SDTRT:-.venv/bin/sdtrt}
"$SDTRT" bench sd15-random --backends diffusers,onnxruntime,torch --size 256x256 --steps 4 --cfg 7.5 \
    --batch 1 --precision fp32 --runs 3 --warmup 1 \
    --json "$out/cpu_sd15-random_256_4steps_$stamp.json" --plot "$out/cpu_sd15-random_256_4steps_$stamp.png"
