"""The metrics every microjob exports, on one registry of our own.

A registry of our own (not prometheus_client's global default): nothing else in the process (a library
that registers its own collectors, a test that runs several jobs) leaks into what a job pushes, and the
names below are the complete list of what wmvla exports (docs/metrics.md, the dashboard test).

Every metric carries the job labels `run`, `cell`, `microjob`, `shard` (one value each per job, see
`vla_core.telemetry.job_labels`); the only other labels are `condition` (the bounded set CONDITIONS) and
`direction` (up / down). Nothing unbounded (no task names, episode ids, paths) is ever a label value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

JOB_LABELS = ("run", "cell", "microjob", "shard")
# Rollout memory conditions (vla_core.policy memory modes and the ablations), plus scripted policies and a
# catch-all, so a free-form `--condition` label can never create a new series.
CONDITIONS = ("pred", "zero", "random", "shuffle", "oracle", "none", "scripted", "other")
DIRECTIONS = ("up", "down")
# policy calls span ~1 ms (scripted) to seconds (a 2B VLA batch on a busy GPU)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, JOB_LABELS + extra, registry=REGISTRY)


def _counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, JOB_LABELS + extra, registry=REGISTRY)


# ---- latents (wmvla latents)
LATENTS_FRAMES_DONE = _gauge("wmvla_latents_frames_done", "Frames whose world latents are in the cache (resumed runs "
                                                          "start at the rows already written).")
LATENTS_FRAMES_PLANNED = _gauge("wmvla_latents_frames_planned", "Frames of the dataset (rows of the cache).")
LATENTS_CLIPS_PER_SECOND = _gauge("wmvla_latents_clips_per_second", "Clips encoded per second since this session "
                                                                    "started (one clip per frame).")

# ---- training (wmvla train; the main process only). Loss values are the means over the last log window.
TRAIN_STEP = _gauge("wmvla_train_step", "Optimizer steps done.")
TRAIN_STEPS_PLANNED = _gauge("wmvla_train_steps_planned", "Optimizer steps the run is configured for.")
TRAIN_LOSS = _gauge("wmvla_train_loss", "Total training loss (action + world).")
TRAIN_ACTION_LOSS = _gauge("wmvla_train_action_loss", "Action loss (MSE or flow matching, normalised units).")
TRAIN_WORLD_LOSS = _gauge("wmvla_train_world_loss", "Prophet world-latent loss (0 without memory).")
TRAIN_GATE = _gauge("wmvla_train_gate", "tanh of the memory cross-attention gate (absent without memory).")
TRAIN_LEARNING_RATE = _gauge("wmvla_train_learning_rate", "Learning rate of the step (before per-group scales).")
TRAIN_GRAD_NORM = _gauge("wmvla_train_grad_norm", "Gradient norm before clipping.")
TRAIN_SAMPLES_PER_SECOND = _gauge("wmvla_train_samples_per_second", "Training samples per second over the last log "
                                                                    "window, all processes.")
TRAIN_GPU_MEMORY_BYTES = _gauge("wmvla_train_gpu_memory_bytes", "Peak GPU memory allocated by torch on the main "
                                                                "process's device (absent on CPU).")
TRAIN_VAL_ACTION_MSE = _gauge("wmvla_train_val_action_mse", "Validation action MSE (normalised units).")
TRAIN_VAL_BASELINE_MSE = _gauge("wmvla_train_val_mean_baseline_mse", "Validation MSE of predicting the mean "
                                                                     "training action (the policy must be below).")

# ---- evaluation (wmvla eval, matrix, demo)
EVAL_EPISODES = _counter("wmvla_eval_episodes", "Episodes finished (resumed runs count the recorded ones once).",
                         ("condition",))
EVAL_SUCCESSES = _counter("wmvla_eval_successes", "Successful episodes.", ("condition",))
EVAL_ENV_STEPS = _counter("wmvla_eval_env_steps", "Environment steps executed.")
EVAL_ENV_STEPS_PER_SECOND = _gauge("wmvla_eval_env_steps_per_second", "Environment steps per second, all workers, "
                                                                      "over the last ~10 s.")
EVAL_POLICY_LATENCY = Histogram("wmvla_eval_policy_latency_seconds", "Wall time of one batched policy call.",
                                JOB_LABELS, registry=REGISTRY, buckets=LATENCY_BUCKETS)

# ---- object storage (vla_core.storage calls telemetry.count_bytes)
STORAGE_BYTES = _counter("wmvla_storage_bytes", "Bytes transferred to (up) or from (down) object storage.",
                         ("direction",))


def exported_names() -> set[str]:
    """Every sample name a Prometheus server can see from wmvla (counter `_total`, histogram `_bucket` /
    `_sum` / `_count`), for checks such as 'every metric the dashboard queries exists'."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for metric in REGISTRY.collect():
        for s in suffixes[metric.type]:
            names.add(metric.name + s)
    return names


def condition_label(condition: str) -> str:
    """An episode's free-form condition (`ckpt-pred`, `E2-mse-shuffle`, `scripted-expert`, ...) -> one of
    CONDITIONS: the rollout memory mode it names, `scripted`, or `other`."""
    text = str(condition).lower()
    if text.startswith("scripted"):
        return "scripted"
    for part in reversed(text.replace("_", "-").split("-")):
        if part in CONDITIONS:
            return part
    return "other"
