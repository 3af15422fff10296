"""`wmvla data generate metaworld`: scripted-expert demonstrations -> a LeRobot v3.0 dataset.

    wmvla data generate metaworld --tasks reach,push,pick-place --episodes 50 --out data/mw_core

The experts run through the same `MetaWorldEnv` adapter (same cameras, render settings and state layout)
that evaluation uses. Only successful episodes are kept; each stops `steps_after_success` steps after its
first success. Initial conditions: attempt j of a task uses configuration j % 50 of MetaWorld seed
`seed + j // 50` (MT1 draws 50 configurations per seed). The default training seed (0) differs from the
evaluation seed (1000, `wmvla eval`'s default for every condition), and generation refuses to use the
evaluation seed, so no evaluation start state is ever in the training data. Every episode records its
seed and configuration index (meta/episodes columns `metaworld_seed`, `init_index`).

Episodes are generated in worker processes (one env each, created inside the worker) and written in a
fixed order (task by task, attempt by attempt), so the dataset does not depend on the number of workers.
The settings are also saved to meta/wmvla_generation.json.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from vla_core.envs.registry import (
    METAWORLD_CONFIGS_PER_SEED,
    METAWORLD_EVAL_SEED,
    METAWORLD_TRAIN_SEED,
    EnvConfig,
    MetaWorldSettings,
    configure_gl,
    describe_env,
    resolve_tasks,
)
from vla_core.utils import WmvlaError, atomic_write_json, to_jsonable

GENERATION_FILE = "meta/wmvla_generation.json"


@dataclass
class GenerateConfig:
    """Write a LeRobot v3.0 dataset of scripted-expert demonstrations."""

    env: tyro.conf.Positional[Literal["metaworld"]]
    """benchmark with scripted experts (only metaworld has them)."""
    out: Path
    """dataset folder to create."""
    tasks: str | None = None
    """comma-separated task names (the -v3 suffix may be omitted) or indices; None = the whole suite."""
    suite: str | None = None
    """task suite for --tasks indices / the default task list: mt50 (default), mt10, core5."""
    episodes: int = 50
    """successful episodes per task."""
    seed: int = METAWORLD_TRAIN_SEED
    """first MetaWorld seed; attempt j uses configuration j % 50 of seed `seed + j // 50`."""
    eval_seed: int = METAWORLD_EVAL_SEED
    """the evaluation seed, which generation refuses to use (keeps train and eval start states disjoint)."""
    max_attempts_per_task: int | None = None
    """stop trying a task after this many episodes; None = 2 * episodes + 10."""
    steps_after_success: int = 5
    """expert steps recorded after the first success (real actions for chunks that reach past success)."""
    action_noise: float = 0.0
    """std of Gaussian noise added to the expert's actions (recorded action = executed action)."""
    workers: int = 2
    """worker processes; 0 = in this process."""
    image_size: int | None = None
    """render resolution (None = 128); evaluation must use the same."""
    wrist_camera: bool = False
    """also record MetaWorld's second camera as observation.images.image2."""
    max_steps: int | None = None
    """episode limit (None = the per-task default used by evaluation too)."""
    render_backend: Literal["egl", "osmesa"] = "egl"
    metaworld: MetaWorldSettings = field(default_factory=MetaWorldSettings)
    image_storage: Literal["png", "video"] = "png"
    """png: lossless, bit-identical to what evaluation renders; video: mp4, ~10x smaller, lossy."""
    overwrite: bool = False
    """replace an existing dataset at --out."""

    def env_config(self) -> EnvConfig:
        return EnvConfig(env="metaworld", suite=self.suite, image_size=self.image_size,
                         wrist_camera=self.wrist_camera, max_steps=self.max_steps, seed=self.seed,
                         render_backend=self.render_backend, metaworld=self.metaworld)


# ------------------------------------------------------------------------------------------ workers

_WORKER_ENV: dict[str, Any] = {}


def _init_worker(backend: str, lp_threads: int) -> None:
    os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = backend
    os.environ.setdefault("LP_NUM_THREADS", str(lp_threads))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _get_env(env_cfg: EnvConfig, task: str):
    """One env per process, rebuilt when the task or seed changes."""
    from vla_core.envs.metaworld_env import MetaWorldEnv

    key = (task, env_cfg)
    if _WORKER_ENV.get("key") != key:
        if _WORKER_ENV.get("env") is not None:
            _WORKER_ENV["env"].close()
        _WORKER_ENV["env"] = MetaWorldEnv(env_cfg, task, end_on_success=False)
        _WORKER_ENV["key"] = key
    return _WORKER_ENV["env"]


def run_expert_episode(env_cfg: EnvConfig, task: str, init_index: int, steps_after_success: int,
                       action_noise: float, noise_seed: list[int]) -> dict:
    """One expert episode (seed = env_cfg.seed). Returns success info and, if successful, the frames."""
    env = _get_env(env_cfg, task)
    rng = np.random.default_rng(noise_seed)
    obs = env.reset(init_index)
    images: dict[str, list[np.ndarray]] = {k: [] for k in env.camera_keys}
    states, raws, actions = [], [], []
    success_step = None
    while True:
        action = env.expert_action()
        if action_noise > 0:
            action = action + rng.normal(0.0, action_noise, size=action.shape).astype(np.float32)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        for k in env.camera_keys:
            images[k].append(obs["images"][k])
        states.append(obs["state"])
        raws.append(obs["extras"]["metaworld_obs"].astype(np.float32))
        actions.append(action)
        res = env.step(action)
        if res.success and success_step is None:
            success_step = len(actions)
        if success_step is not None and len(actions) >= success_step + steps_after_success:
            break
        if res.done:
            break
        obs = res.observation
    out = {"task": task, "seed": env_cfg.seed, "init_index": init_index, "success_step": success_step,
           "steps": len(actions), "fps": env.fps, "instruction": env.instruction}
    if success_step is not None:
        frames = {k: np.stack(v) for k, v in images.items()}
        frames["observation.state"] = np.stack(states)
        frames["observation.environment_state"] = np.stack(raws)
        frames["action"] = np.stack(actions)
        out["frames"] = frames
    return out


def _job(args: tuple) -> dict:
    return run_expert_episode(*args)


# --------------------------------------------------------------------------------------------- main


def dataset_features(env_cfg: EnvConfig) -> dict:
    from vla_core.envs.metaworld_env import RAW_OBS_NAMES, state_names
    from vla_core.envs.registry import camera_keys

    size = env_cfg.resolved_image_size
    features = {k: {"dtype": "image", "shape": [size, size, 3], "names": ["height", "width", "channels"]}
                for k in camera_keys(env_cfg)}
    names = state_names(env_cfg.metaworld.state)
    features["observation.state"] = {"dtype": "float32", "shape": [len(names)], "names": names}
    features["observation.environment_state"] = {"dtype": "float32", "shape": [len(RAW_OBS_NAMES)],
                                                 "names": list(RAW_OBS_NAMES)}
    features["action"] = {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "gripper"]}
    return features


def _attempt_jobs(cfg: GenerateConfig, env_cfg: EnvConfig, task: str, task_idx: int, attempts: range) -> list:
    jobs = []
    for j in attempts:
        seed = cfg.seed + j // METAWORLD_CONFIGS_PER_SEED
        jobs.append((replace(env_cfg, seed=seed), task, j % METAWORLD_CONFIGS_PER_SEED, cfg.steps_after_success,
                     cfg.action_noise, [cfg.seed, task_idx, j]))
    return jobs


def run_generate(cfg: GenerateConfig) -> int:
    if cfg.env != "metaworld":
        raise WmvlaError(f"only metaworld has scripted experts, got {cfg.env!r}")
    if cfg.episodes < 1:
        raise WmvlaError(f"--episodes must be >= 1, got {cfg.episodes}")
    env_cfg = cfg.env_config()
    tasks = resolve_tasks(env_cfg, cfg.tasks)
    max_attempts = cfg.max_attempts_per_task or 2 * cfg.episodes + 10
    if max_attempts < cfg.episodes:
        raise WmvlaError(f"--max-attempts-per-task ({max_attempts}) < --episodes ({cfg.episodes})")
    seeds = range(cfg.seed, cfg.seed + (max_attempts - 1) // METAWORLD_CONFIGS_PER_SEED + 1)
    if cfg.eval_seed in seeds:
        raise WmvlaError(
            f"generation would use MetaWorld seeds {seeds.start}..{seeds.stop - 1}, which include the evaluation "
            f"seed {cfg.eval_seed}: training and evaluation start states would overlap. "
            f"Use another --seed (default {METAWORLD_TRAIN_SEED}) or --eval-seed.")

    from vla_core.data.writer import LeRobotV3Writer
    from vla_core.envs.metaworld_env import METAWORLD_FPS

    features = dataset_features(env_cfg)
    writer = LeRobotV3Writer(cfg.out, fps=METAWORLD_FPS, features=features, robot_type="sawyer",
                             image_storage=cfg.image_storage, overwrite=cfg.overwrite)
    pool = None
    if cfg.workers > 0:
        lp_threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker,
                                            initargs=(cfg.render_backend, lp_threads))
    else:
        configure_gl(cfg.render_backend)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    per_task: dict[str, dict] = {}
    seeds_used: set[int] = set()
    fps = None
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as bar:
            job_bar = bar.add_task("generate", total=len(tasks) * cfg.episodes)
            for task_idx, task in enumerate(tasks):
                kept, attempt, steps = 0, 0, []
                bar.update(job_bar, description=f"generate {task}")
                while kept < cfg.episodes and attempt < max_attempts:
                    # a few spare attempts per round so that one failure does not cost a whole extra round
                    n = min(cfg.episodes - kept + max(1, cfg.workers), max_attempts - attempt)
                    jobs = _attempt_jobs(cfg, env_cfg, task, task_idx, range(attempt, attempt + n))
                    attempt += n
                    results = pool.imap(_job, jobs) if pool else map(_job, jobs)
                    for res in results:
                        if kept >= cfg.episodes or res["success_step"] is None:
                            continue
                        fps = res["fps"]
                        writer.add_episode(res["instruction"], res["frames"], {
                            "metaworld_task": task, "metaworld_seed": int(res["seed"]),
                            "init_index": int(res["init_index"]), "success_step": int(res["success_step"]),
                            "action_noise": float(cfg.action_noise)})
                        seeds_used.add(int(res["seed"]))
                        steps.append(res["steps"])
                        kept += 1
                        bar.update(job_bar, advance=1)
                per_task[task] = {"episodes": kept, "attempts": attempt, "mean_length": float(np.mean(steps)) if steps else None}
        if fps is None:
            raise WmvlaError("the expert succeeded in no episode; nothing to write")
        if fps != METAWORLD_FPS:  # the writer's timestamps assume MetaWorld's control rate
            raise WmvlaError(f"MetaWorld runs at {fps} Hz, expected {METAWORLD_FPS}; this metaworld version differs")
        root = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if cfg.workers == 0 and _WORKER_ENV.get("env") is not None:
            _WORKER_ENV.pop("env").close()
            _WORKER_ENV.pop("key", None)

    short = {t: v for t, v in per_task.items() if v["episodes"] < cfg.episodes}
    record = {
        "generator": "wmvla data generate metaworld",
        "config": to_jsonable(cfg),
        "env_config": describe_env(env_cfg, tasks),
        "seeds_used": sorted(seeds_used),
        "eval_seed_excluded": cfg.eval_seed,
        "per_task": per_task,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(Path(root) / GENERATION_FILE, record)
    total = sum(v["episodes"] for v in per_task.values())
    print(f"wrote {total} episodes of {len(tasks)} task(s) to {root} in {record['wall_s']} s")
    if short:
        print(f"warning: fewer successful episodes than asked for: "
              + ", ".join(f"{t} {v['episodes']}/{cfg.episodes}" for t, v in short.items()))
    return 0


def load_generation_record(dataset_root: str | os.PathLike) -> dict | None:
    """meta/wmvla_generation.json of a generated dataset (None for other datasets).

    Its "env_config" holds the env settings (camera, image size, state mode, render settings) that an
    evaluation of a policy trained on this dataset must reuse, and "seeds_used" the training seeds.
    """
    import json

    path = Path(dataset_root) / GENERATION_FILE
    return json.loads(path.read_text()) if path.exists() else None
