"""Closed-loop rollout engine: environments in worker processes, one batched policy call per round.

    records = run_rollouts(env_cfg, policy, episodes, out_dir, EngineConfig(workers=8, replan_steps=5))

Design
- Each worker process owns one environment slot. It sets the GL backend before anything imports mujoco
  and creates its envs itself (spawn context: no simulator or GL context is ever forked).
- The policy runs in the main process. Every round, the observations of all slots that need an action
  are batched into one `policy.act` call; each slot then receives its action chunk and executes
  `replan_steps` actions of it (fewer if the chunk is shorter or the episode ends) inside the worker,
  so there is one message round trip per chunk, not per step.
- Episodes `(task, init_index, condition)` are handed to free slots in the given order until all are done.
  Each finished episode is appended to `out_dir/episodes.jsonl` at once (flushed and fsynced), so a run
  that is killed loses at most the episodes in flight; re-running with the same `out_dir` skips the
  episodes already recorded (keyed by env, suite, task, init index, seed, condition).
- A policy output that is not a finite [h >= 1, action_dim] array fails that episode with the reason in
  `error`; an env exception or a dead/hung worker fails that episode with the reason and the worker is
  restarted. The run goes on in every case.
- `workers=0` runs one slot in-process (tests, debugging).

Policies that keep a per-step history (e.g. a world-encoder frame buffer) may define
`observe(slot, observation)`: the engine then also ships the observations of the steps executed from a
chunk and calls `observe` for each of them, in order, before the next `act` of that slot.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vla_core import telemetry
from vla_core.envs.base import Observation
from vla_core.envs.registry import EnvConfig, action_dim, configure_gl
from vla_core.utils import WmvlaError, append_jsonl, atomic_write_json, config_diff, read_jsonl, to_jsonable

EPISODES_FILE = "episodes.jsonl"
RUN_CONFIG_FILE = "run_config.json"
# Settings that may change between a run and its resumption without changing any episode's result.
RESUME_IGNORED_KEYS = ("tasks", "episodes", "episodes_per_task", "init_indices", "workers", "videos",
                       "max_steps_per_task", "progress", "batch_wait_s", "groups")


class BatchPolicy(Protocol):
    def reset(self, slot: int, task: str, instruction: str) -> None:
        """A new episode starts in `slot` (clear that slot's history)."""

    def act(self, slots: list[int], observations: list[Observation], instructions: list[str]) -> list[np.ndarray]:
        """One action chunk [h >= 1, action_dim] per slot, in the order of `slots`."""


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    init_index: int
    condition: str = "default"


@dataclass(frozen=True)
class EngineConfig:
    """How rollouts are executed (replan_steps changes results; the rest only speed and outputs)."""

    workers: int = 2
    """environment worker processes (= policy batch size); 0 = one env in this process."""
    replan_steps: int = 5
    """actions executed from each predicted chunk before the policy is called again."""
    videos: int = 0
    """save an mp4 of every episode with init_index < videos (per task and condition), in out_dir/videos."""
    video_fps: int = 30
    progress: bool = True
    """rich progress bar with the live success rate (stderr)."""
    batch_wait_s: float | None = None
    """None = lockstep: every policy call waits for all workers (largest batches; best when the policy
    is expensive, e.g. a VLA on a GPU). A number = call the policy on the slots that are ready, after
    waiting at most this long for more to arrive (0: never wait; best when envs dominate, e.g. scripted
    policies or fast envs with many workers). Results do not depend on it."""
    groups: int = 1
    """lockstep only: split the slots into this many fixed groups that take turns (deterministic, like
    lockstep): while the policy acts for one group, the other groups' envs execute their chunks, so env
    stepping overlaps the policy call. 1 = all slots in one batch. Results do not depend on it."""
    worker_timeout_s: float = 600.0
    """a worker silent for this long is killed (its episode is retried once, then recorded as failed)."""
    max_worker_restarts: int = 3
    """abort when a slot's worker dies more often than this without completing an episode in between
    (a broken setup, not a flaky episode)."""


def episode_key(env: str, suite: str, task: str, init_index: int, seed: int, condition: str) -> tuple:
    return (env, suite, task, int(init_index), int(seed), condition)


def record_key(r: dict) -> tuple:
    return episode_key(r["env"], r["suite"], r["task"], r["init_index"], r["seed"], r["condition"])


def video_name(task: str, init_index: int, condition: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in condition)
    return f"{task}__init{init_index:03d}__{safe}.mp4"


# ------------------------------------------------------------------------------------ worker side


class EnvRunner:
    """Owns the environment of one slot; executes 'start' and 'step' commands (inside a worker)."""

    def __init__(self, env_cfg: EnvConfig, send_intermediate: bool, video_fps: int):
        self.env_cfg = env_cfg
        self.send_intermediate = send_intermediate
        self.video_fps = video_fps
        self.env = None
        self.video_path: str | None = None
        self.frames: list[np.ndarray] = []

    def _get_env(self, task: str):
        if self.env is not None and self.env.task_name == task:
            return self.env
        self._close_env()  # one env per worker: episodes arrive grouped by task
        from vla_core.envs.registry import make_env

        self.env = make_env(self.env_cfg, task)
        return self.env

    def _close_env(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            finally:
                self.env = None

    def handle(self, msg: tuple) -> dict:
        try:
            if msg[0] == "start":
                return self._start(*msg[1:])
            if msg[0] == "step":
                return self._step(msg[1])
            raise ValueError(f"unknown command {msg[0]!r}")
        except Exception as e:  # noqa: BLE001 - reported to the main process, recorded with the episode
            self._close_env()  # the env may be in a broken state; start the next episode from a fresh one
            return {"error": f"env: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}

    def _start(self, task: str, init_index: int, video_path: str | None) -> dict:
        env = self._get_env(task)
        obs = env.reset(init_index)
        self.video_path = video_path
        self.frames = [obs["images"][env.camera_keys[0]]] if video_path else []
        return {"obs": obs, "instruction": env.instruction, "max_steps": env.max_steps}

    def _step(self, actions: np.ndarray) -> dict:
        env = self.env
        if env is None:
            raise RuntimeError("step before start")
        observed, steps, success, done, obs = [], 0, False, False, None
        for a in actions:
            res = env.step(a)
            steps += 1
            obs, success, done = res.observation, res.success, res.done
            if self.video_path:
                self.frames.append(obs["images"][env.camera_keys[0]])
            if done:
                break
            if self.send_intermediate:
                observed.append(obs)
        if self.send_intermediate and observed and not done:
            observed.pop()  # the last one is `obs`, given to the next act()
        if done:
            self._write_video()
        return {"obs": obs, "observed": observed, "steps": steps, "success": success, "done": done}

    def _write_video(self) -> None:
        if not self.video_path or not self.frames:
            return
        from vla_core.data.video import VideoFileWriter

        h, w = self.frames[0].shape[:2]
        vw = VideoFileWriter(self.video_path, self.video_fps, w, h)
        vw.add(np.stack(self.frames))
        vw.close()
        self.frames, self.video_path = [], None

    def close(self) -> None:
        self._close_env()


def _worker_main(conn, env_cfg: EnvConfig, send_intermediate: bool, video_fps: int, lp_threads: int) -> None:
    # Before anything imports mujoco: the GL backend, and one llvmpipe thread per worker on CPU-only
    # machines (N single-threaded renderers scale better than N renderers fighting over the cores).
    os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = env_cfg.render_backend
    os.environ.setdefault("LP_NUM_THREADS", str(lp_threads))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runner = EnvRunner(env_cfg, send_intermediate, video_fps)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "close":
                break
            conn.send(runner.handle(msg))
    except KeyboardInterrupt:
        pass
    finally:
        runner.close()


class _ProcessWorker:
    def __init__(self, ctx, index: int, env_cfg: EnvConfig, send_intermediate: bool, video_fps: int, lp_threads: int):
        self.index = index
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, env_cfg, send_intermediate, video_fps, lp_threads),
                                name=f"wmvla-env-{index}", daemon=True)
        self.proc.start()
        child.close()
        self._send_failed: str | None = None

    def ready_handle(self):
        """What multiprocessing.connection.wait waits on (None: a reply is already known)."""
        return None if self._send_failed is not None else self.conn

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionError, OSError) as e:
            # the process is gone; report it as a dead worker at the next recv
            self._send_failed = f"worker {self.index} died (sending failed: {type(e).__name__})"

    def recv(self, timeout: float) -> dict:
        if self._send_failed is not None:
            self.kill()
            return {"error": self._send_failed, "dead": True}
        try:
            if not self.conn.poll(timeout):
                self.kill()
                return {"error": f"worker {self.index} sent nothing for {timeout:.0f} s (hung); killed", "dead": True}
            return self.conn.recv()
        except (EOFError, ConnectionError, OSError):
            self.proc.join(timeout=5)
            return {"error": f"worker {self.index} died (exit code {self.proc.exitcode})", "dead": True}

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)

    def request_close(self) -> None:
        try:
            self.conn.send(("close",))
        except (OSError, ValueError):
            pass

    def wait_closed(self, deadline: float) -> None:
        self.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.proc.is_alive():
            self.kill()
        self.conn.close()

    def close(self) -> None:
        self.request_close()
        self.wait_closed(time.monotonic() + 10)


class _InlineWorker:
    def __init__(self, index: int, env_cfg: EnvConfig, send_intermediate: bool, video_fps: int):
        configure_gl(env_cfg.render_backend)
        self.index = index
        self.runner = EnvRunner(env_cfg, send_intermediate, video_fps)
        self._reply: dict | None = None

    def ready_handle(self):
        return None  # replies are computed in send()

    def send(self, msg: tuple) -> None:
        self._reply = self.runner.handle(msg)

    def recv(self, timeout: float) -> dict:
        reply, self._reply = self._reply, None
        assert reply is not None
        return reply

    def close(self) -> None:
        self.runner.close()

    request_close = close  # in-process: closing is immediate

    def wait_closed(self, deadline: float) -> None:
        pass


# -------------------------------------------------------------------------------------- main side


@dataclass
class _Slot:
    index: int
    worker: Any
    spec: EpisodeSpec | None = None
    instruction: str = ""
    obs: Observation | None = None
    steps: int = 0
    policy_calls: int = 0
    t0: float = 0.0
    awaiting: bool = False
    video: str | None = None
    deaths: int = 0  # worker deaths since this slot last completed an episode
    sent_at: float = 0.0  # when the outstanding command was sent


def validate_chunk(chunk: Any, dim: int) -> tuple[np.ndarray | None, str | None]:
    """A policy's action chunk -> (float32 [h, dim], None) or (None, reason)."""
    try:
        a = np.asarray(chunk, dtype=np.float32)
    except (TypeError, ValueError) as e:
        return None, f"policy returned a {type(chunk).__name__} that is not a numeric array ({e})"
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != dim:
        return None, f"policy returned an action chunk of shape {list(a.shape)}, expected [h >= 1, {dim}]"
    if not np.all(np.isfinite(a)):
        return None, f"policy returned non-finite actions (NaN/inf) in a chunk of shape {list(a.shape)}"
    return a, None


def drop_torn_last_line(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so that new records start on a line of their own."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def check_run_config(out_dir: Path, run_config: dict, name: str = RUN_CONFIG_FILE) -> None:
    """First run: save run_config.json. Resumed run: refuse settings that would change results."""
    path = out_dir / name
    if not path.exists():
        atomic_write_json(path, run_config)
        return
    import json

    old = json.loads(path.read_text())

    def strip(d: dict) -> dict:
        return {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in RESUME_IGNORED_KEYS}

    diff = config_diff(strip(old), strip(to_jsonable(run_config)))
    if diff:
        raise WmvlaError(
            f"{out_dir} holds episodes of a run with different settings, so resuming would mix results:\n  - "
            + "\n  - ".join(diff) + f"\nfix: use another --out folder, or delete {out_dir} to start over."
        )


def run_rollouts(
    env_cfg: EnvConfig,
    policy: BatchPolicy,
    episodes: list[EpisodeSpec],
    out_dir: str | os.PathLike,
    engine: EngineConfig = EngineConfig(),
    run_config: dict | None = None,
    episodes_file: str = EPISODES_FILE,
    run_config_file: str = RUN_CONFIG_FILE,
    shard: int | None = None,
) -> list[dict]:
    """Run `episodes` (skipping those already in out_dir/episodes.jsonl); return all records of them.

    `episodes_file` / `run_config_file`: other paths relative to out_dir (a shard of a sharded evaluation
    writes `shards/shard-00-of-04.jsonl`, see vla_core.eval.shards); videos go to out_dir/videos either way.
    `shard`: this process's shard index, the `shard` label of its metrics (vla_core.telemetry)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if engine.replan_steps < 1:
        raise WmvlaError(f"replan_steps must be >= 1, got {engine.replan_steps}")
    if engine.workers < 0:
        raise WmvlaError(f"workers must be >= 0, got {engine.workers}")
    if run_config is not None:
        check_run_config(out_dir, run_config, run_config_file)
    suite, seed, dim = env_cfg.resolved_suite, env_cfg.seed, action_dim(env_cfg)
    log_path = out_dir / episodes_file

    def key(spec: EpisodeSpec) -> tuple:
        return episode_key(env_cfg.env, suite, spec.task, spec.init_index, seed, spec.condition)

    wanted = {key(s) for s in episodes}
    if len(wanted) != len(episodes):
        raise WmvlaError("the episode list has duplicates (same task, init_index and condition)")
    drop_torn_last_line(log_path)
    done_records = {record_key(r): r for r in read_jsonl(log_path) if record_key(r) in wanted}
    todo = deque(s for s in episodes if key(s) not in done_records)
    results = dict(done_records)
    n_total = len(episodes)
    n_success = sum(bool(r["success"]) for r in done_records.values())
    if not todo:
        return [results[key(s)] for s in episodes]

    if engine.videos > 0:
        (out_dir / "videos").mkdir(exist_ok=True)
    send_intermediate = callable(getattr(policy, "observe", None))
    n_slots = max(1, min(engine.workers, len(todo)))
    lp_threads = max(1, (os.cpu_count() or 1) // max(1, engine.workers))
    ctx = mp.get_context("spawn")

    def new_worker(i: int):
        if engine.workers == 0:
            return _InlineWorker(i, env_cfg, send_intermediate, engine.video_fps)
        return _ProcessWorker(ctx, i, env_cfg, send_intermediate, engine.video_fps, lp_threads)

    progress = _Progress(engine.progress, n_total, len(done_records), n_success, str(episodes[0].condition))
    cfg = run_config or {}
    metrics = telemetry.start_job("eval", cell=telemetry.cell_name(cfg.get("experiment"), cfg.get("head"),
                                                                  cfg.get("seed")), shard=shard)
    for r in done_records.values():  # a resumed run's totals include the episodes recorded before
        metrics.eval_episode(r["condition"], r["success"])
    slots: list[_Slot] = []
    try:
        slots = [_Slot(i, new_worker(i)) for i in range(n_slots)]

        def finish(slot: _Slot, success: bool, error: str | None) -> None:
            nonlocal n_success
            spec = slot.spec
            assert spec is not None
            rec = {
                "env": env_cfg.env, "suite": suite, "task": spec.task, "init_index": spec.init_index,
                "seed": seed, "condition": spec.condition, "success": bool(success), "steps": slot.steps,
                "wall_s": round(time.perf_counter() - slot.t0, 3), "error": error,
                "instruction": slot.instruction, "policy_calls": slot.policy_calls,
                "video": f"videos/{slot.video}" if (slot.video and error is None) else None,
            }
            append_jsonl(log_path, rec)
            results[key(spec)] = rec
            if error is None:
                slot.deaths = 0
            n_success += int(bool(success))
            progress.advance(bool(success))
            metrics.eval_episode(spec.condition, success)
            slot.spec, slot.obs, slot.awaiting = None, None, False

        def start_next(slot: _Slot) -> None:
            if not todo:
                return
            spec = todo.popleft()
            slot.spec, slot.steps, slot.policy_calls, slot.t0 = spec, 0, 0, time.perf_counter()
            slot.video = (video_name(spec.task, spec.init_index, spec.condition)
                          if spec.init_index < engine.videos else None)
            slot.instruction = ""
            slot.worker.send(("start", spec.task, spec.init_index,
                              str(out_dir / "videos" / slot.video) if slot.video else None))
            slot.awaiting, slot.sent_at = True, time.perf_counter()

        def handle_reply(slot: _Slot, reply: dict) -> None:
            if reply.get("dead"):
                # Infrastructure, not the policy: replace the process and retry the episode once.
                slot.deaths += 1
                if slot.deaths > engine.max_worker_restarts:
                    raise WmvlaError(
                        f"environment worker {slot.index} died {slot.deaths} times in a row without completing an "
                        f"episode; last: {reply['error']}. "
                        "Run with --workers 0 to see the error in this process (a script that starts "
                        "workers needs an `if __name__ == '__main__':` guard).")
                slot.worker.close()
                slot.worker = new_worker(slot.index)
                spec = slot.spec
                if spec is not None and key(spec) not in retried:
                    retried.add(key(spec))
                    todo.appendleft(spec)
                    slot.spec, slot.obs, slot.awaiting = None, None, False
                    start_next(slot)
                    return
            if "error" in reply:
                finish(slot, False, reply["error"])
                start_next(slot)
                return
            slot.obs = reply["obs"]
            slot.awaiting = False
            if "instruction" in reply:  # a new episode started
                slot.instruction = reply["instruction"]
                policy.reset(slot.index, slot.spec.task, slot.instruction)
                return
            slot.steps += reply["steps"]
            metrics.eval_env_steps(reply["steps"])
            for o in reply["observed"]:
                policy.observe(slot.index, o)
            if reply["done"]:
                finish(slot, reply["success"], None)
                start_next(slot)

        retried: set[tuple] = set()
        for slot in slots:
            start_next(slot)
        def collect(timeout: float) -> int:
            """Handle the replies that arrive within `timeout`; kill workers silent for too long."""
            awaiting = [s for s in slots if s.awaiting]
            if not awaiting:
                return 0
            now = time.perf_counter()
            stale = min(s.sent_at for s in awaiting) + engine.worker_timeout_s - now
            handles = {s.index: s.worker.ready_handle() for s in awaiting}
            if any(h is None for h in handles.values()):
                got = [s for s in awaiting if handles[s.index] is None]
            else:
                arrived = set(map(id, mp_connection.wait(list(handles.values()), max(0.0, min(timeout, stale)))))
                got = [s for s in awaiting if id(handles[s.index]) in arrived]
            if not got:  # nothing arrived: workers past their deadline are killed (reported as dead)
                now = time.perf_counter()
                got = [s for s in awaiting if now - s.sent_at >= engine.worker_timeout_s]
            for slot in sorted(got, key=lambda s: s.index):
                handle_reply(slot, slot.worker.recv(0.0))  # arrived (or past its deadline: killed)
            return len(got)

        n_groups = max(1, min(engine.groups, len(slots)))
        groups = [slots[g::n_groups] for g in range(n_groups)]
        turn = 0
        while any(s.spec is not None for s in slots):
            members = slots
            if engine.batch_wait_s is None:
                # lockstep: every outstanding reply of the group whose turn it is, handled in slot order, so
                # that which slot runs which episode and the composition of every batch do not depend on
                # timing (new episodes started on the way are collected too). With several groups the
                # others keep stepping meanwhile.
                members = groups[turn]
                turn = (turn + 1) % n_groups
                while any(s.awaiting for s in members):
                    for slot in members:
                        if slot.awaiting:
                            wait = max(0.0, slot.sent_at + engine.worker_timeout_s - time.perf_counter())
                            handle_reply(slot, slot.worker.recv(wait))
            else:
                # at least one slot ready to act, then whatever else arrives within batch_wait_s
                while any(s.awaiting for s in slots) and not any(s.obs is not None for s in slots):
                    collect(engine.worker_timeout_s)
                deadline = time.perf_counter() + engine.batch_wait_s
                while any(s.awaiting for s in slots):
                    if collect(max(0.0, deadline - time.perf_counter())) == 0 and time.perf_counter() >= deadline:
                        break
            ready = [s for s in members if s.spec is not None and s.obs is not None]
            if not ready:
                continue
            t_act = time.perf_counter()
            chunks = policy.act([s.index for s in ready], [s.obs for s in ready], [s.instruction for s in ready])
            metrics.eval_policy_latency(time.perf_counter() - t_act)
            chunks = list(chunks) if chunks is not None else []
            for i, slot in enumerate(ready):
                slot.policy_calls += 1
                if len(chunks) != len(ready):
                    finish(slot, False, f"policy returned {len(chunks)} action chunks for {len(ready)} slots")
                    start_next(slot)
                    continue
                actions, error = validate_chunk(chunks[i], dim)
                if error is not None:
                    finish(slot, False, error)
                    start_next(slot)
                    continue
                slot.worker.send(("step", actions[: engine.replan_steps]))
                slot.obs, slot.awaiting, slot.sent_at = None, True, time.perf_counter()
    finally:
        progress.close()
        metrics.close()  # the final push
        # all workers close their envs at once (closing a LIBERO env and its GL context takes a while; one
        # after another, 16 workers kept a finished evaluation waiting ~11 s)
        for slot in slots:
            slot.worker.request_close()
        deadline = time.monotonic() + 10
        for slot in slots:
            slot.worker.wait_closed(deadline)
    return [results[key(s)] for s in episodes]


class _Progress:
    """Rich progress bar whose description shows the live success rate."""

    def __init__(self, enabled: bool, total: int, completed: int, successes: int, label: str):
        self.enabled, self.k, self.n, self.label = enabled, successes, completed, label
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.start()
        self.task = self.bar.add_task(self._desc(), total=total, completed=completed)

    def _desc(self) -> str:
        rate = f"{self.k / self.n:.1%}" if self.n else "-"
        return f"eval [{self.label}] success {self.k}/{self.n} ({rate})"

    def advance(self, success: bool) -> None:
        self.n += 1
        self.k += int(success)
        if self.enabled:
            self.bar.update(self.task, advance=1, description=self._desc())

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
