#!/usr/bin/env bash
# All GPU benchmarks in one go (model step, data pipeline, shard decode), for one GPU and its share
# of host cores. Results: JSON files and a log per benchmark under OUT_DIR.
#   tools/bench_gpu.sh OUT_DIR [THREADS]
set -uo pipefail
out=${1:?usage: tools/bench_gpu.sh OUT_DIR [THREADS]}
threads=${2:-$(nproc)}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v -E "^\s*$" | tail -n 25
  echo "=== $name exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
step model_vitb16 240 python3 tools/bench_model.py --arch ViT-B-16 --batch 32 --segments 8 --device cuda \
  --rounds 3 --steps 10 --warmup 3 --json "$out/model_vitb16.json"
step pipeline 240 python3 tools/bench_pipeline.py --device cuda --batch-size 32 --threads "$threads" --seconds 10 \
  --json "$out/pipeline.json"
step shards 150 python3 tools/bench_shards.py --device gpu --threads "$threads" --clips-per-batch 32 --seconds 2 --repeats 2
step model_vitl14 200 python3 tools/bench_model.py --arch ViT-L-14 --batch 32 --segments 8 --device cuda \
  --rounds 2 --steps 5 --warmup 3 --json "$out/model_vitl14.json"
