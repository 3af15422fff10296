#!/usr/bin/env bash
# Issue 21's GPU measurements (the lent H200), in two parts that each fit one 10-minute call:
#   bash benchmarks/run_gpu_train.sh speed    # HF baselines, ours_ref / ours / ours_compiled for full,
#                                             # frozen_vision, lora, and the same-numbers checks
#   bash benchmarks/run_gpu_train.sh ratio    # hf_bf16 vs ours_compiled in alternating rounds (the goal's
#                                             # ratio), rows for full / frozen_vision / lora, the checks
#   bash benchmarks/run_gpu_train.sh memory   # the libero-2b cell under a 48 GB cap (an L40S), kernel mix
#   bash benchmarks/run_gpu_train.sh trainer  # the trainer's own loop on the libero-2b settings vs the bench step
#                                             (needs PyAV, which the lent GPU machine lacks: carry its wheel)
# JSON and logs go to $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case "${1:-speed}" in
  speed)   # every row side by side in one process: HF baselines, ours_ref, ours, ours_compiled; the checks
    timeout 570 python3 benchmarks/bench_train.py --warmup 2 --iters 6 --compile --check --out "$OUT/speed.json" \
      2>&1 | tee "$OUT/speed.log"
    ;;
  ratio)   # the goal's ratio: plain HF bf16 and our compiled step resident together, alternating rounds
    timeout 570 python3 benchmarks/bench_train.py --warmup 2 --iters 5 --finetune full frozen_vision lora \
      --rows hf_bf16 --compile --alternate 5 --check --out "$OUT/ratio.json" 2>&1 | tee "$OUT/ratio.log"
    ;;
  memory)  # the libero-2b cell under a 48 GB cap: the trainer's plan compiled and eager, fixed variants
    timeout 570 python3 benchmarks/bench_train.py --warmup 2 --iters 4 --rows none --memory-cell --cap-gb 48 --profile \
      --variants ${VARIANTS:-auto auto-eager ckpt-32-bfloat16-bfloat16 ckpt-8-float32-float32 nockpt-8-bfloat16-bfloat16} \
      --out "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log"
    ;;
  trainer) # wmvla train's loop (data, processor, EMA, logs) at 2B shapes, then bench_train's step, one process
    timeout 570 python3 benchmarks/bench_trainer.py --steps ${STEPS:-40} --log-every 5 --out "$OUT/trainer.json" \
      2>&1 | tee "$OUT/trainer.log"
    ;;
esac
