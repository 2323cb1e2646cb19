#!/usr/bin/env bash
# One GPU, about 8 minutes: install, run the CUDA-marked tests, score Broden-geometry data on
# dask-cuda workers and compare every count with the CPU's, measure GPU extract and scoring
# speeds; one JSON (benchmarks/results/gpu_check.json) and one summary line.  Where there is
# no GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh [IMAGES]
set -uo pipefail
cd "$(dirname "$0")/.."
images="${1:-2000}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU on this machine (nvidia-smi finds none); nothing to check"
  exit 0
fi
nvidia-smi -L
if [ ! -x .venv/bin/python ]; then python3.11 -m venv .venv || exit 1; fi
. .venv/bin/activate
pip install -q torch==2.14.1 torchvision==0.29.1 && pip install -q -e '.[test,gpu]' \
  || { echo "gpu_check: installing failed"; exit 1; }
mkdir -p benchmarks/results
pytest -q -m cuda tests/test_cuda.py 2>&1 | tee benchmarks/results/gpu_check_tests.txt | tail -3
tests=${PIPESTATUS[0]}
python -m benchmarks.gpu_check --n "$images" --tests-status "$tests" || exit 1
exit "$tests"
