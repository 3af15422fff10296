"""Overhead of vla_core.telemetry on a training step: metrics on vs off, interleaved in one process.

The step is the tiny preset's real training step (random tiny Qwen3-VL policy with world memory, Prophet and
gated cross-attention, batch 4, forward + backward + clip + AdamW) on a generated LIBERO-schema dataset.
Blocks of `--block` steps alternate off / on (`--rounds` of each, the order flipped every round so drift
and other jobs' load hit both alike):

  off  the step alone
  on   the step + `job.train_record(...)` after EVERY step (the loop does it every `log_every` steps:
       this is the worst case), with the HTTP endpoint serving the registry, a scraper thread reading
       /metrics and a push to a real Pushgateway (Debian's prometheus-pushgateway on loopback, when
       installed) once per `--interval` seconds of `on` time (default 15, the pusher's interval; 1 = a
       15x stress case); scrapes and pushes happen only inside `on` blocks

Both wall time and process CPU time (all threads of the process, so the endpoint, the scraper and the
pusher count) are recorded per block; on a shared machine the CPU time is the steadier of the two.

Also measured directly: one train_record call, one push, one /metrics render; from them the expected cost
at the defaults (one record per log_every steps, one push and one scrape per 15 s).

    python benchmarks/bench_telemetry.py                  # ~1-2 min on 2 CPU cores
    python benchmarks/bench_telemetry.py --rounds 40 --interval 1   # stress: a scrape and a push every second

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pushgateway(root: Path):
    """A Pushgateway under a keeper (vla_core.keeper): it ends with this benchmark, even one killed with -9."""
    from vla_core.keeper import Kept

    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        return None, None
    port = free_port()
    proc = Kept([binary, f"--web.listen-address=127.0.0.1:{port}"], log=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise SystemExit("prometheus-pushgateway did not become ready in 30 s")


def build_step(root: Path):
    """The tiny preset's training step on generated data -> (step() -> record dict, batch size)."""
    import torch

    from vla_core.data.fixtures import make_libero_like
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.data.samples import ChunkDataset
    from vla_core.train.config import get_preset
    from vla_core.train.loop import TrainCollate, WorldLatents, build_optimizer, build_policy, prepare_run
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    ds_path = make_libero_like(root / "ds", layout="v3_png", episodes=8, image_size=32, min_length=10, max_length=16)
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), "cpu")
    cache = precompute_latents(LeRobotDataset.open(ds_path), enc, root / "lat.npy", batch_size=64,
                               log=lambda *a: None)
    cfg = dataclasses.replace(get_preset("tiny"), dataset=str(ds_path), latents=str(cache.path),
                              out_root=str(root / "runs"))
    setup = prepare_run(cfg)
    rcfg = setup.cfg
    torch.manual_seed(0)
    policy = build_policy(rcfg, setup.stats, setup.cache)
    optimizer = build_optimizer(policy, rcfg, fused=False)
    p = rcfg.policy
    train_set = ChunkDataset(setup.ds, chunk_size=p.chunk_size, history=p.world_history, horizon=p.world_horizon,
                             keys=rcfg.keys, episodes=setup.train_episodes)
    collate = TrainCollate(policy.processor, WorldLatents(str(setup.cache.path)))
    bs = rcfg.optim.batch_size
    batches = [collate([train_set[(i * bs + j) % len(train_set)] for j in range(bs)]) for i in range(8)]
    policy.train()
    state = {"i": 0}

    def step() -> dict:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        out = policy(batch)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rec = {"step": state["i"], "loss": float(out["loss"].detach()), "action_loss": float(out["action_loss"]),
               "world_loss": float(out["world_loss"]), "grad_norm": float(grad_norm), "lr": rcfg.optim.lr,
               "samples_per_s": 0.0}
        if "gate" in out:
            rec["gate"] = float(out["gate"].detach())
        return rec

    return step, bs, rcfg.log_every


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=16, help="off/on block pairs")
    ap.add_argument("--block", type=int, default=5, help="training steps per block")
    ap.add_argument("--warmup", type=int, default=10, help="steps before measuring")
    ap.add_argument("--interval", type=float, default=15.0,
                    help="seconds of `on` time between scrapes / pushes (15: the pusher's and a usual scrape interval)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared machine)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vla_core import env_names, telemetry
    from vla_core.telemetry import exposure

    root = Path(tempfile.mkdtemp(prefix="bench_telemetry_"))
    gateway, gateway_url = start_pushgateway(root)
    try:
        step, batch_size, log_every = build_step(root)
        port = free_port()
        os.environ[env_names.METRICS_PORT] = str(port)
        os.environ[env_names.METRICS_ADDR] = "127.0.0.1"
        os.environ[env_names.RUN_ID] = "bench-telemetry"
        if gateway_url:
            os.environ[env_names.PUSHGATEWAY_URL] = gateway_url
        # the pusher thread never fires on its own here: the gated thread below pushes once per second, in
        # `on` blocks only (the same Pusher.push a periodic push runs)
        job = telemetry.start_job("train", cell="bench", push_interval_s=1e9)
        on = threading.Event()
        stop = threading.Event()
        counts = {"scrapes": 0, "pushes": 0}
        clock = {"on_s": 0.0, "block_t0": None, "last": -1e9}  # cumulative wall time of `on` blocks

        def on_time() -> float:
            t0 = clock["block_t0"]
            return clock["on_s"] + (time.perf_counter() - t0 if t0 is not None else 0.0)

        def background():
            # one scrape of the endpoint and one push per `--interval` seconds of `on` time
            while not stop.is_set():
                if on.wait(0.05) and not stop.is_set() and on_time() - clock["last"] >= args.interval:
                    clock["last"] = on_time()
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                    counts["scrapes"] += 1
                    if job.push():
                        counts["pushes"] += 1
                stop.wait(0.05)

        bg = threading.Thread(target=background, daemon=True)
        bg.start()

        for _ in range(args.warmup):
            job.train_record(step())
        times = {"off": [], "on": []}
        cpu = {"off": [], "on": []}  # process CPU time (all threads: the endpoint, scraper, pusher included)
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                t0, c0 = time.perf_counter(), time.process_time()
                if mode == "on":
                    clock["block_t0"] = t0
                    on.set()
                for _ in range(args.block):
                    rec = step()
                    if mode == "on":
                        job.train_record(rec)
                times[mode].append((time.perf_counter() - t0) / args.block)
                cpu[mode].append((time.process_time() - c0) / args.block)
                if mode == "on":
                    on.clear()
                    clock["on_s"] += time.perf_counter() - t0
                    clock["block_t0"] = None
        stop.set()
        on.set()
        bg.join(timeout=10)

        # direct costs of each piece
        rec = step()
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            job.train_record(rec)
        record_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(50):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        scrape_ms = (time.perf_counter() - t0) / 50 * 1e3
        push_ms = None
        if gateway_url:
            t0 = time.perf_counter()
            for _ in range(50):
                job.push()
            push_ms = (time.perf_counter() - t0) / 50 * 1e3
        job.close()
        telemetry.shutdown()
    finally:
        if gateway is not None:
            gateway.stop()
        shutil.rmtree(root, ignore_errors=True)

    off_ms = statistics.median(times["off"]) * 1e3
    on_ms = statistics.median(times["on"]) * 1e3
    pairs = [b / a for a, b in zip(times["off"], times["on"])]
    cpu_pairs = [b / a for a, b in zip(cpu["off"], cpu["on"])]
    # expected share of wall time at the defaults: one record per log_every steps; one push and one scrape
    # (rendering /metrics in this process) per 15 s
    default_share = (record_us / 1e3 / log_every) / off_ms + ((push_ms or 0.0) + scrape_ms) / 15_000
    out = {
        "device": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "torch": torch.__version__, "torch_threads": args.threads, "load_average": os.getloadavg(),
        "batch_size": batch_size, "rounds": args.rounds, "block_steps": args.block, "interval_s": args.interval,
        "step_ms_off_median": round(off_ms, 2), "step_ms_on_median": round(on_ms, 2),
        "ratio_on_over_off_medians": round(on_ms / off_ms, 4),
        "ratio_paired_blocks_median": round(statistics.median(pairs), 4),
        "ratio_paired_blocks_quartiles": [round(q, 4) for q in statistics.quantiles(pairs, n=4)],
        "cpu_ms_off_median": round(statistics.median(cpu["off"]) * 1e3, 2),
        "cpu_ms_on_median": round(statistics.median(cpu["on"]) * 1e3, 2),
        "cpu_ratio_on_over_off_sums": round(sum(cpu["on"]) / sum(cpu["off"]), 4),
        "cpu_ratio_paired_blocks_median": round(statistics.median(cpu_pairs), 4),
        "cpu_ratio_paired_blocks_quartiles": [round(q, 4) for q in statistics.quantiles(cpu_pairs, n=4)],
        "scrapes_during_on_blocks": counts["scrapes"], "pushes_during_on_blocks": counts["pushes"],
        "pushgateway": bool(gateway_url), "push_failures": exposure.push_counts["failures"],
        "train_record_us": round(record_us, 2), "push_ms": round(push_ms, 3) if push_ms is not None else None,
        "scrape_ms": round(scrape_ms, 3), "log_every_default": log_every,
        "expected_overhead_at_defaults": round(default_share, 6),
        "train_record_share_of_step_every_step": round(record_us / 1e3 / off_ms, 6),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
