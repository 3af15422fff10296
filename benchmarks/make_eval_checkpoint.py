"""A LIBERO policy checkpoint with random weights, for timing `wmvla eval` with a real-sized policy in the loop.

    python benchmarks/make_eval_checkpoint.py --out /tmp/ckpt_2b                  # GPU: the libero-2b preset's shapes
    python benchmarks/make_eval_checkpoint.py --out /tmp/ckpt_tiny --shapes tiny  # seconds on a CPU (smoke test)
    wmvla eval --env libero --suite libero_spatial --checkpoint /tmp/ckpt_2b/run ...

`--shapes 2b` (default) writes, with random weights and no download:
  - a Qwen3-VL-2B-shaped backbone folder (benchmarks/bench_train.py's `save_random_backbone`: text 2048 x 28
    layers, vision 1024 x 24, the offline tokenizer), used as `policy.backbone`;
  - for E1-E3, a V-JEPA 2 ViT-L-shaped world encoder folder (1024 x 24 layers, 256 px crops;
    benchmarks/bench_latents.py's shapes), used as the world encoder spec's `encoder`;
  - a checkpoint of the `libero-2b` training preset (full fine-tuning, fp32 weights + bf16 autocast, chunk 8,
    agent view + wrist at 224 px, state 8, action 7, world memory m=4, T=K=4) for the chosen experiment,
    through the same `save_checkpoint` training uses.
`--shapes tiny` does the same with the tiny backbone and tiny world encoder (the `tiny` preset's policy with
LIBERO's camera keys and dimensions). A random policy never succeeds, so every episode runs to max_steps: the
worst case for evaluation time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train / bench_latents helpers


def random_vjepa2_folder(folder: Path, model: str, device: torch.device) -> None:
    from transformers import VJEPA2Config, VJEPA2Model

    from bench_latents import SHAPES

    config = VJEPA2Config(crop_size=256, pred_num_hidden_layers=1, **SHAPES[model])
    torch.manual_seed(0)
    with torch.device(device):
        net = VJEPA2Model(config)
    net.to(torch.bfloat16).save_pretrained(folder)


def libero_stats(state_dim: int = 8, action_dim: int = 7) -> dict:
    """Normalisation statistics shaped like LIBERO's (state mean/std, action quantiles, gripper passthrough)."""
    from vla_core.data.normalize import feature_stats

    rng = np.random.default_rng(0)
    action = np.clip(rng.normal(scale=0.4, size=(4096, action_dim)), -1, 1)
    action[:, -1] = np.sign(action[:, -1] + 1e-9)
    return {"observation.state": feature_stats(rng.normal(size=(4096, state_dim)), "observation.state"),
            "action": feature_stats(action, "action", mode="quantile", passthrough_dims=(action_dim - 1,))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the backbone, encoder and run/checkpoints")
    ap.add_argument("--shapes", choices=["2b", "tiny"], default="2b")
    ap.add_argument("--experiment", choices=["E0", "E1", "E2", "E3"], default="E2")
    ap.add_argument("--world-model", choices=["vitl", "vitg"], default="vitl", help="world encoder shapes (2b)")
    args = ap.parse_args(argv)

    from vla_core.policy.config import tiny_policy_config
    from vla_core.policy.modeling import VLAPolicy
    from vla_core.train.checkpoint import save_checkpoint
    from vla_core.train.config import DatasetKeys, get_preset
    from vla_core.utils import to_jsonable
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings = {}
    if args.shapes == "2b":
        from bench_train import qwen3_vl_config, save_random_backbone, with_tokenizer_ids

        cfg = get_preset("libero-2b")
        backbone = out / "backbone_qwen3vl_2b_random"
        if not (backbone / "config.json").exists():
            save_random_backbone(with_tokenizer_ids(qwen3_vl_config(False)), str(backbone))
        timings["backbone_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        policy_cfg = dataclasses.replace(cfg.policy, backbone=str(backbone))
        world = WorldEncoderSpec()
        if args.experiment != "E0":
            enc_dir = out / f"vjepa2_{args.world_model}_random"
            if not (enc_dir / "config.json").exists():
                random_vjepa2_folder(enc_dir, args.world_model, device)
            world = dataclasses.replace(cfg.world, encoder=str(enc_dir))
        timings["world_encoder_s"] = round(time.perf_counter() - t1, 1)
    else:
        cfg = get_preset("tiny")
        policy_cfg = tiny_policy_config(state_dim=8, action_dim=7, image_size=64, chunk_size=8,
                                        camera_keys=DatasetKeys().camera_keys)
        world = dataclasses.replace(cfg.world, image_size=64)
    cfg = dataclasses.replace(cfg, experiment=args.experiment, policy=policy_cfg, world=world, device="auto",
                              dataset="(none: random weights for timing, benchmarks/make_eval_checkpoint.py)")
    world_record = {"spec": None, "latents": None, "uses_memory": cfg.policy.has_memory}
    if args.experiment != "E0":
        # the resolved spec (local-folder fingerprint, dim, image size, precision), as a latent cache records it
        t1 = time.perf_counter()
        world_record["spec"] = build_world_encoder(cfg.world, device).spec.to_dict()
        spec = WorldEncoderSpec.from_dict(world_record["spec"])
        cfg = dataclasses.replace(cfg, world=spec, policy=dataclasses.replace(cfg.policy, world_dim=spec.dim))
        timings["world_spec_s"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    stats = libero_stats(cfg.policy.state_dim, cfg.policy.action_dim)
    policy = VLAPolicy(cfg.policy, stats)
    timings["policy_build_s"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    ckpt = save_checkpoint(out / "run", 0, model=policy, config=to_jsonable(cfg), stats=stats, tokenizer=policy.tokenizer, world=world_record,
                           extra_meta={"experiment": cfg.experiment, "random_weights": True})
    timings["save_s"] = round(time.perf_counter() - t1, 1)
    n_params = sum(p.numel() for p in policy.parameters())
    result = {"checkpoint": str(ckpt), "run": str(out / "run"), "shapes": args.shapes, "experiment": cfg.experiment,
              "policy_params": n_params, "backbone": cfg.policy.backbone, "world_encoder": cfg.world.encoder
              if cfg.policy.has_memory else None, "finetune": cfg.policy.finetune, "chunk_size": cfg.policy.chunk_size,
              "image_size": cfg.policy.image_size, "timings": timings | {"total_s": round(time.perf_counter() - t0, 1)}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
