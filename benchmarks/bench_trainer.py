"""The trainer's own step: `wmvla train`'s loop (vla_core.train.loop.train) on the default cell's settings, against
the idealised step of benchmarks/bench_train.py (`ours_compiled`) in the same process.

bench_train.py times forward, backward and the update on one batch already on the GPU. A training run also
loads a batch every step (DataLoader workers decode the frames and run the processor: resize, prompt), moves it
to the GPU, splits micro-batches, clips, updates the EMA, logs and checks. This script measures what a run
gets: the preset libero-2b (Qwen3-VL-2B shapes with random weights, full fine-tuning, batch 32, EMA 0.999,
grad clip, compiled blocks, the memory plan for this GPU) trained for `--steps` steps on a generated
LIBERO-schema dataset (two 256 px cameras, resized to 224 px by the processor as in training) with tiny world
latents (the world encoder's cost is not the training step's). The step time is the median over the
train log's windows (`log_every` steps each, their `samples_per_s`), the first window (compilation) left out.
Then `bench_train.bench_ours` times the idealised step with the same backbone folder; the ratio of the two is
what the loop adds.

    python3 benchmarks/bench_trainer.py --steps 40 --log-every 5      # on the GPU machine (2B shapes)
    python3 benchmarks/bench_trainer.py --tiny                         # CPU smoke test (tests/test_train_bench.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the random backbone and the idealised step)


def train_config(preset: str, folder: str, dataset: str, latents: str, out_root: str, steps: int, log_every: int,
                 tiny: bool, image_px: int):
    """The preset's run on the random backbone, with the benchmark's data; nothing else changed (on a CPU: fp32,
    no compile, no loader workers)."""
    from vla_core.train.config import get_preset
    from vla_core.world.encoder import WorldEncoderSpec

    cfg = get_preset(preset)
    policy = dataclasses.replace(cfg.policy, backbone=folder, image_size=image_px)
    changes = dict(dataset=dataset, latents=latents, out_root=out_root, world=WorldEncoderSpec(
        encoder="tiny", window=cfg.world.window, image_size=32), log_every=log_every, val_every=0,
        ckpt_every=10 * steps, mean_baseline_check="off", progress=False,
        optim=dataclasses.replace(cfg.optim, steps=steps, warmup_steps=min(cfg.optim.warmup_steps, steps // 2)))
    if tiny:
        policy = dataclasses.replace(policy, autocast_bf16=False, frozen_dtype="float32")
        changes.update(compile=False, num_workers=0, device="cpu",
                       optim=dataclasses.replace(changes["optim"], batch_size=4))
    return dataclasses.replace(cfg, policy=policy, **changes)


def trainer_step(cfg) -> dict:
    """Run the loop; the step time from its log windows (the first, which compiles, left out)."""
    from vla_core.train.loop import train
    from vla_core.utils import read_jsonl

    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    rows = read_jsonl(Path(summary["run_dir"]) / "train_log.jsonl")
    rates = [r["samples_per_s"] for r in rows[1:]] or [r["samples_per_s"] for r in rows]
    sps = statistics.median(rates)
    batch = cfg.optim.batch_size * cfg.optim.grad_accum
    return {"steps": summary["step"], "windows": len(rows), "samples_per_s_per_window": [round(r, 2) for r in rates],
            "samples_per_s": round(sps, 2), "ms_per_step": round(batch / sps * 1e3, 2),
            "first_window_samples_per_s": round(rows[0]["samples_per_s"], 2) if rows else None,
            "wall_s_with_setup_and_final_checkpoint": round(wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--preset", default="libero-2b")
    ap.add_argument("--steps", type=int, default=None, help="default 40 (6 with --tiny)")
    ap.add_argument("--log-every", type=int, default=None, help="default 5 (2 with --tiny)")
    ap.add_argument("--episodes", type=int, default=None, help="dataset episodes, default 40 (6 with --tiny)")
    ap.add_argument("--no-ideal", action="store_true", help="skip bench_train's idealised step")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    tiny = args.tiny
    steps = args.steps or (6 if tiny else 40)
    log_every = args.log_every or (2 if tiny else 5)
    episodes = args.episodes or (6 if tiny else 40)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")

    from vla_core.data.fixtures import make_libero_like
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    tmp = tempfile.TemporaryDirectory(prefix="wmvla_bench_trainer_")
    root = Path(tmp.name)
    t0 = time.perf_counter()
    folder = root / "backbone"
    bench_train.save_random_backbone(bench_train.with_tokenizer_ids(bench_train.qwen3_vl_config(tiny)), folder)
    data_px, image_px = (32, 64) if tiny else (256, 224)  # LIBERO's frames are 256 px; the policy sees 224
    ds_path = make_libero_like(root / "ds", layout="v3_mp4", episodes=episodes, image_size=data_px,
                               min_length=20 if tiny else 60, max_length=30 if tiny else 120, texture=True)
    from vla_core.train.config import get_preset

    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=get_preset(args.preset).world.window,
                                               image_size=32), device.type)
    ds = LeRobotDataset.open(ds_path)
    cache = precompute_latents(ds, enc, root / "lat.npy", batch_size=256, log=lambda *a: None)
    del enc
    setup_s = time.perf_counter() - t0
    cfg = train_config(args.preset, str(folder), str(ds_path), str(cache.path), str(root / "runs"), steps, log_every,
                       tiny, image_px)
    result: dict = {
        "preset": args.preset, "shapes": "tiny" if tiny else "Qwen3-VL-2B", "device": (
            torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch": cfg.optim.batch_size,
        "episodes": episodes, "frames": ds.num_frames, "setup_s": round(setup_s, 1),
    }
    result["trainer"] = trainer_step(cfg)
    print(f"[trainer] {result['trainer']}", file=sys.stderr, flush=True)
    if not args.no_ideal:
        bench_train._free(device)
        ideal = bench_train.bench_ours(str(folder), cfg.optim.batch_size, image_px, cfg.policy.chunk_size,
                                       cfg.policy.finetune, device, warmup=2, iters=5, world_dim=cache.dim,
                                       compile_=cfg.compile)
        result["ideal_step_ms"] = round(ideal["sec"] * 1e3, 2)
        result["trainer_over_ideal"] = round(result["trainer"]["ms_per_step"] / result["ideal_step_ms"], 3)
        print(f"[ideal] {result['ideal_step_ms']} ms", file=sys.stderr, flush=True)
    tmp.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
