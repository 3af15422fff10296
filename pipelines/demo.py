"""`wmvla demo`: the Kubeflow pipeline of a cluster run, run on this machine, offline, on 2 CPU cores.

    wmvla demo                              # a fresh folder ./wmvla-demo-<date>-<time>
    wmvla demo --out runs/demo              # the same folder again resumes (finished cells are skipped)
    wmvla demo --store s3://bucket/prefix   # results in any S3 store (AWS_* variables) instead of the embedded one

Exactly the compiled pipelines/matrix.yaml (the file a cluster gets, checked by the KFP backend's rules first)
through kfp.local (each task a subprocess of this Python), with the offline
MetaWorld benchmark's arguments: scripted-expert data on three easy tasks (64 px), the tiny world encoder
(random V-JEPA 2 weights, m = 4), the tiny Qwen3-VL policy (preset "demo"), the four cells E0 / E2 x
MSE / flow, closed-loop evaluation at the evaluation seed (E2 also with zero / random / shuffled memory),
and the report. The results store is an embedded SeaweedFS S3 server (data in DIR/s3, stopped at the end,
also when the demo is killed: vla_core.keeper; a killed demo resumes with the same command):
the tasks publish to s3://wmvla-demo/runs/demo as pods on a cluster would, and the demo pulls the run back
with the storage API (`wmvla results pull`) into DIR/results, as a researcher would, and prints its table.

What it shows: the pipeline end to end with policies that solve the tasks. Not whether world memory
helps: the tiny encoder's latents are random features (that needs the GPU presets).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vla_core.experiments.cells import DEFAULT_CELLS
from vla_core.utils import WmvlaError

BUCKET = "wmvla-demo"
RUN_NAME = "demo"


@dataclass
class DemoConfig:
    """Offline benchmark through the Kubeflow pipeline (kfp.local): MetaWorld data -> latents -> E0/E2 x
    MSE/flow training -> closed-loop evaluation -> report, published to an S3 store and pulled back."""

    out: Path | None = None
    """output folder; None = a fresh ./wmvla-demo-<date>-<time>. An existing demo folder is resumed."""
    store: str = ""
    """results store: "" = an embedded SeaweedFS S3 server with its data in OUT/s3; or s3://bucket/prefix of
    any S3 store (credentials and endpoint from the AWS_* variables)"""
    tasks: str = "button-press-topdown,drawer-close,window-open"
    """MetaWorld tasks (easy ones: the expert succeeds on all 50 configurations)"""
    train_episodes: int = 20
    """expert demonstrations per task"""
    eval_episodes: int = 15
    """closed-loop episodes per task and condition"""
    steps: int = 300
    """training steps per cell (batch 32)"""
    cells: tuple[str, ...] = DEFAULT_CELLS
    seed: int = 0
    workers: int = 2
    """environment processes for data generation and evaluation"""
    render_backend: Literal["egl", "osmesa"] = "egl"


def pipeline_arguments(cfg: DemoConfig, results_uri: str, workdir: Path) -> dict:
    """The demo's arguments of pipelines/matrix.py (everything else keeps the pipeline's default)."""
    return dict(
        dataset="metaworld", results_uri=results_uri, run_name=RUN_NAME, preset="demo", cells=list(cfg.cells),
        seeds=[cfg.seed], steps=cfg.steps, eval_env="", eval_suite="", episodes=cfg.eval_episodes,
        workers=cfg.workers, metaworld_tasks=cfg.tasks, metaworld_episodes=cfg.train_episodes, image_size=64,
        device="cpu", render_backend=cfg.render_backend, workdir=str(workdir.resolve()))


def run_demo(cfg: DemoConfig) -> int:
    run_demo_steps(cfg)
    return 0


def run_demo_steps(cfg: DemoConfig) -> dict:
    from vla_core.experiments.report import print_console_table
    from vla_core.storage import pull_run

    from pipelines.cli import run_local

    out = Path(cfg.out) if cfg.out is not None else Path(f"wmvla-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"demo: output folder {out.resolve()}", flush=True)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cfg.store:
            if not cfg.store.startswith("s3://"):
                raise WmvlaError(f"--store {cfg.store!r}: expected s3://bucket/prefix (or nothing: the embedded store)")
            results_uri = cfg.store.rstrip("/")
        else:
            results_uri = _embedded_store(stack, out / "s3")
        print(f"demo: results store {results_uri}; running pipelines/matrix.yaml through kfp.local", flush=True)
        run_local(pipeline_arguments(cfg, results_uri, out / "work"), out / "kfp")
        run = f"{results_uri}/{RUN_NAME}"
        print(f"demo: pulling {run} -> {out / 'results'} (wmvla results pull)", flush=True)
        pulled = pull_run(run, out / "results")
    minutes = (time.perf_counter() - t0) / 60
    summary = json.loads((out / "results" / "summary.json").read_text())
    print_console_table(summary)
    print(f"\ndemo: report  {(out / 'results' / 'report.md').resolve()}  ({pulled['files']} files verified "
          f"against the run's manifest)\ndemo: time    {minutes:.1f} min")
    print("demo: note: the tiny world encoder has random weights; this shows the pipeline working, not whether "
          "world memory helps (run the GPU presets for that).")
    return summary


def _embedded_store(stack: contextlib.ExitStack, data_dir: Path) -> str:
    """Starts SeaweedFS (stopped when the stack closes) and points this process and its kfp.local tasks at it."""
    from vla_core.storage.seaweed import SeaweedFS

    s3 = stack.enter_context(SeaweedFS(data_dir))
    s3.create_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())  # the tasks are subprocesses: they inherit the endpoint and keys

    def restore() -> None:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    stack.callback(restore)
    return f"s3://{BUCKET}/runs"
