#!/usr/bin/env bash
# The GPU check (issue #20): on a fresh machine with an NVIDIA GPU, its driver and Python 3.11,
#   bash benchmarks/gpu_check.sh
# 1. installs what it needs: the CPU venv that builds the models (make models; skipped when
#    $REPO already holds them) and .venv-gpu with the serve-gpu extra (onnxruntime-gpu 1.26.0,
#    CUDA 12 and cuDNN 9 from pip wheels) plus pytest;
# 2. writes the fp16 variants of the demo models (export build --skip-existing --precision fp16);
# 3. runs the GPU tests (CUDA vs CPU parity, the resident decoder loop, fp16 on CUDA);
# 4. runs benchmarks/gpu.py: parity figures, fp16 drift, ViT against ONNX Runtime CUDA at its
#    best batch, NMT served against offline, short requests among long ones (#17 5c)
#    → benchmarks/results/<date>-gpu.{json,md}.
# Budget: ~5 minutes when the demo models exist (make models trains them once, a few minutes on
# many cores); every step stops the script on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=${REPO:-model_repository}
nvidia-smi -L
make models REPO="$REPO"
# the fp16 variants written from the fp32 versions just built (`export export` would refuse them:
# it writes the fp32 version too, and that exists); those that exist are left alone
.venv/bin/python -m export build fashion-vit dates-transformer --repository "$REPO" --skip-existing --precision fp16
# #17 5c's model: random weights that never emit EOS, so long requests decode 100 tokens
[ -f build/long-model/dates-transformer/1/manifest.json ] || .venv/bin/python -m benchmarks.decoding --repository "$REPO" --write-long-model build/long-model
make .venv-gpu/.installed
.venv-gpu/bin/python -m pip install --quiet "pytest>=8" "requests>=2.31" "psutil>=5.9"
export RAY_USAGE_STATS_ENABLED=0 RAY_worker_niceness=0
# the tests that need CUDA (marked gpu), and the resident loop's parity tests on the GPU build
GPU_TEST_REPOSITORY="$REPO" .venv-gpu/bin/python -m pytest -q -p no:cacheprovider -m gpu tests/service/inference/test_gpu.py || status=$?
.venv-gpu/bin/python -m benchmarks.gpu --repository "$REPO" --long-model build/long-model
exit "${status:-0}"
