"""GPU check of the platform hooks in the training loop: a tiny policy trained on CUDA (bf16 autocast) with
its metrics served over HTTP (WMVLA_METRICS_PORT, scraped here while it runs and after) and its checkpoints
mirrored to a results store (TrainConfig.remote, a local-folder store); the same command on an empty run
folder then finds the finished run in the store instead of training again. Prints one JSON object. The CPU tests cover the same paths on CPU; this checks what only a
GPU has: the peak-GPU-memory metric, and CUDA training through the same hooks.

    python benchmarks/check_gpu_platform.py --steps 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    """The wmvla_train_* samples of the endpoint (name{labels} value lines, labels dropped)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("wmvla_train_"):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name] = value
    return out


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cuda", help="cuda (the point of it); cpu to try the script itself")
    args = ap.parse_args()

    import torch

    assert args.device == "cpu" or torch.cuda.is_available(), "this check needs a CUDA GPU"
    port = _free_port()
    os.environ["WMVLA_METRICS_PORT"] = str(port)
    os.environ["WMVLA_METRICS_ADDR"] = "127.0.0.1"
    os.environ["WMVLA_RUN_ID"] = "gpu-check"

    from vla_core.data.fixtures import make_libero_like
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.train.config import get_preset
    from vla_core.train.loop import train
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    root = Path(tempfile.mkdtemp(prefix="wmvla_gpu_check_"))
    ds_path = make_libero_like(root / "ds", layout="v3_png", episodes=8, image_size=32, min_length=10, max_length=16)
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), args.device)
    cache = precompute_latents(LeRobotDataset.open(ds_path), enc, root / "lat.npy", batch_size=64, log=lambda *a: None)

    base = get_preset("tiny")
    store = root / "store"
    half = max(2, args.steps // 2)

    def config(out_root: Path, steps: int):
        return dataclasses.replace(base, dataset=str(ds_path), latents=str(cache.path), out_root=str(out_root),
                                   device=args.device, optim=dataclasses.replace(base.optim, steps=steps),
                                   log_every=1, val_every=0, ckpt_every=half, mean_baseline_check="off",
                                   remote=str(store / "cell"))

    scraped_during: list[dict] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                scraped_during.append(_scrape(port))
            except OSError:
                pass  # the endpoint starts with the job
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    first = train(config(root / "runs_a", args.steps))  # checkpoints at `half` and at the end, uploaded
    done.set()
    poller.join()
    t_first = time.perf_counter() - t0
    after = _scrape(port)

    # a "lost pod": the run folder is gone; the same command on an empty folder finds the run in the store
    shutil.rmtree(root / "runs_a")
    t0 = time.perf_counter()
    second = train(config(root / "runs_b", args.steps))
    t_second = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu",
        "torch": torch.__version__,
        "first_run": {"finished": first.get("finished"), "wall_s": round(t_first, 1)},
        "scrapes_during_run": len(scraped_during),
        "step_seen_during_run": max((s.get("wmvla_train_step", 0) for s in scraped_during), default=None),
        "metrics_after_first_run": {k: after.get(k) for k in ("wmvla_train_step", "wmvla_train_loss",
                                                              "wmvla_train_gate", "wmvla_train_gpu_memory_bytes")},
        "store_objects": sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())[:12],
        "rerun_on_empty_folder": {"finished": second.get("finished"), "step": second.get("step"),
                                  "wall_s": round(t_second, 1)},
    }
    gpu_ok = args.device == "cpu" or after.get("wmvla_train_gpu_memory_bytes", 0) > 0
    ok = (gpu_ok and after.get("wmvla_train_step") == args.steps and first.get("finished")
          and second.get("finished") and second.get("step") == args.steps)
    result["ok"] = bool(ok)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
