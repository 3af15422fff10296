"""The matrix through the Kubeflow pipeline (kfp.local) vs the in-process `wmvla matrix`, same cells, same run.

    python benchmarks/bench_pipeline.py --out /tmp/bench-pipeline            # the demo's four cells, 2 cores
    python benchmarks/bench_pipeline.py --out /tmp/bp --steps 40 --episodes 2 # a quick check

Both sides start from the same generated MetaWorld dataset and latents (made once, outside the timing),
train and evaluate the same cells (E0/E2 x MSE/flow, E2 with the ablations) with the demo preset, and
write the report. The pipeline side writes to a local-folder results store (so the ratio is kfp.local's
process-per-task overhead and the store copies, not an S3 server's speed). Prints one JSON line with
both wall times and the ratio pipeline / in-process (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=15, help="closed-loop episodes per task and condition")
    ap.add_argument("--cells", nargs="+", default=["E0-mse", "E2-mse", "E0-flow", "E2-flow"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from pipelines.cli import run_local
    from pipelines.demo import DemoConfig
    from vla_core.experiments import cells
    from vla_core.experiments.matrix import MatrixConfig, run_matrix_cells

    demo = DemoConfig()
    if args.out.exists():
        shutil.rmtree(args.out)
    results, work = args.out / "results", args.out / "work"
    # shared inputs, made once and outside both timings
    dataset = cells.prepare_dataset("metaworld", str(results), str(work), tasks=demo.tasks, episodes=demo.train_episodes,
                                    image_size=64, workers=args.workers)
    latents = cells.cache_latents("demo", "", 0, dataset, str(results), str(work))
    local_ds = cells.local_dataset(dataset, str(work), "inprocess")
    settings = cells.matrix_settings("demo", steps=args.steps, episodes=args.episodes, workers=args.workers,
                                     device="cpu")
    npy = cells.local_latents(latents, settings, str(work))

    experiments = sorted({c.split("-")[0] for c in args.cells})
    heads = sorted({c.split("-")[1] for c in args.cells})
    assert len(args.cells) == len(experiments) * len(heads), "--cells must be a full experiments x heads grid"
    t0 = time.perf_counter()
    run_matrix_cells(MatrixConfig(preset="demo", out=args.out / "inprocess", dataset=str(local_ds), latents=str(npy),
                                  experiments=tuple(experiments), heads=tuple(heads), seeds=(0,), steps=args.steps,
                                  episodes=args.episodes, workers=args.workers, device="cpu", progress=False))
    t_inprocess = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_local(dict(dataset="metaworld", results_uri=str(results), run_name="bench", preset="demo", cells=args.cells,
                   seeds=[0], steps=args.steps, eval_env="", eval_suite="", episodes=args.episodes,
                   workers=args.workers, metaworld_tasks=demo.tasks, metaworld_episodes=demo.train_episodes,
                   image_size=64, device="cpu", workdir=str(work)), args.out / "kfp")
    t_pipeline = time.perf_counter() - t0

    a = json.loads((args.out / "inprocess" / "summary.json").read_text())["conditions"]
    b = json.loads((results / "bench" / "summary.json").read_text())["conditions"]
    print(json.dumps({
        "cells": args.cells, "steps": args.steps, "episodes_per_task": args.episodes,
        "inprocess_s": round(t_inprocess, 1), "pipeline_s": round(t_pipeline, 1),
        "ratio_pipeline_over_inprocess": round(t_pipeline / t_inprocess, 3),
        "success_inprocess": {k: v["success_rate"] for k, v in a.items()},
        "success_pipeline": {k: v["success_rate"] for k, v in b.items()},
    }))


if __name__ == "__main__":
    main()
