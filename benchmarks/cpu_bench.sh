#!/usr/bin/env bash
# CPU benchmark: sd15-random (real SD 1.5 architecture, random weights) at 256x256, 4 steps, fp32:
# diffusers' pipeline against sdtrt on ONNX Runtime and on PyTorch, side by side in one process.
# Target (benchmarks/RESULTS.md): onnxruntime end-to-end <= 0.7x the time of diffusers. About 10 minutes on
# a 2-core machine, most of it the one-off fp32 ONNX export (not timed).
#   usage: bash benchmarks/cpu_bench.sh [OUTDIR]     (needs `make install` first)
#
# With a second argument `step-cache`: step caching on ONNX Runtime instead, uncached against a full UNet step
# every 2, 3 and 5 steps (uniform), interleaved, on `shapes` (128x128, 20 steps) and sd15-random (256x256, 10
# steps). Targets (RESULTS.md, "Step caching"): at N=3 denoise <= 0.6x uncached on shapes, <= 0.55x on sd15-random.
# About 40 minutes on a 2-core machine.
#   usage: bash benchmarks/cpu_bench.sh OUTDIR step-cache
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
stamp=$(date -u +%Y-%m-%d)
mkdir -p "$out"
SDTRT=${SDTRT:-.venv/bin/sdtrt}
if [[ "${2:-}" == "step-cache" ]]; then
    "$SDTRT" bench shapes --backends onnxruntime --steps 20 --cache-interval 2,3,5 --runs 5 --warmup 1 \
        --device cpu --json "$out/cpu_step_cache_shapes_128_20steps_$stamp.json"
    "$SDTRT" bench sd15-random --backends onnxruntime --size 256x256 --steps 10 --cache-interval 2,3,5 \
        --runs 5 --warmup 1 --device cpu --json "$out/cpu_step_cache_sd15-random_256_10steps_$stamp.json"
    exit 0
fi
"$SDTRT" bench sd15-random --backends diffusers,onnxruntime,torch --size 256x256 --steps 4 --cfg 7.5 \
    --batch 1 --precision fp32 --runs 3 --warmup 1 \
    --json "$out/cpu_sd15-random_256_4steps_$stamp.json" --plot "$out/cpu_sd15-random_256_4steps_$stamp.png"
