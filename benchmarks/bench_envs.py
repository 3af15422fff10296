"""Environment throughput: steps/s per process and in aggregate with N worker processes; prints JSON.

    python benchmarks/bench_envs.py --env metaworld --workers 1 2
    python benchmarks/bench_envs.py --env libero --suite libero_spatial --workers 1 2 4 8 16 --steps 200
    python benchmarks/bench_envs.py --env libero --suite libero_spatial --workers 1 16 --render-every 1 5

Each measurement starts N spawned processes (envs created inside them, GL backend set first, as in the
rollout engine), lets every process create its env and reset, waits at a barrier, then times `steps`
env steps with random actions (rendering every step, as in closed loop; episodes are reset when they
end). `--render-every 1 5` also times LIBERO with cameras rendered only every 5th step (the inner steps of an
action chunk whose images nobody reads: `LiberoEnv.step(a, render=False)`); 1 = every step (default).
Per process: steps/s and the time of one render() of all cameras. Aggregate: all steps of all
processes / wall time from the barrier to the last process finishing. `--engine` also times the full
rollout engine (run_rollouts with a no-op policy and chunked actions), which adds the message round trips,
in lockstep mode (batch_wait_s None) and in act-on-ready mode (batch_wait_s 0).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

from vla_core.envs.registry import EnvConfig, MetaWorldSettings, resolve_tasks


@dataclass
class BenchConfig:
    env: str = "metaworld"
    suite: str | None = None
    task: str = "0"
    """task name or index in the suite."""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    steps: int = 300
    """timed steps per process."""
    render_every: list[int] = field(default_factory=lambda: [1])
    """raw measurement: render the cameras every k-th step (k > 1: LIBERO only, `step(a, render=False)`
    in between); one measurement per value."""
    image_size: int | None = None
    wrist_camera: bool | None = None
    render_backend: str = "egl"
    metaworld: MetaWorldSettings = field(default_factory=MetaWorldSettings)
    engine: bool = False
    """also time run_rollouts end to end (no-op policy, chunks of replan_steps actions)."""
    replan_steps: int = 5

    def env_config(self) -> EnvConfig:
        return EnvConfig(env=self.env, suite=self.suite, image_size=self.image_size, wrist_camera=self.wrist_camera,
                         render_backend=self.render_backend, metaworld=self.metaworld)


def _bench_process(env_cfg: EnvConfig, task: str, steps: int, lp_threads: int, render_every: int, barrier,
                   queue) -> None:
    os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = env_cfg.render_backend
    os.environ.setdefault("LP_NUM_THREADS", str(lp_threads))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vla_core.envs.registry import action_dim, make_env

    env = make_env(env_cfg, task)
    rng = np.random.default_rng(os.getpid())
    dim = action_dim(env_cfg)
    init = 0
    env.reset(init)
    barrier.wait()
    t0 = time.perf_counter()
    resets = 0
    for i in range(steps):
        action = rng.uniform(-1, 1, dim).astype(np.float32)
        res = env.step(action) if render_every == 1 else env.step(action, render=(i + 1) % render_every == 0)
        if res.done:
            init = (init + 1) % env.num_init_states
            env.reset(init)
            resets += 1
    t1 = time.perf_counter()
    render_s = None
    if hasattr(env, "render"):
        r0 = time.perf_counter()
        for _ in range(20):
            env.render()
        render_s = (time.perf_counter() - r0) / 20
    env.close()
    queue.put({"steps": steps, "seconds": t1 - t0, "start": t0, "end": t1, "resets": resets, "render_s": render_s})


def bench_raw(env_cfg: EnvConfig, task: str, workers: int, steps: int, render_every: int = 1) -> dict:
    if render_every < 1 or (render_every > 1 and env_cfg.env != "libero"):
        raise SystemExit(f"--render-every {render_every}: must be >= 1, and > 1 only for libero")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    lp_threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_bench_process, args=(env_cfg, task, steps, lp_threads, render_every, barrier, queue))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    per = [r["steps"] / r["seconds"] for r in results]
    renders = [r["render_s"] for r in results if r["render_s"] is not None]
    return {
        "workers": workers,
        "render_every": render_every,
        "steps_per_s_per_process": round(float(np.mean(per)), 1),
        "steps_per_s_aggregate": round(sum(r["steps"] for r in results) / wall, 1),
        "render_ms": round(1000 * float(np.mean(renders)), 2) if renders else None,
        "resets": sum(r["resets"] for r in results),
    }


def bench_engine(env_cfg: EnvConfig, task: str, workers: int, replan_steps: int, batch_wait_s: float | None) -> dict:
    from vla_core.envs.registry import default_max_steps
    from vla_core.eval.engine import EngineConfig, EpisodeSpec, run_rollouts
    from vla_core.eval.scripted import NoopPolicy

    class TimedNoop(NoopPolicy):
        first_act: float | None = None

        def act(self, slots, observations, instructions):
            if self.first_act is None:
                self.first_act = time.perf_counter()
            return super().act(slots, observations, instructions)

    policy = TimedNoop(env_cfg, chunk_size=replan_steps)
    episodes = [EpisodeSpec(task, k, "bench") for k in range(3 * max(1, workers))]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        recs = run_rollouts(env_cfg, policy, episodes, out,
                            EngineConfig(workers=workers, replan_steps=replan_steps, progress=False,
                                         batch_wait_s=batch_wait_s))
        wall = time.perf_counter() - t0
    steps = sum(r["steps"] for r in recs)
    # startup (spawning workers, importing, creating envs) ends at the first policy call
    running = wall - (policy.first_act - t0)
    return {"workers": workers, "episodes": len(recs), "steps": steps, "max_steps": default_max_steps(env_cfg, task),
            "replan_steps": replan_steps, "batch_wait_s": batch_wait_s, "startup_s": round(policy.first_act - t0, 1),
            "steps_per_s_after_startup": round(steps / running, 1)}


def _progress(result: dict) -> dict:
    """Each measurement also goes to stderr as it completes (kept if a later one is cut off)."""
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main(cfg: BenchConfig) -> dict:
    env_cfg = cfg.env_config()
    task = resolve_tasks(env_cfg, cfg.task)[0]
    out = {
        "env": cfg.env, "suite": env_cfg.resolved_suite, "task": task, "image_size": env_cfg.resolved_image_size,
        "wrist_camera": env_cfg.use_wrist_camera, "render_backend": cfg.render_backend,
        "steps_per_process": cfg.steps, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0],
        "raw": [_progress(bench_raw(env_cfg, task, w, cfg.steps, k)) for k in cfg.render_every for w in cfg.workers],
    }
    if cfg.env == "metaworld":
        out["metaworld_render"] = {k: getattr(cfg.metaworld, k) for k in
                                   ("camera", "shadow_map_size", "offscreen_samples", "shadows")}
    if cfg.engine:
        out["engine"] = [_progress(bench_engine(env_cfg, task, w, cfg.replan_steps, b)) for w in cfg.workers
                         for b in (None, 0.0)]
    return out


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(BenchConfig)), indent=2))
