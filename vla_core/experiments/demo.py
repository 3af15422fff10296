"""`wmvla demo`: the whole study, offline, on a CPU machine, in 4-6 minutes on 2 cores (the budget is 15).

    wmvla demo                      # a fresh folder ./wmvla-demo-<date>-<time>
    wmvla demo --out runs/demo      # the same folder again resumes / reuses every finished part

Steps (each resumable and skipped when already done):
  1. data      MetaWorld scripted experts on a few easy tasks -> LeRobot v3.0 dataset (64 px agent view, the
               full 39-d MetaWorld observation as state)                                   DIR/data
  2. latents   the tiny world encoder (seeded random V-JEPA 2 weights, m = 4)              DIR/cache
  3. train     E0 / E1 / E2 / E3 with the tiny Qwen3-VL backbone (preset "demo")         DIR/<E>/<tag>/seed0
  4. evaluate  closed loop on the same tasks at the evaluation seed (start states disjoint from the
               data), E2 also with rollout memory zero / random / shuffle               .../seed0/eval/*
  5. report    DIR/report.md, DIR/summary.json (per condition success_rate, n, ci95; the verdict), plots

What this demonstrates: the pipeline end to end, with policies that really solve the tasks. What it does
not: whether world memory helps. The tiny world encoder has random weights, so its latents are random
features of the frames; the verdict printed here is about this toy setting only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vla_core.utils import WmvlaError, atomic_write_json


@dataclass
class DemoConfig:
    """Offline benchmark: MetaWorld data -> latents -> E0-E3 training -> closed-loop eval -> report."""

    out: Path | None = None
    """output folder; None = a fresh ./wmvla-demo-<date>-<time>. An existing demo folder is resumed."""
    tasks: str = "button-press-topdown,drawer-close,window-open"
    """MetaWorld tasks (easy ones: the expert succeeds on all 50 configurations)"""
    train_episodes: int = 20
    """expert demonstrations per task"""
    eval_episodes: int = 15
    """closed-loop episodes per task and condition"""
    steps: int = 300
    """training steps per experiment (batch 32)"""
    experiments: tuple[str, ...] = ("E0", "E1", "E2", "E3")
    heads: tuple[str, ...] = ("mse",)
    seed: int = 0
    image_size: int = 64
    """render resolution of the dataset and the evaluation"""
    workers: int = 2
    """environment processes for data generation and evaluation"""
    render_backend: Literal["egl", "osmesa"] = "egl"
    progress: bool = True


def _default_out() -> Path:
    return Path(f"wmvla-demo-{time.strftime('%Y%m%d-%H%M%S')}")


def run_demo(cfg: DemoConfig) -> int:
    run_demo_steps(cfg)
    return 0


def run_demo_steps(cfg: DemoConfig) -> dict:
    from vla_core.envs.generate import GenerateConfig, load_generation_record, run_generate
    from vla_core.experiments.matrix import MatrixConfig, run_matrix_cells
    from vla_core.world.cache import LatentsConfig, LatentCache, cache_filename, run_latents
    from vla_core.world.encoder import WorldEncoderSpec

    out = Path(cfg.out) if cfg.out is not None else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "demo.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"config": None, "timings_s": {}}
    from vla_core.utils import to_jsonable

    if record["config"] is not None and record["config"] != to_jsonable(cfg) | {"out": record["config"]["out"]}:
        raise WmvlaError(f"{out} holds a demo made with other settings ({record_path}); use another --out")
    record["config"] = to_jsonable(cfg) | {"out": str(out)}
    timings = record["timings_s"]
    t_all = time.perf_counter()
    print(f"demo: output folder {out.resolve()}", flush=True)

    def phase(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0 + timings.get(name, 0.0), 1)
        atomic_write_json(record_path, record)

    # 1. data
    data = out / "data"
    if load_generation_record(data) is None:
        print("demo: [1/5] generating expert demonstrations", flush=True)
        phase("data", lambda: run_generate(GenerateConfig(
            env="metaworld", out=data, tasks=cfg.tasks, episodes=cfg.train_episodes, workers=cfg.workers,
            image_size=cfg.image_size, render_backend=cfg.render_backend, overwrite=data.exists())))
    else:
        print(f"demo: [1/5] dataset {data} exists", flush=True)

    # 2. latents (the demo preset's world encoder spec)
    from vla_core.train.config import get_preset

    preset = get_preset("demo")
    spec: WorldEncoderSpec = preset.world
    latents = out / "cache" / cache_filename(spec)
    try:
        LatentCache.open(latents, expect=spec, check_finite=False)
        print(f"demo: [2/5] latents {latents} exist", flush=True)
    except WmvlaError:
        print("demo: [2/5] world latents (tiny encoder)", flush=True)
        phase("latents", lambda: run_latents(LatentsConfig(
            dataset=str(data), encoder=spec.encoder, window=spec.window, image_size=spec.image_size,
            camera_key=spec.camera_key, out=out / "cache", num_workers=0, device="cpu")))

    # 3-5. train, evaluate, report
    print("demo: [3-5/5] training, closed-loop evaluation and the report", flush=True)
    matrix = MatrixConfig(preset="demo", out=out, dataset=str(data), latents=str(latents),
                          experiments=cfg.experiments, heads=cfg.heads, seeds=(cfg.seed,), steps=cfg.steps,
                          episodes=cfg.eval_episodes, workers=cfg.workers, render_backend=cfg.render_backend,
                          progress=cfg.progress, device="cpu")
    result: dict = {}
    phase("matrix", lambda: result.update(run_matrix_cells(matrix)))
    timings["total_this_session"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(record_path, record)

    summary_path, report_path = out / "summary.json", out / "report.md"
    if not summary_path.exists():
        raise WmvlaError(f"the report was not written ({summary_path} missing); see the messages above")
    summary = json.loads(summary_path.read_text())
    print_demo_table(summary)
    print(f"\ndemo: report  {report_path.resolve()}\ndemo: summary {summary_path.resolve()}\n"
          f"demo: time    {timings['total_this_session'] / 60:.1f} min this session ({timings})")
    print("demo: note: the tiny world encoder has random weights; this shows the pipeline working, not whether "
          "world memory helps (run the GPU presets for that).")
    return summary


def print_demo_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="closed-loop success (Wilson 95 % CI)")
    for col in ("condition", "success", "k/n", "95% CI"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for name, c in summary.get("conditions", {}).items():
        lo, hi = c["ci95"]
        table.add_row(name, f"{c['success_rate']:.1%}", f"{c['successes']}/{c['n']}", f"[{lo:.1%}, {hi:.1%}]")
    console = Console()
    console.print(table)
    verdict = summary.get("verdict") or {}
    if verdict:
        console.print(f"verdict: {verdict.get('overall')}: {verdict.get('sentence')}")
