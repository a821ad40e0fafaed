#!/usr/bin/env bash
# One short check for a machine with an NVIDIA GPU (a few minutes): the `gpu`-marked tests, then
# R-CNN feature extraction on the GPU for AlexNet at 227 px and VGG16 at 224 px, float32 and bf16
# autocast with channels-last, printing seconds per image for 2000 proposals (paper: 13 s/image on
# a GPU, 53 s/image on a CPU); then the input pipelines against the model step on the GPU (issue
# 19's goal: input examples/s ÷ model examples/s >= 1.0), SSL's FixMatch views and R-CNN's
# fine-tuning windows, built on the host as the training loops build them.
#
#   benchmarks/gpu_check.sh            # uses ./.venv when present, else the python on PATH
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== gpu-marked tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests

echo "== feature extraction on the GPU"
for model in rcnn_alexnet rcnn_vgg16; do
  "$PY" benchmarks/bench_features.py --device cuda --model "$model" --crops 2048 --rows 0
  "$PY" benchmarks/bench_features.py --device cuda --model "$model" --crops 2048 --rows 0 \
    --amp bf16 --channels-last
done

echo "== input pipelines vs the model step on the GPU (goal: input/model >= 1.0)"
"$PY" benchmarks/bench_ssl_input.py --setups cpu,paper --device cuda --threads 4 --rounds 5
"$PY" benchmarks/bench_rcnn_input.py --device cuda --images 32 --batches 10 --small-steps 20 \
  --alexnet-steps 20
