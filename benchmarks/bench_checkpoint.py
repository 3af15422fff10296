"""The training step's stall per checkpoint with `TrainConfig.remote`: upload in the step vs in the background
(issue 24), the real training loop on CPU against a real SeaweedFS, both in the same run.

The tiny policy is widened (--hidden, --layers, --intermediate) so that one checkpoint (model + EMA + optimizer
state, 16 bytes per trained parameter, as at 2B) is ~1/150 of the libero-2b checkpoint's ~35 GB; the script
prints the exact scale. Rounds alternate `sync` (vla_core.train.remote.BACKGROUND_UPLOADS = False: the upload
inside the step, the behaviour before issue 24) and `background`, each a fresh run of --steps steps with a
checkpoint every --ckpt-every steps (log_every 1).

Per run, from train_log.jsonl's elapsed_s: the step time of every step; the stall of a checkpoint = the time
of the step that follows it (the save happens between the two log records) minus the run's median step time.
The final checkpoint is not counted (the run ends by waiting for its upload in both modes); the total wall
time is reported too. Optionally --latency-ms puts a latency-injecting proxy (vla_core.storage.netproxy)
between training and the store.

    python benchmarks/bench_checkpoint.py                    # a few minutes on 2 CPU cores
    python benchmarks/bench_checkpoint.py --rounds 3 --latency-ms 15
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

CKPT_2B_GB = 34.8  # libero-2b: 2.17e9 trained values x (fp32 weights 4 + fp32 EMA 4 + Adam m, v 8) bytes


def _q(xs):
    xs = sorted(xs)
    if len(xs) < 2:
        return [round(xs[0], 3)] * 3 if xs else []
    q = statistics.quantiles(xs, n=4)
    return [round(q[0], 3), round(statistics.median(xs), 3), round(q[2], 3)]


def widened_tiny_config(tmp: Path, hidden: int, layers: int, intermediate: int, steps: int, ckpt_every: int):
    """The tiny preset on a small LIBERO-like dataset, its backbone widened so that a checkpoint has a
    measurable size; EMA on (as libero-2b), log every step, keep one checkpoint."""
    from vla_core.data.fixtures import make_libero_like
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.policy.config import TinyBackboneConfig
    from vla_core.train.config import OptimConfig, get_preset
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    ds_path = make_libero_like(tmp / "ds", layout="v3_png", episodes=8, image_size=32, min_length=10, max_length=16)
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), "cpu")
    cache = precompute_latents(LeRobotDataset.open(ds_path), enc, tmp / "lat.npy", batch_size=64, log=lambda *a: None)
    base = get_preset("tiny")
    tiny = TinyBackboneConfig(hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=4,
                              intermediate_size=intermediate)
    return dataclasses.replace(
        base, dataset=str(ds_path), latents=str(cache.path), policy=dataclasses.replace(base.policy, tiny=tiny),
        optim=OptimConfig(steps=steps, batch_size=4, lr=1e-4, warmup_steps=1, ema_decay=0.99),
        log_every=1, ckpt_every=ckpt_every, val_every=0, keep_checkpoints=1, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--ckpt-every", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")

    import torch

    torch.set_num_threads(1)
    from vla_core import env_names
    from vla_core.storage.netproxy import LatencyProxy
    from vla_core.storage.seaweed import SeaweedFS
    from vla_core.train import remote as remote_mod
    from vla_core.train.loop import train
    from vla_core.utils import read_jsonl

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp_s, SeaweedFS(Path(tmp_s) / "s3") as server:
        tmp = Path(tmp_s)
        os.environ.update(server.env())
        bucket = server.create_bucket("ckpt")
        proxy = LatencyProxy(server.port, delay_s=args.latency_ms / 1000).start() if args.latency_ms else None
        if proxy:
            os.environ[env_names.AWS_ENDPOINT_URL] = proxy.endpoint
        base = widened_tiny_config(tmp, args.hidden, args.layers, args.intermediate, args.steps, args.ckpt_every)

        runs = []
        for r in range(args.rounds):
            for mode in (("sync", "background") if r % 2 == 0 else ("background", "sync")):
                remote_mod.BACKGROUND_UPLOADS = mode == "background"
                out = tmp / f"run-{r}-{mode}"
                cfg = dataclasses.replace(base, out_root=str(out), remote=f"{bucket}/{r}-{mode}")
                t = time.perf_counter()
                summary = train(cfg)
                wall = time.perf_counter() - t
                log = read_jsonl(Path(summary["run_dir"]) / "train_log.jsonl")
                el = [0.0] + [rec["elapsed_s"] for rec in log]
                dt = [b - a for a, b in zip(el, el[1:])]  # dt[i] = time of step i + 1 (incl. what ran before it)
                median = statistics.median(dt[1:])  # step 1 pays the warm-up
                after_ckpt = [s for s in range(args.ckpt_every, args.steps, args.ckpt_every)]  # not the final one
                stalls = [dt[s] - median for s in after_ckpt]  # dt[s] = step s + 1, right after checkpoint s
                ckpt = Path(summary["run_dir"]) / "checkpoints" / f"step_{args.steps:07d}"
                size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
                runs.append({"round": r, "mode": mode, "wall_s": round(wall, 2), "median_step_s": round(median, 3),
                             "stall_s": [round(s, 3) for s in stalls], "checkpoint_mb": round(size / 1e6, 1)})
                print(json.dumps(runs[-1]), flush=True)
        remote_mod.BACKGROUND_UPLOADS = True
        if proxy:
            proxy.close()

    def pick(mode, key):
        return [x for run in runs if run["mode"] == mode for x in (run[key] if isinstance(run[key], list)
                                                                   else [run[key]])]

    ckpt_mb = runs[0]["checkpoint_mb"]
    sync_stall, bg_stall = _q(pick("sync", "stall_s")), _q(pick("background", "stall_s"))
    result = {
        "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(), "latency_ms": args.latency_ms,
        "checkpoint_mb": ckpt_mb, "scale_vs_2b": f"1/{round(CKPT_2B_GB * 1000 / ckpt_mb)}",
        "steps": args.steps, "ckpt_every": args.ckpt_every, "rounds": args.rounds,
        "stall_per_checkpoint_s_q1_median_q3": {"sync": sync_stall, "background": bg_stall},
        "median_step_s": {"sync": _q(pick("sync", "median_step_s"))[1],
                          "background": _q(pick("background", "median_step_s"))[1]},
        "wall_s_median": {"sync": _q(pick("sync", "wall_s"))[1], "background": _q(pick("background", "wall_s"))[1]},
        "stall_ratio_background_over_sync": round(bg_stall[1] / sync_stall[1], 3) if sync_stall[1] > 0 else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
