#!/usr/bin/env bash
# The GPU benchmarks in one go (model step, data pipeline, shard decode) for one GPU and its share
# of host cores. JSON results and a log per benchmark go to OUT_DIR.
# The GPU-only tests and the demo on the GPU come last: they check the CUDA paths that CI cannot.
#   tools/bench_gpu.sh OUT_DIR [THREADS [STEP ...]]
#   STEP: model_vitb16 pipeline train shards model_vitl14 gpu_tests demo
set -uo pipefail
out=${1:?usage: tools/bench_gpu.sh OUT_DIR [THREADS [STEP ...]]}
threads=${2:-$(nproc)}
shift $(( $# < 2 ? $# : 2 ))
steps=${*:-model_vitb16 pipeline train shards model_vitl14 gpu_tests demo}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

run_step() {  # run_step NAME SECONDS COMMAND...: a time limit each, and keep going on failure
  local name=$1 limit=$2; shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "=== $name exit $?"
  grep -v -E "^\s*$|Warning|warn\(" "$out/$name.log" | tail -n 22
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
run_step model_vitb16 200 "$python" tools/bench_model.py --arch ViT-B-16 --batch 32 --segments 8 --device cuda \
  --rounds 3 --steps 10 --warmup 3 --json "$out/model_vitb16.json"
run_step pipeline 300 "$python" tools/bench_pipeline.py --device cuda --batch-size 32 --threads "$threads" \
  --seconds 8 --work /tmp/bench_work --json "$out/pipeline.json"
run_step train 300 "$python" tools/bench_train.py --cfg configs/k400/vitb16.yaml --steps 5 --rounds 2 --warmup 3 \
  data.shards=/tmp/bench_work/shards/frames model.clip_weights=null data.global_batch_size=32 \
  data.max_device_batch_size=32 output_dir=/tmp/bench_train_run  # bench_train skips validation itself
run_step shards 100 "$python" tools/bench_shards.py --device gpu --threads "$threads" --clips-per-batch 32 \
  --seconds 2 --repeats 2 --videos /tmp/bench_work/videos/video000.mp4  # made by the pipeline step
run_step model_vitl14 200 "$python" tools/bench_model.py --arch ViT-L-14 --batch 32 --segments 8 --device cuda \
  --rounds 2 --steps 5 --warmup 3 --json "$out/model_vitl14.json"
run_step gpu_tests 300 "$python" -m pytest -p no:cacheprovider -k "cuda or gpu" tests/test_pipelines.py \
  tests/test_pipelines_augment.py  # RandAugment ops, augmentation and decode on DALI's mixed backend
demo=/tmp/bench_demo
run_step demo 300 bash -c "rm -rf $demo && '$python' tools/make_synthetic.py $demo/videos && for split in train val; do
  '$python' tools/make_shards.py $demo/videos/\$split.txt --root $demo/videos --out $demo/shards --split \$split \
    --short-side 0 --labels $demo/videos/labels.csv || exit 1; done &&
  '$python' launch.py --cfg configs/demo.yaml data.shards=$demo/shards output_dir=$demo/run &&
  '$python' launch.py --cfg configs/demo.yaml data.shards=$demo/shards output_dir=$demo/run --test \
    --weights $demo/run/best.pt --test-crops 3 --test-clips 2 &&
  '$python' tools/predict.py $demo/videos/videos/val/000000.mp4 --cfg configs/demo.yaml --weights $demo/run/best.pt \
    data.shards=$demo/shards --short-side 0"  # bf16 + compile training, fp32 eval, predict on CUDA
