"""DataLoader throughput over a LeRobot dataset: samples/s of ChunkDataset batches (decoding in workers).

    python benchmarks/bench_loader.py                                   # 256 px LIBERO-like fixture, v3 PNG
    python benchmarks/bench_loader.py --layout v3_mp4 --workers 0 2 4
    python benchmarks/bench_loader.py --dataset /data/libero --batches 50  # a real dataset

Prints one JSON line per worker count, e.g.
{"bench": "loader", "layout": "v3_png", "image_size": 256, "workers": 2, "batch_size": 32, "samples_per_s": ...}
Batches are drawn in random order (shuffle=True), as in training; the first batch (worker start-up) is
timed separately and excluded from samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from vla_core.data.fixtures import LAYOUTS, make_libero_like
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.data.samples import ChunkDataset, collate_samples


def bench(ds: LeRobotDataset, keys: DatasetKeys, workers: int, batch_size: int, batches: int, chunk_size: int,
          history: int, horizon: int, seed: int = 0) -> dict:
    cds = ChunkDataset(ds, chunk_size=chunk_size, history=history, horizon=horizon, keys=keys)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(cds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate_samples, generator=g, drop_last=True,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        n += len(b["task"])
    elapsed = time.perf_counter() - t1
    return {"workers": workers, "batch_size": batch_size, "batches": batches, "samples": n,
            "first_batch_s": round(first, 3), "samples_per_s": round(n / elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="benchmark this dataset (path or hub id) instead of a generated fixture")
    p.add_argument("--layout", default="v3_png", choices=LAYOUTS)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--history", type=int, default=4)
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--no-wrist", action="store_true", help="agent-view camera only")
    p.add_argument("--flat", action="store_true", help="flat-colour fixture images (unrealistically cheap PNGs)")
    args = p.parse_args()
    keys = DatasetKeys(wrist_image_key=None) if args.no_wrist else DatasetKeys()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset:
            source, layout = args.dataset, "given"
        else:
            source, layout = os.path.join(tmp, "fixture"), args.layout
            t0 = time.perf_counter()
            make_libero_like(source, layout=layout, episodes=args.episodes, image_size=args.image_size,
                             min_length=40, max_length=80, texture=not args.flat)
            size_mb = sum(f.stat().st_size for f in Path(source).rglob("*") if f.is_file()) / 2**20
            print(f"# fixture {layout} {args.image_size}px written in {time.perf_counter() - t0:.1f}s, "
                  f"{size_mb:.1f} MB", flush=True)
        t0 = time.perf_counter()
        ds = LeRobotDataset.open(source, keys=keys)
        open_s = time.perf_counter() - t0
        for w in args.workers:
            r = bench(ds, keys, w, args.batch_size, args.batches, args.chunk_size, args.history, args.horizon)
            print(json.dumps({"bench": "loader", "layout": layout, "version": ds.version,
                              "image_size": int(ds.features[keys.image_key]["shape"][0]),
                              "cameras": len(keys.camera_keys), "frames": ds.num_frames,
                              "open_s": round(open_s, 3), "cpu_count": os.cpu_count(), **r}), flush=True)


if __name__ == "__main__":
    main()
