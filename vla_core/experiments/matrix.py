"""`wmvla matrix`: train E0/E1/E2/E3 x heads x seeds, evaluate each in closed loop, then write the report.

    wmvla matrix --preset metaworld-gpu --dataset data/mw_mt10 --out runs/mt10 --seeds 0 1 2 --episodes 50
    wmvla matrix --preset libero-2b --dataset /data/libero --env libero --suite libero_spatial --episodes 50
    wmvla matrix --preset demo --dataset D --latents L --experiments E0 E2 --heads mse --out runs/quick

Everything lands under `--out` (RUN_ROOT), in the layout `wmvla report` reads (docs/experiments.md):

    RUN_ROOT/<E>/<tag>/seed<k>/                      training run (vla_core.train.rundir)
    RUN_ROOT/<E>/<tag>/seed<k>/eval/<step>__<env>_<suite>__mem-<mode>/   episodes.jsonl + summary.json
    RUN_ROOT/report.md, summary.json, plots/          the report

Each checkpoint is evaluated under its own rollout memory (E0 none, E1 zero, E2 pred, E3 pred); E2 also
under the ablations zero / random / shuffle (same checkpoint, same episodes). A re-run skips finished
training runs and finished evaluations and resumes unfinished ones (training from its latest checkpoint,
evaluation from the episodes already in episodes.jsonl), so an interrupted matrix is continued by
running the same command again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vla_core.train.config import EXPERIMENT_ROLLOUT_MEMORY, EXPERIMENTS, TrainConfig, get_preset
from vla_core.utils import WmvlaError, to_jsonable


@dataclass
class MatrixConfig:
    """Train and evaluate the E0-E3 x head x seed matrix, then write the report."""

    preset: str = "demo"
    """training preset (tiny | demo | metaworld-gpu | libero-2b), see `wmvla train --preset NAME --help`"""
    out: Path = Path("runs/matrix")
    """RUN_ROOT: training runs, evaluations and the report go here"""
    dataset: str = ""
    """dataset folder / hub id ("" = the preset's)"""
    latents: str = ""
    """latent cache ("" = the preset's / the default cache path)"""
    vision_cache: str = ""
    """vision-feature cache read by every cell's training (`wmvla vision-cache` with the cells' flags; a frozen
    tower only: finetune frozen_vision / lora / heads_only); "" = the tower runs live"""

    # ---- which cells
    experiments: tuple[str, ...] = EXPERIMENTS
    heads: tuple[str, ...] = ("mse", "flow")
    seeds: tuple[int, ...] = (0,)

    # ---- training overrides (None = the preset's value)
    backbone: str | None = None
    """policy backbone: hub id or local folder (e.g. /models/Qwen3-VL-2B-Instruct when the hub is unreachable)"""
    world_encoder: str | None = None
    """world encoder of the latents: hub id, local folder or "tiny" (must match the latent cache's spec)"""
    window: int | None = None
    """world encoder clip length m (must match the latent cache's spec)"""
    finetune: Literal["full", "lora", "frozen_vision", "heads_only"] | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    num_workers: int | None = None
    device: str | None = None
    no_wrist_camera: bool = False
    """train without the preset's wrist camera (for datasets that have none)"""
    norm_passthrough_dims: tuple[int, ...] | None = None
    """action dims left unnormalised (`wmvla train --norm.passthrough-dims`); None = the preset's (the last
    dim, the gripper); the flag with no value normalises every dim (a gripper outside [-1, 1])"""

    # ---- evaluation
    env: Literal["metaworld", "libero"] | None = None
    """None = metaworld for a dataset written by `wmvla data generate`, libero otherwise"""
    suite: str | None = None
    tasks: str | None = None
    """comma-separated tasks; None = the tasks of the generated dataset (metaworld) / the whole suite"""
    episodes: int = 10
    """episodes per task and condition (init indices 0..episodes-1: the same for every condition)"""
    workers: int = 2
    """environment worker processes per evaluation"""
    replan_steps: int = 5
    max_steps: int | None = None
    """episode limit (None = the dataset's / the per-task default)"""
    ablations: tuple[str, ...] = ("zero", "random", "shuffle")
    """extra rollout memories evaluated on the E2 checkpoints"""
    eval_seed: int | None = None
    """MetaWorld evaluation seed (None = 1000, disjoint from the training seed)"""
    render_backend: Literal["egl", "osmesa"] = "egl"
    policy_seed: int = 0
    """seed of the policy's sampling at rollout (flow noise, random memory)"""
    eval_threads: int | None = None
    """torch threads of the policy process during evaluation (None: 1 on CPU with >= 2 env workers, so the
    env renderers get the other cores)"""
    progress: bool = True

    # ---- steps to run
    train_only: bool = False
    report: bool = True

    def __post_init__(self) -> None:
        self.experiments = tuple(self.experiments)
        self.heads = tuple(self.heads)
        self.seeds = tuple(int(s) for s in self.seeds)
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise WmvlaError(f"--experiments: unknown {bad}; expected a subset of {list(EXPERIMENTS)}")
        bad = [h for h in self.heads if h not in ("mse", "flow")]
        if bad:
            raise WmvlaError(f"--heads: unknown {bad}; expected a subset of ['mse', 'flow']")
        bad = [m for m in self.ablations if m not in ("zero", "random", "shuffle")]
        if bad:
            raise WmvlaError(f"--ablations: unknown {bad}; expected a subset of ['zero', 'random', 'shuffle']")
        if self.episodes < 1:
            raise WmvlaError(f"--episodes must be >= 1, got {self.episodes}")


# ---------------------------------------------------------------------------------------------- plan


def base_train_config(cfg: MatrixConfig) -> TrainConfig:
    t = get_preset(cfg.preset)
    changes: dict = {"out_root": str(cfg.out), "run_dir": ""}
    if cfg.dataset:
        changes["dataset"] = cfg.dataset
    if cfg.latents:
        changes["latents"] = cfg.latents
    if cfg.vision_cache:
        changes["vision_cache"] = cfg.vision_cache
    if cfg.num_workers is not None:
        changes["num_workers"] = cfg.num_workers
    if cfg.device is not None:
        changes["device"] = cfg.device
    if cfg.no_wrist_camera:
        changes["keys"] = dataclasses.replace(t.keys, wrist_image_key=None)
    if cfg.norm_passthrough_dims is not None:
        changes["norm"] = dataclasses.replace(t.norm, passthrough_dims=cfg.norm_passthrough_dims)
    policy = {k: v for k, v in (("backbone", cfg.backbone), ("finetune", cfg.finetune)) if v is not None}
    if policy:
        changes["policy"] = dataclasses.replace(t.policy, **policy)
    world = {k: v for k, v in (("encoder", cfg.world_encoder), ("window", cfg.window)) if v is not None}
    if world:
        changes["world"] = dataclasses.replace(t.world, **world)
    optim = {k: v for k, v in (("steps", cfg.steps), ("batch_size", cfg.batch_size), ("lr", cfg.lr)) if v is not None}
    if optim:
        changes["optim"] = dataclasses.replace(t.optim, **optim)
    return dataclasses.replace(t, **changes)


def cell_config(base: TrainConfig, experiment: str, head: str, seed: int) -> TrainConfig:
    return dataclasses.replace(base, experiment=experiment, seed=seed,
                               policy=dataclasses.replace(base.policy, head=head))


def rollout_memories(experiment: str, ablations: tuple[str, ...]) -> list[str]:
    own = EXPERIMENT_ROLLOUT_MEMORY[experiment]
    return [own] + ([m for m in ablations if m != own] if experiment == "E2" else [])


@dataclass
class EvalPlan:
    env_cfg: object  # EnvConfig
    tasks: list[str]
    init_indices: list[int]


def eval_plan(cfg: MatrixConfig, dataset: str) -> EvalPlan:
    """The evaluation env: for a generated MetaWorld dataset, exactly its render/state settings (recorded in
    meta/wmvla_generation.json) with the evaluation seed; tasks default to the dataset's tasks."""
    from vla_core.envs.generate import load_generation_record
    from vla_core.envs.registry import METAWORLD_EVAL_SEED, EnvConfig, LiberoSettings, MetaWorldSettings, resolve_tasks
    from vla_core.utils import from_dict

    record = load_generation_record(dataset) if dataset and Path(dataset).exists() else None
    env = cfg.env or ("metaworld" if record is not None else "libero")
    seed = cfg.eval_seed if cfg.eval_seed is not None else METAWORLD_EVAL_SEED
    if env == "metaworld":
        if record is None:
            raise WmvlaError(
                f"metaworld evaluation needs the render/state settings the training data was made with; {dataset} "
                "has no meta/wmvla_generation.json (write MetaWorld data with `wmvla data generate metaworld`).")
        e = record["env_config"]
        env_cfg = EnvConfig(env="metaworld", suite=cfg.suite or e["suite"], image_size=e["image_size"],
                            wrist_camera=e["wrist_camera"], max_steps=cfg.max_steps or e.get("max_steps"), seed=seed,
                            render_backend=cfg.render_backend, metaworld=from_dict(MetaWorldSettings, e["metaworld"]))
        tasks = resolve_tasks(env_cfg, cfg.tasks) if cfg.tasks else list(record["per_task"])
    else:
        env_cfg = EnvConfig(env="libero", suite=cfg.suite, render_backend=cfg.render_backend,
                            libero=LiberoSettings(), seed=seed, max_steps=cfg.max_steps)
        tasks = resolve_tasks(env_cfg, cfg.tasks)
    return EvalPlan(env_cfg, tasks, list(range(cfg.episodes)))


# ---------------------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(ckpt: Path, train_cfg: TrainConfig, mode: str, plan: EvalPlan, cfg: MatrixConfig,
                        device: str) -> dict:
    """One condition: checkpoint x rollout memory -> its eval folder (skipped when already complete)."""
    from vla_core.eval.checkpoint_policy import eval_dir_for, load_checkpoint_policy
    from vla_core.eval.cli import SUMMARY_FILE, result_config, write_summary
    from vla_core.eval.engine import EngineConfig, EpisodeSpec, run_rollouts

    env_cfg = plan.env_cfg
    out = eval_dir_for(ckpt, env_cfg.env, env_cfg.resolved_suite, mode)
    n_expected = len(plan.tasks) * len(plan.init_indices)
    summary_path = out / SUMMARY_FILE
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("overall", {}).get("n") == n_expected:
            print(f"matrix: {out} already evaluated ({n_expected} episodes); skipping")
            return summary
    policy = load_checkpoint_policy(ckpt, mode, device, seed=cfg.policy_seed)
    engine = EngineConfig(workers=cfg.workers, replan_steps=cfg.replan_steps, progress=cfg.progress)
    condition = f"{train_cfg.experiment}-{train_cfg.policy.head}-{mode}"
    desc = {"kind": "checkpoint", "checkpoint": str(ckpt.resolve()), "rollout_memory": mode, "device": device,
            "seed": cfg.policy_seed}
    config = result_config(env_cfg, plan.tasks, plan.init_indices, engine, desc, condition)
    # top-level fields the report pairs and labels conditions by
    config.update(experiment=train_cfg.experiment, head=train_cfg.policy.head, seed=train_cfg.seed,
                  rollout_memory=mode, checkpoint=str(ckpt.resolve()))
    episodes = [EpisodeSpec(t, k, condition) for t in plan.tasks for k in plan.init_indices]
    t0 = time.perf_counter()
    records = run_rollouts(env_cfg, policy, episodes, out, engine, run_config=config)
    summary = write_summary(out, records, config)
    o = summary["overall"]
    print(f"matrix: {condition} seed {train_cfg.seed}: success {o['success_rate']:.1%} ({o['successes']}/{o['n']}) "
          f"in {time.perf_counter() - t0:.0f} s -> {out}")
    return summary


# ---------------------------------------------------------------------------------------------- main


def run_matrix(cfg: MatrixConfig) -> int:
    run_matrix_cells(cfg)
    return 0


def run_matrix_cells(cfg: MatrixConfig) -> dict:
    """Train + evaluate every cell, then report. Returns {"train": {...}, "eval": {...}, "report": ...}."""
    import torch

    from vla_core.train.checkpoint import resolve_checkpoint
    from vla_core.train.loop import train

    base = base_train_config(cfg)
    if not base.dataset:
        raise WmvlaError(f"preset {cfg.preset!r} names no dataset: pass --dataset PATH")
    cfg.out.mkdir(parents=True, exist_ok=True)
    plan = None if cfg.train_only else eval_plan(cfg, base.dataset)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cells = [(e, h, s) for s in cfg.seeds for h in cfg.heads for e in cfg.experiments]
    _write_plan(cfg, base, plan, cells)
    out: dict = {"train": {}, "eval": {}}
    for experiment, head, seed in cells:
        tcfg = cell_config(base, experiment, head, seed)
        name = f"{experiment}-{head}-seed{seed}"
        print(f"matrix: ===== {name} =====", flush=True)
        summary = train(tcfg)
        out["train"][name] = summary
        if plan is None:
            continue
        ckpt = resolve_checkpoint(summary["run_dir"])
        for mode in rollout_memories(experiment, cfg.ablations):
            threads = torch.get_num_threads()
            n_eval_threads = cfg.eval_threads or (1 if device == "cpu" and cfg.workers >= 2 else threads)
            torch.set_num_threads(n_eval_threads)
            try:
                out["eval"][f"{name}-{mode}"] = evaluate_checkpoint(ckpt, tcfg, mode, plan, cfg, device)
            finally:
                torch.set_num_threads(threads)
    if cfg.report and plan is not None:
        from vla_core.experiments.report import ReportConfig, run_report

        print("matrix: writing the report", flush=True)
        run_report(ReportConfig(run_root=cfg.out))
        out["report"] = str(cfg.out / "report.md")
    return out


def _write_plan(cfg: MatrixConfig, base: TrainConfig, plan: EvalPlan | None, cells: list) -> None:
    """RUN_ROOT/matrix.json: what this matrix runs (appended per invocation, never overwritten)."""
    from vla_core.utils import append_jsonl

    append_jsonl(cfg.out / "matrix_runs.jsonl", {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "matrix": to_jsonable(cfg),
        "cells": [list(c) for c in cells],
        "eval_env": to_jsonable(plan.env_cfg) if plan else None, "eval_tasks": plan.tasks if plan else None,
    })
