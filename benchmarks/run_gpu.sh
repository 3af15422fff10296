#!/usr/bin/env bash
# Runs a benchmark on the lent GPU machine (no PyPI there): installs the few pure-Python / binary wheels
# the GPU image lacks from ./.wheels (fetch them here first with:
#   pip download -d .wheels --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 tyro av
# ), then runs the named benchmark with its arguments, logging to $OUT (or /tmp).
#   bash benchmarks/run_gpu.sh bench_train.py
#   bash benchmarks/run_gpu.sh bench_latents.py --device cuda --model vitl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
if [ -d .wheels ]; then python3 -m pip install -q --no-index --find-links .wheels tyro av 2>&1 | tail -1 || true; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
name=$1; shift
python3 "benchmarks/$name" "$@" 2>&1 | tee "$OUT/${name%.py}.log"
