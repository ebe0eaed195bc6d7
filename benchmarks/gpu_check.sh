#!/usr/bin/env bash
# The one GPU check a session with a lent H100/H200 runs (see shared/DEVICE.md), in under ~7 minutes:
#   1. GPU, driver, torch and CUDA versions;  2. the `gpu`-marked tests;
#   3. sd15-random 512x512, 30 steps, CFG 7.5, batch 1, fp16: diffusers vs sdtrt torch (eager) vs torch-graph,
#      in one process; JSON and a chart under $OUT; the table is printed last.
# Set COMPILE=1 to add diffusers + torch.compile(max-autotune) (compiling takes minutes).
# Prepare once on the CPU machine (pure-Python packages the GPU machine lacks; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers importlib_metadata polygraphy onnx-graphsurgeon
# then run it through the device tool with carry [".whl"]:  bash benchmarks/gpu_check.sh
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
echo "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
echo "== gpu tests"
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
backends=diffusers,torch,torch-graph
if [ "${COMPILE:-0}" = 1 ]; then backends=$backends,diffusers-compile; fi
echo "== benchmark ($backends)"
timeout 300 $PY -m sdtrt.cli bench sd15-random --backends "$backends" --size 512x512 --steps 30 --cfg 7.5 \
    --batch 1 --precision fp16 --runs 5 --warmup 2 \
    --json "$OUT/gpu_sd15-random_512_30steps.json" --plot "$OUT/gpu_sd15-random_512_30steps.png" \
    > "$OUT/bench_table.txt" 2> "$OUT/bench_log.txt"
status=$?
tail -5 "$OUT/bench_log.txt"
echo "== results (exit $status)"
cat "$OUT/bench_table.txt"
exit $status
