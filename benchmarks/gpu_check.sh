#!/usr/bin/env bash
# GPU check: sdtrt's `gpu` tests and its side-by-side benchmarks on one CUDA GPU, in under ~10 minutes on an
# H100/H200 (each step has its own timeout; a step that fails or times out is reported and the rest still run).
# The step-caching rows 5 and 6 are estimated at 2-4 minutes together (not yet timed on a GPU).
#
# Needs: a CUDA machine whose python3 has torch (CUDA build), transformers, tokenizers, safetensors, numpy and
# pillow. The pure-Python packages such a machine often lacks travel as wheels in .whl/ (git-ignored); download
# them once on a machine with network access, pinned to the versions sdtrt is tested with:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       diffusers==0.42.1 importlib_metadata==10.2.0 polygraphy==0.53.6 onnx-graphsurgeon==0.6.1
# When .whl/ is there, they and sdtrt itself are installed into .site/ (no network, no dependencies resolved).
#   usage: bash benchmarks/gpu_check.sh          (results under $OUT, default out/gpu_check)
#   COMPILE=1 adds diffusers + torch.compile(max-autotune) to the SD 1.5 row (compiling takes minutes: that row's
#   limit goes from 110 s to 420 s, and the whole script past 9 minutes).
#
# Every benchmark runs its backends interleaved (A B C, B C A, ...) in one process, all open at once; SDXL's fp16
# weights are ~7 GB per copy (diffusers, torch and torch-graph each hold one), well inside an 80 GB card.
# Rows, all seed 0, euler_a, batch 1, fp16, diffusers vs sdtrt torch (eager) vs torch-graph (whole step as one
# CUDA graph):
#   1. sd15-random 512x512, 30 steps, CFG 7.5        (SD 1.5 architecture, seeded random weights)
#   2. sdxl-random 1024x1024, 30 steps, CFG 5        (SDXL base architecture, seeded random weights)
#   3. sdxl-random 512x512, 1 step, CFG 0            (the SDXL-Turbo setting; Turbo has SDXL's architecture)
#   4. sd15-random 512x512, 30 steps, CFG 7.5 + one ControlNet (a seeded random SD 1.5-architecture ControlNet
#      made by controlnet_from_unet, saved as a diffusers folder and loaded back, random-stroke hint): torch and
#      torch-graph, each with no control and with the ControlNet (benchmarks/controlnet_gpu.py; no diffusers baseline)
#   5. sd15-random 512x512, 30 steps, CFG 7.5, cache interval 3 vs 1 (step caching): torch and torch-graph (the
#      full and the shallow step, two CUDA graphs), each cached and uncached (benchmarks/step_cache_gpu.py)
#   6. sdxl-random 1024x1024, 30 steps, CFG 5, cache interval 3 vs 1, the same way
#      Where tensorrt is installed, SD15_ENGINES / SDXL_ENGINES naming engine folders of those presets (built
#      beforehand with `sdtrt export` + `sdtrt build`) add TensorRT rows to 5 / 6.
#   7. host overhead: the denoising loop with a null UNet, CPU / CUDA eager / CUDA graph, every sampler
# Prints: GPU, driver, torch and CUDA versions; the gpu tests' summary; each benchmark's table (median and p90
# end-to-end, speed-up against diffusers, per-stage times, it/s, loop overhead, memory); the host-overhead
# table (microseconds per step). Writes under $OUT: gpu_tests.txt, tables.txt (everything printed after the
# versions), bench_log.txt (progress and warnings), and one JSON per row (charts: benchmarks.report.plot).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target .site . &&
    export PYTHONPATH=$PWD/.site || exit 1
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=0
tables="$OUT/tables.txt"
: > "$tables"
: > "$OUT/bench_log.txt"

echo "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

# step TITLE: a heading, printed now as progress and kept in tables.txt for the summary at the end
step() { echo "== $1"; echo "== $1" >> "$tables"; }

step "gpu tests (limit 90s)"
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu_tests.txt" 2>&1
status=$?
tail -15 "$OUT/gpu_tests.txt" >> "$tables"
[ $status = 0 ] || { echo "gpu tests failed (exit $status; 124 = timed out)" >> "$tables"; failed=1; }

# bench SECONDS NAME SOURCE ARGS...: one side-by-side benchmark, its table appended to tables.txt
bench() {
    local limit=$1 name=$2 source=$3
    shift 3
    step "$name (limit ${limit}s)"
    timeout "$limit" $PY -m sdtrt.cli bench "$source" --batch 1 --precision fp16 --scheduler euler_a \
        --json "$OUT/$name.json" "$@" > "$OUT/table.tmp" 2>> "$OUT/bench_log.txt"
    local code=$?
    cat "$OUT/table.tmp" >> "$tables"
    rm -f "$OUT/table.tmp"
    if [ $code != 0 ]; then
        echo "$name failed (exit $code; 124 = timed out); last log lines:" >> "$tables"
        tail -5 "$OUT/bench_log.txt" >> "$tables"
        failed=1
    fi
}

backends=diffusers,torch,torch-graph
sd15_backends=$backends sd15_limit=110
if [ "${COMPILE:-0}" = 1 ]; then sd15_backends=$backends,diffusers-compile sd15_limit=420; fi
bench "$sd15_limit" gpu_sd15-random_512_30steps sd15-random --backends "$sd15_backends" --size 512x512 --steps 30 --cfg 7.5 \
    --runs 5 --warmup 2
bench 200 gpu_sdxl-random_1024_30steps sdxl-random --backends "$backends" --size 1024x1024 --steps 30 --cfg 5 \
    --runs 3 --warmup 1
bench 100 gpu_sdxl-random_512_1step_turbo sdxl-random --backends "$backends" --size 512x512 --steps 1 --cfg 0 \
    --runs 5 --warmup 2

step "sd15-random + one ControlNet (limit 120s)"
timeout 120 $PY -m sdtrt.benchmarks.controlnet_gpu --preset sd15-random --size 512 --steps 30 --cfg 7.5 \
    --runs 3 --warmup 1 --precision fp16 --json "$OUT/gpu_sd15-random_512_30steps_controlnet.json" \
    >> "$tables" 2>> "$OUT/bench_log.txt" ||
    { echo "sd15-random + one ControlNet failed (exit $?; 124 = timed out)" >> "$tables"; failed=1; }

# cache ROWNAME LIMIT PRESET SIZE CFG RUNS ENGINES: step caching, interval 3 against 1, its table in tables.txt
cache() {
    local name=$1 limit=$2 preset=$3 size=$4 cfg=$5 runs=$6 engines=$7
    step "$preset ${size}x${size} 30 steps, cache interval 3 vs 1 (limit ${limit}s)"
    timeout "$limit" $PY -m sdtrt.benchmarks.step_cache_gpu --preset "$preset" --size "$size" --steps 30 \
        --cfg "$cfg" --intervals 1,3 --runs "$runs" --warmup 1 --precision fp16 ${engines:+--engines "$engines"} \
        --json "$OUT/$name.json" >> "$tables" 2>> "$OUT/bench_log.txt" ||
        { echo "$name failed (exit $?; 124 = timed out)" >> "$tables"; failed=1; }
}
cache gpu_sd15-random_512_30steps_cache3 120 sd15-random 512 7.5 3 "${SD15_ENGINES:-}"
cache gpu_sdxl-random_1024_30steps_cache3 200 sdxl-random 1024 5 2 "${SDXL_ENGINES:-}"

step "host overhead (null UNet, limit 40s)"
timeout 40 $PY -m sdtrt.benchmarks.host_overhead --paths cpu,cuda,cuda-graph --steps 600 \
    --json "$OUT/host_overhead_cuda.json" >> "$tables" 2>> "$OUT/bench_log.txt" ||
    { echo "host overhead failed" >> "$tables"; failed=1; }

echo
echo "==== results (failed=$failed)"
cat "$tables"
exit $failed
