"""Prometheus metrics of every microjob (latents, training, evaluation, storage).

    job = telemetry.start_job("train", cell="E2-mse-s0")    # labels, HTTP endpoint, Pushgateway pusher
    job.train_record({"step": 10, "loss": 0.31, ...})       # the loop's log record
    job.close()                                              # final push (also at exit for jobs left open)
    telemetry.count_bytes("up", n)                           # vla_core.storage, after each transfer

Exposure (docs/metrics.md): with WMVLA_METRICS_PORT set the process serves /metrics on that port (bound to
WMVLA_METRICS_ADDR, default 0.0.0.0); with WMVLA_PUSHGATEWAY_URL set every job pushes its samples every
PUSH_INTERVAL_S seconds and once when it closes, grouped by run / cell / microjob / shard. With neither set
the metrics are only kept in the process's registry (cheap: a few dictionary lookups per logged step).

A metrics failure never fails a job: every method here catches its own errors and reports one warning per
kind of failure per process (TelemetryWarning), then carries on.

Labels: run, cell, microjob, shard come from WMVLA_RUN_ID / WMVLA_CELL / WMVLA_MICROJOB / WMVLA_SHARD (set
by the pipeline's components); where a variable is unset the caller's value is used (train and eval derive
the cell from experiment, head and seed), else the defaults `local` / `all` / the microjob's name / `0`.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time

from vla_core import env_names
from vla_core.telemetry import metrics as m
from vla_core.telemetry.exposure import (  # noqa: F401  (re-exported: the public API)
    PUSH_INTERVAL_S,
    Pusher,
    TelemetryWarning,
    delete_run_groups,
    ensure_http_server,
    reset_warnings,
    stop_http_server,
    warn_once,
)
from vla_core.telemetry.metrics import CONDITIONS, JOB_LABELS, REGISTRY, condition_label, exported_names  # noqa: F401

MAX_LABEL_CHARS = 100  # label values come from env vars and configs; keep a typo'd path from becoming a label
RATE_WINDOW_S = 10.0


def _label(value: object) -> str:
    text = str(value).strip()
    return text[:MAX_LABEL_CHARS] if text else "none"


def job_labels(microjob: str, cell: str | None = None, shard: int | str | None = None) -> dict[str, str]:
    """run / cell / microjob / shard of a job: the WMVLA_* variables where set, else these arguments, else
    defaults."""
    env = os.environ
    return {
        "run": _label(env.get(env_names.RUN_ID) or "local"),
        "cell": _label(env.get(env_names.CELL) or cell or "all"),
        "microjob": _label(env.get(env_names.MICROJOB) or microjob),
        "shard": _label(env.get(env_names.SHARD) or (shard if shard is not None else "0")),
    }


def cell_name(experiment: str | None, head: str | None, seed: int | None = None) -> str | None:
    """The cell label a run derives when WMVLA_CELL is unset: `E2-mse-s0` (None without an experiment)."""
    if not experiment:
        return None
    return "-".join([str(experiment)] + ([str(head)] if head else []) + ([f"s{seed}"] if seed is not None else []))


def _safe(method):
    """Metrics updates never raise into the job: one warning per process, then silence."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            warn_once("update", f"{method.__name__} failed: {type(e).__name__}: {e}")
            return None

    return wrapper


class _Rate:
    """Events per second over windows of about RATE_WINDOW_S (the first value after 1 s)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.n = 0.0
        self.last = None

    def add(self, n: float) -> float | None:
        self.n += n
        now = time.perf_counter()
        dt = now - self.t0
        if dt < 1.0:
            return self.last
        self.last = self.n / dt
        if dt >= RATE_WINDOW_S:
            self.t0, self.n = now, 0.0
        return self.last


class Job:
    """One microjob's metrics: bound label children, and its pusher when a Pushgateway is configured.

    Create with `start_job`; every method is a no-op on an inactive job (e.g. training ranks other than
    the main one) and never raises."""

    def __init__(self, labels: dict[str, str], active: bool = True, push_url: str | None = None,
                 push_interval_s: float | None = None):
        self.labels = labels
        self.active = active
        self.pusher: Pusher | None = None
        self._children: dict = {}
        self._steps_rate = _Rate()
        self._closed = False
        if active and push_url:
            self.pusher = Pusher(push_url, labels, PUSH_INTERVAL_S if push_interval_s is None else push_interval_s)

    def _child(self, metric, **extra):
        key = (metric, tuple(extra.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**self.labels, **extra)
        return child

    # ---- latents
    @_safe
    def latents_progress(self, frames_done: int, frames_planned: int, clips_per_s: float | None = None) -> None:
        self._child(m.LATENTS_FRAMES_DONE).set(frames_done)
        self._child(m.LATENTS_FRAMES_PLANNED).set(frames_planned)
        if clips_per_s is not None:
            self._child(m.LATENTS_CLIPS_PER_SECOND).set(clips_per_s)

    # ---- training
    @_safe
    def train_planned(self, steps: int, step: int = 0) -> None:
        self._child(m.TRAIN_STEPS_PLANNED).set(steps)
        self._child(m.TRAIN_STEP).set(step)

    _TRAIN_FIELDS = (("step", "TRAIN_STEP"), ("loss", "TRAIN_LOSS"), ("action_loss", "TRAIN_ACTION_LOSS"),
                     ("world_loss", "TRAIN_WORLD_LOSS"), ("gate", "TRAIN_GATE"), ("lr", "TRAIN_LEARNING_RATE"),
                     ("grad_norm", "TRAIN_GRAD_NORM"), ("samples_per_s", "TRAIN_SAMPLES_PER_SECOND"))

    @_safe
    def train_record(self, record: dict, gpu_memory_bytes: int | None = None) -> None:
        """One logged training record (vla_core.train.logger's train_log.jsonl fields); missing keys (gate
        without memory) leave their metric absent."""
        for key, name in self._TRAIN_FIELDS:
            value = record.get(key)
            if value is not None:
                self._child(getattr(m, name)).set(float(value))
        if gpu_memory_bytes is not None:
            self._child(m.TRAIN_GPU_MEMORY_BYTES).set(gpu_memory_bytes)

    @_safe
    def train_validation(self, record: dict) -> None:
        self._child(m.TRAIN_VAL_ACTION_MSE).set(float(record["action_mse"]))
        self._child(m.TRAIN_VAL_BASELINE_MSE).set(float(record["mean_baseline_mse"]))

    # ---- evaluation
    @_safe
    def eval_episode(self, condition: str, success: bool) -> None:
        label = condition_label(condition)
        self._child(m.EVAL_EPISODES, condition=label).inc()
        # touched with 0 so that a condition without successes still has a series (success rate 0, not absent)
        self._child(m.EVAL_SUCCESSES, condition=label).inc(1 if success else 0)

    @_safe
    def eval_env_steps(self, n: int) -> None:
        self._child(m.EVAL_ENV_STEPS).inc(n)
        rate = self._steps_rate.add(n)
        if rate is not None:
            self._child(m.EVAL_ENV_STEPS_PER_SECOND).set(rate)

    @_safe
    def eval_policy_latency(self, seconds: float) -> None:
        self._child(m.EVAL_POLICY_LATENCY).observe(seconds)

    # ---- lifecycle
    def push(self) -> bool:
        """Push now (False without a Pushgateway or when the push failed)."""
        return bool(self.pusher is not None and self.pusher.push())

    def close(self) -> None:
        """Stop the pusher after a final push. Idempotent; also run at exit for jobs still open."""
        if self._closed:
            return
        self._closed = True
        with _jobs_lock:
            if self in _open_jobs:
                _open_jobs.remove(self)
        if self.pusher is not None:
            try:
                self.pusher.stop()
            except Exception as e:  # noqa: BLE001
                warn_once("push", f"final push failed: {type(e).__name__}: {e}")

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_open_jobs: list[Job] = []
_jobs_lock = threading.Lock()


def start_job(microjob: str, *, cell: str | None = None, shard: int | str | None = None, active: bool = True,
              push_interval_s: float | None = None) -> Job:
    """Begin reporting one microjob: its labels (`job_labels`), the process's HTTP endpoint if
    WMVLA_METRICS_PORT is set, a pusher if WMVLA_PUSHGATEWAY_URL is set. `active=False` (e.g. DDP ranks
    other than 0) returns a job whose methods do nothing. Never raises."""
    try:
        labels = job_labels(microjob, cell, shard)
    except Exception as e:  # noqa: BLE001
        warn_once("labels", f"cannot build the job labels: {type(e).__name__}: {e}")
        return Job({}, active=False)
    if not active:
        return Job(labels, active=False)
    ensure_http_server()
    url = os.environ.get(env_names.PUSHGATEWAY_URL, "").strip() or None
    try:
        job = Job(labels, push_url=url, push_interval_s=push_interval_s)
    except Exception as e:  # noqa: BLE001 - e.g. no thread can be started
        warn_once("push", f"cannot start the pusher: {type(e).__name__}: {e}")
        job = Job(labels)
    with _jobs_lock:
        _open_jobs.append(job)
    return job


def count_bytes(direction: str, n: int) -> None:
    """Count `n` bytes moved to ("up") or from ("down") object storage, under the labels of the most recently
    started job still open (else the environment's labels with microjob `storage`). A wrong direction or a
    negative count is a caller's bug and raises ValueError; nothing else raises."""
    if direction not in m.DIRECTIONS:
        raise ValueError(f"count_bytes: direction must be one of {m.DIRECTIONS}, got {direction!r}")
    if n < 0:
        raise ValueError(f"count_bytes: n must be >= 0 bytes, got {n}")
    try:
        with _jobs_lock:
            labels = _open_jobs[-1].labels if _open_jobs else job_labels("storage")
        m.STORAGE_BYTES.labels(**labels, direction=direction).inc(n)
    except Exception as e:  # noqa: BLE001
        warn_once("update", f"count_bytes failed: {type(e).__name__}: {e}")


count_storage_bytes = count_bytes  # the name vla_core.storage imports


def end_run(run: str) -> int:
    """The run is over (its report is written): delete its groups from the Pushgateway (WMVLA_PUSHGATEWAY_URL),
    so finished runs' values are not scraped as current forever. Returns how many groups went; never raises."""
    url = os.environ.get(env_names.PUSHGATEWAY_URL, "").strip()
    return delete_run_groups(url, run) if url else 0


def shutdown() -> None:
    """Close every open job (final pushes) and stop the HTTP endpoint. Registered with atexit."""
    with _jobs_lock:
        jobs = list(_open_jobs)
    for job in reversed(jobs):
        job.close()
    stop_http_server()


atexit.register(shutdown)
