"""LIBERO adapter cost per process: physics vs rendering, reset modes; prints JSON.

    MUJOCO_GL=egl python benchmarks/bench_libero.py --suite libero_spatial --steps 100
    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa python benchmarks/bench_libero.py --render-backend osmesa

One env (256 px, both cameras unless --no-wrist-camera), random actions, episodes restarted when they end.
Timed modes: every step rendered (closed loop, one policy call per step); no step rendered (physics only);
every `replan_steps`-th step rendered (action chunks whose inner steps' images nobody reads:
`LiberoEnv.step(a, render=False)`). For each: wall steps/s and CPU seconds per step of this process (all its
threads, llvmpipe's included): on a shared machine the CPU time is the steadier number, 1/cpu_s_per_step is
the rate on an otherwise idle core. Also times reset (soft and hard) and env creation. The rates of N
worker processes: benchmarks/bench_envs.py --env libero.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro


@dataclass
class Config:
    suite: str = "libero_spatial"
    task: str = "0"
    steps: int = 100
    """timed steps per mode."""
    image_size: int = 256
    wrist_camera: bool = True
    replan_steps: int = 5
    resets: int = 3
    render_backend: str = "egl"


def _timed(fn, n: int) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return time.perf_counter() - w0, time.process_time() - c0


def main(cfg: Config) -> dict:
    from vla_core.envs.registry import EnvConfig, LiberoSettings, configure_gl, make_env, resolve_tasks

    configure_gl(cfg.render_backend)
    load_before = os.getloadavg()
    env_cfg = EnvConfig(env="libero", suite=cfg.suite, image_size=cfg.image_size, wrist_camera=cfg.wrist_camera,
                        render_backend=cfg.render_backend)
    task = resolve_tasks(env_cfg, cfg.task)[0]
    t0 = time.perf_counter()
    env = make_env(env_cfg, task)
    create_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (cfg.steps, 7))
    state = {"init": 0}

    def step(render_every: int):
        def fn(i: int) -> None:
            res = env.step(actions[i], render=render_every > 0 and (i + 1) % render_every == 0)
            if res.done:
                state["init"] = (state["init"] + 1) % env.num_init_states
                env.reset(state["init"])
        return fn

    out: dict = {"suite": cfg.suite, "task": task, "image_size": cfg.image_size,
                 "cameras": list(env.camera_keys), "render_backend": cfg.render_backend,
                 "create_s": round(create_s, 2)}
    modes = {"render_every_step": 1, "physics_only": 0, f"render_every_{cfg.replan_steps}_steps": cfg.replan_steps}
    for name, every in modes.items():
        env.reset(0)
        wall, cpu = _timed(step(every), cfg.steps)
        out[name] = {"steps_per_s": round(cfg.steps / wall, 2), "cpu_s_per_step": round(cpu / cfg.steps, 4),
                     "steps_per_s_idle_core": round(cfg.steps / cpu, 2)}
    wall, cpu = _timed(lambda i: env.reset(i % env.num_init_states), cfg.resets)
    out["reset_soft_s"] = {"wall": round(wall / cfg.resets, 2), "cpu": round(cpu / cfg.resets, 2)}
    env.close()
    hard = make_env(EnvConfig(env="libero", suite=cfg.suite, image_size=cfg.image_size,
                              wrist_camera=cfg.wrist_camera, render_backend=cfg.render_backend,
                              libero=LiberoSettings(reset_mode="hard")), task)
    wall, cpu = _timed(lambda i: hard.reset(i % hard.num_init_states), cfg.resets)
    out["reset_hard_s"] = {"wall": round(wall / cfg.resets, 2), "cpu": round(cpu / cfg.resets, 2)}
    hard.close()
    out.update(cpu_count=os.cpu_count(), loadavg_before=[round(x, 2) for x in load_before],
               loadavg_after=[round(x, 2) for x in os.getloadavg()], platform=platform.platform(),
               python=sys.version.split()[0])
    return out


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Config)), indent=2))
