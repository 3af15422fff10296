#!/usr/bin/env bash
# LIBERO evaluation throughput on the lent GPU machine (docs/benchmarks.md, "LIBERO on the GPU machine").
# Needs the bundle (benchmarks/libero_gpu_bundle.sh here; carry .libero_gpu) and the GL loaders unpacked
# (for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig). Writes JSON and logs to $OUT (default /tmp/libero_gpu_out).
#
#   bash benchmarks/bench_libero_gpu.sh envs    # GL renderer; per-process costs; N workers raw (rendering every
#                                               # step / every 5th) and the engine with a no-op policy
#   bash benchmarks/bench_libero_gpu.sh eval    # random-weight libero-2b E2 checkpoint (Qwen3-VL-2B + V-JEPA 2
#                                               # ViT-L shapes) through `wmvla eval`, rollout memory pred and zero,
#                                               # then the policy's time per act round alone
# Settings (environment):
#   envs stage: PARTS ("glinfo profile libero envs"), ENV_WORKERS ("1 4 8 16"), RENDER_EVERY ("1 5"),
#               STEPS per process (300), ENVS_LIMIT_S (350)
#   eval stage: WORKERS (16), EPISODES per task (20), MODES ("pred zero"; MODE@WAIT runs the engine act-on-ready
#               with --batch-wait-s WAIT, MODE:gN in N lockstep groups, e.g. "pred pred@0 pred:g2"), TASKS and MAX_STEPS (default: all tasks,
#               the suite's max steps), SHAPES of the checkpoint (2b | tiny), EVAL_LIMIT_S per eval (200),
#               CKPT_LIMIT_S (200), ACT_LIMIT_S (120; 0 skips the policy-alone timing)
#   both: SUITE (libero_spatial), PYTHON (python3), RUN_WRAPPER (benchmarks/run_gpu_libero.sh; "env" runs with the
#         current install, e.g. to try the script on a CPU machine:
#         RUN_WRAPPER=env PYTHON=.venv/bin/python SHAPES=tiny WORKERS=2 EPISODES=2 TASKS=0 MAX_STEPS=10 ... eval)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/libero_gpu_out}
mkdir -p "$OUT"
R=${RUN_WRAPPER:-bash benchmarks/run_gpu_libero.sh}
PY=${PYTHON:-python3}
SUITE=${SUITE:-libero_spatial}
WORKERS=${WORKERS:-16}
stage=${1:?usage: bench_libero_gpu.sh envs|eval}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; echo "cpus: $(nproc)"; } \
  | tee "$OUT/${stage}_device.txt"

case $stage in
envs)
  parts=" ${PARTS:-glinfo profile libero envs} "
  if [[ $parts == *" glinfo "* ]]; then
    timeout 90 $R $PY benchmarks/libero_bundle_tool.py glinfo --suite "$SUITE" 2>>"$OUT/envs_stderr.log" | tee "$OUT/glinfo.json"
  fi
  if [[ $parts == *" profile "* ]]; then
    { lscpu | grep -E "Model name|MHz|Hypervisor"; timeout 60 $R $PY benchmarks/libero_bundle_tool.py profile --suite "$SUITE"; } \
      2>>"$OUT/envs_stderr.log" | tee "$OUT/profile.txt"
  fi
  if [[ $parts == *" libero "* ]]; then
    timeout 120 $R $PY benchmarks/bench_libero.py --suite "$SUITE" --steps 200 2>>"$OUT/envs_stderr.log" | tee "$OUT/bench_libero.json"
  fi
  if [[ $parts == *" envs "* ]]; then
    timeout "${ENVS_LIMIT_S:-350}" $R $PY benchmarks/bench_envs.py --env libero --suite "$SUITE" --workers ${ENV_WORKERS:-1 4 8 16} \
      --steps "${STEPS:-300}" --render-every ${RENDER_EVERY:-1 5} --engine 2>>"$OUT/envs_stderr.log" | tee "$OUT/bench_envs.json"
  fi
  ;;
eval)
  CK=${CKPT_DIR:-/tmp/ckpt_${SHAPES:-2b}}
  raw=$(mktemp -d)
  t0=$SECONDS
  timeout "${CKPT_LIMIT_S:-200}" $R $PY benchmarks/make_eval_checkpoint.py --out "$CK" --shapes "${SHAPES:-2b}" --experiment E2 \
    2>"$raw/checkpoint.err" | tee "$OUT/checkpoint.json"
  echo "checkpoint written in $((SECONDS - t0)) s"
  for run in ${MODES:-pred zero}; do
    # a run is MODE, MODE@WAIT (the engine's --batch-wait-s WAIT: act on the ready slots instead of lockstep)
    # or MODE:gN (lockstep in N groups taking turns: --groups N)
    mode=${run%%[@:]*}; wait_arg=()
    [[ $run == *@* ]] && wait_arg=(--batch-wait-s "${run#*@}")
    [[ $run == *:g* ]] && wait_arg=(--groups "${run#*:g}")
    run=${run/@/_wait}; run=${run/:g/_groups}
    ev=$raw/eval_$run
    mkdir -p "$ev"
    # episodes finished over time (the engine appends one line per finished episode)
    ( while sleep 1; do echo "$(date +%s.%N) $(cat "$ev/episodes.jsonl" 2>/dev/null | wc -l)"; done ) > "$ev/progress.log" &
    sampler=$!
    start=$(date +%s.%N)
    timeout "${EVAL_LIMIT_S:-200}" $R $PY -m vla_core.cli eval --env libero --suite "$SUITE" \
      --episodes "${EPISODES:-20}" --workers "$WORKERS" --checkpoint "$CK/run" --rollout-memory "$mode" "${wait_arg[@]}" \
      ${TASKS:+--tasks "$TASKS"} ${MAX_STEPS:+--max-steps "$MAX_STEPS"} --out "$ev" --no-progress 2>&1 | while IFS= read -r line; do echo "$(date +%s.%N) $line"; done > "$ev/eval.log"
    rc=${PIPESTATUS[0]}
    end=$(date +%s.%N)
    kill "$sampler" 2>/dev/null
    $PY - "$ev" "$start" "$end" "$rc" "$run" <<'EOF' | tee "$OUT/eval_$run.json"
import json, sys
from pathlib import Path
ev, start, end, rc, mode = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
recs = [json.loads(l) for l in (ev / "episodes.jsonl").read_text().splitlines() if l.strip()] if (ev / "episodes.jsonl").exists() else []
log = [l.split(" ", 1) for l in (ev / "eval.log").read_text().splitlines() if " " in l]
first_act = next((float(t) for t, msg in log if "prompt example" in msg), None)
prog = [tuple(map(float, l.split())) for l in (ev / "progress.log").read_text().splitlines() if len(l.split()) == 2]
# the first time the count reached its final value (within the 1 s sampling)
t_last = next((t for t, n in prog if n == len(recs)), end)
steps = sum(r["steps"] for r in recs)
res = {"mode": mode, "rc": rc, "episodes": len(recs), "errors": sum(1 for r in recs if r.get("error")),
       "successes": sum(1 for r in recs if r["success"]), "steps": steps,
       "steps_per_episode": round(steps / len(recs), 1) if recs else None,
       "wall_s_total": round(end - start, 1),
       "startup_s (start -> first policy call)": round(first_act - start, 1) if first_act else None}
if recs and first_act:
    run = t_last - first_act
    res.update({"running_s (first policy call -> last episode)": round(run, 1),
                "episodes_per_s_running": round(len(recs) / run, 3),
                "env_steps_per_s_running": round(steps / run, 1),
                "episode_wall_s_median": sorted(r["wall_s"] for r in recs)[len(recs) // 2]})
print(json.dumps(res))
EOF
  done
  [ "${ACT_LIMIT_S:-120}" = 0 ] || timeout "${ACT_LIMIT_S:-120}" $R $PY benchmarks/bench_policy_act.py --checkpoint "$CK/run" --rollout-memory pred zero \
    --batch "$WORKERS" 2>"$raw/policy_act.err" | tee "$OUT/policy_act.json"
  tar -C "$raw" -czf "$OUT/eval_raw.tar.gz" .
  ;;
*)
  echo "unknown stage $stage (envs|eval)" >&2; exit 2 ;;
esac
