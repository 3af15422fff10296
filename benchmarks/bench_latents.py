"""Latent precompute throughput: end to end (decode + preprocess + encoder + cache write) vs the encoder alone.

    python benchmarks/bench_latents.py --device cuda --model vitl            # V-JEPA 2 ViT-L shapes, random weights
    python benchmarks/bench_latents.py --device cuda --model vitg
    python benchmarks/bench_latents.py --device cpu --model tiny --frames 600

Both numbers come from the same run and the same encoder object:
- encoder alone: `WorldEncoder.encode_preprocessed` on pre-made preprocessed clips already on the device;
- end to end: `vla_core.world.cache.precompute_latents` over a LIBERO-like fixture dataset it generates
  (256 px frames, episodes of ~150 steps), DataLoader workers decoding, per-frame preprocessing on the
  device, ClipBuffer clips, fp16 memmap writes, the final NaN scan and statistics; wall clock from the call
  to its return, worker start-up included.
The goal is end to end >= 80 % of encoder alone. Prints one JSON line (last line of stdout).

Needs only torch, transformers, numpy, pyarrow, av and pillow (+ this repo's src/ on the path, added below).
Random weights: the throughput of V-JEPA 2 does not depend on the weight values. The fixture's synthetic
images compress and decode faster than real LIBERO PNGs; pass --dataset PATH to measure on real data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vla_core.world.cache import _BlockReader, precompute_latents  # noqa: E402
from vla_core.world.encoder import WorldEncoder, WorldEncoderSpec, build_world_encoder  # noqa: E402

# V-JEPA 2 encoder shapes (facebook/vjepa2-vitl-fpc64-256 and -vitg-fpc64-256; vit_giant_xformers in the
# original code: 1408 wide, 40 layers, 22 heads, MLP ratio 48/11). The predictor is kept small: it is
# skipped at inference (skip_predictor=True) and only costs memory.
SHAPES = {
    "vitl": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4.0),
    "vitg": dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_ratio=48 / 11),
}


def random_vjepa2_encoder(model: str, window: int, device: torch.device, precision: str) -> WorldEncoder:
    """A WorldEncoder with V-JEPA 2 shapes and random weights, built directly on the device (fast init)."""
    from transformers import VJEPA2Config, VJEPA2Model

    if model == "tiny":
        return build_world_encoder(WorldEncoderSpec(encoder="tiny", window=window, precision=precision), device)
    config = VJEPA2Config(crop_size=256, pred_num_hidden_layers=1, **SHAPES[model])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        net = VJEPA2Model(config)
    net = net.to(dtype).eval().requires_grad_(False)
    spec = WorldEncoderSpec(encoder=f"random-{model}", revision="random", window=window, image_size=256,
                            dim=config.hidden_size, precision=precision)
    return WorldEncoder(spec, net, device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def encoder_alone(enc: WorldEncoder, batch: int, iters: int, warmup: int = 3) -> float:
    s = int(enc.spec.image_size)
    x = torch.randn(batch, enc.spec.window, 3, s, s, device=enc.device).to(enc.compute_dtype)
    for _ in range(warmup):
        enc.encode_preprocessed(x)
    _sync(enc.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        z = enc.encode_preprocessed(x)
    z.cpu()
    return batch * iters / (time.perf_counter() - t0)


def decode_only(ds, camera: str, workers: int, block: int, max_frames: int) -> float:
    """Frames/s the DataLoader workers deliver with no encoder behind them."""
    ranges = [(e.start, e.start + e.length) for e in ds.episodes]
    blocks = [(i, a, min(a + block, b)) for i, (s, b) in enumerate(ranges) for a in range(s, b, block)]
    loader = torch.utils.data.DataLoader(_BlockReader(ds, blocks, camera), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    t0, n = time.perf_counter(), 0
    for _, a, b, _frames in loader:
        n += int(b) - int(a)
        if n >= max_frames:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["tiny", "vitl", "vitg"], default=None, help="default: vitl on cuda, tiny on cpu")
    ap.add_argument("--frames", type=int, default=None, help="fixture size (default 8192 on cuda, 600 on cpu)")
    ap.add_argument("--dataset", default=None, help="benchmark on this LeRobot dataset instead of a fixture")
    ap.add_argument("--layout", default="v3_png", choices=["v3_png", "v3_mp4"], help="fixture storage (LIBERO: png)")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20, help="encoder-alone timed iterations")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()

    device = torch.device(args.device)
    model = args.model or ("vitl" if device.type == "cuda" else "tiny")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    frames = args.frames or (8192 if device.type == "cuda" else 600)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    from vla_core.data.fixtures import make_libero_like
    from vla_core.data.lerobot import LeRobotDataset

    with tempfile.TemporaryDirectory(prefix="bench_latents_") as tmp:
        t0 = time.perf_counter()
        if args.dataset:
            ds = LeRobotDataset.open(args.dataset)
        else:
            episodes = max(2, round(frames / 150))
            root = make_libero_like(Path(tmp) / "fixture", layout=args.layout, episodes=episodes, image_size=256,
                                    min_length=140, max_length=160, seed=0)
            ds = LeRobotDataset.open(root)
        fixture_s = time.perf_counter() - t0
        camera = "observation.images.image"

        enc = random_vjepa2_encoder(model, args.window, device, precision)
        alone = encoder_alone(enc, args.batch_size, args.iters)
        decode = decode_only(ds, camera, args.workers, args.block_size, max_frames=min(ds.num_frames, 4096))

        out = Path(tmp) / "cache" / "lat.fp16.npy"
        _sync(device)
        t0 = time.perf_counter()
        cache = precompute_latents(ds, enc, out, batch_size=args.batch_size, num_workers=args.workers,
                                   block_size=args.block_size, log=lambda *a: None)
        _sync(device)
        e2e_s = time.perf_counter() - t0
        e2e = ds.num_frames / e2e_s
        assert cache.num_rows == ds.num_frames

    result = {
        "bench": "latents", "model": model, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision, "window": args.window, "batch_size": args.batch_size, "workers": args.workers,
        "block_size": args.block_size, "frames": ds.num_frames, "episodes": ds.num_episodes,
        "layout": None if args.dataset else args.layout, "dataset": args.dataset,
        "encoder_alone_clips_per_s": round(alone, 1), "end_to_end_clips_per_s": round(e2e, 1),
        "ratio": round(e2e / alone, 3), "decode_only_frames_per_s": round(decode, 1),
        "end_to_end_seconds": round(e2e_s, 2), "fixture_seconds": round(fixture_s, 1),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
