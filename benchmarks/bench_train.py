"""Training throughput: our VLAPolicy step vs the plain Hugging Face step of the same Qwen3-VL model.

Random weights, no downloads: the Qwen3-VL-2B shapes are rebuilt in code with `Qwen3VLConfig` (text: hidden
2048, 28 layers, 16 heads / 8 KV heads, MLP 6144; vision: 24 layers x 1024, patch 16, 2x2 merge, DeepStack
from vision layers 5/11/17). Every step sees, per sample, a 224 px agent view + a 224 px wrist view
(2 x 49 merged vision tokens), a ~32-token prompt and 8 <ACT> tokens; batch 32.

Measured in the same process, one after the other, for `full` fine-tuning and `frozen_vision`:
  hf_bf16      Qwen3VLForConditionalGeneration with bf16 weights, forward on the same inputs, MSE on the
               last hidden states of the 8 ACT positions through a linear head, fused AdamW
               (the "plain HF step" of REFERENCE.md: 73 samples/s full, 115 frozen vision on an H100)
  hf_autocast  the same with fp32 weights + bf16 autocast (the precision policy our trainer enforces:
               trainable weights and optimizer state fp32)
  ours         wmvla's VLAPolicy.forward(batch) -> loss (memory "pred" with the Prophet and the
               gated cross-attention, MSE head), fp32 trainable weights + bf16 autocast, fused AdamW;
               the same random weights, saved to a temporary folder and loaded as `policy.backbone`
Prints one JSON object: samples/s and ms/step of each, and ours / hf ratios.

    python benchmarks/bench_train.py                 # on the GPU machine (2B shapes)
    python benchmarks/bench_train.py --tiny          # seconds on a CPU: smoke test of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time

import torch


# ---------------------------------------------------------------------------------------- configs


def qwen3_vl_config(tiny: bool):
    """Qwen3VLConfig with the 2B shapes (or a tiny version for the smoke test)."""
    from transformers import Qwen3VLConfig

    if tiny:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                          "mrope_section": [2, 3, 3],
                                                                          "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0, 1, 2])
    else:
        text = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                      deepstack_visual_indexes=[5, 11, 17])
    text.update(vocab_size=2048 if tiny else 151936, tie_word_embeddings=True, use_cache=False, rms_norm_eps=1e-6, hidden_act="silu")
    vision.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    return cfg


# ------------------------------------------------------------------------------------------ inputs


def hf_inputs(cfg, batch: int, image_px: int, n_images: int, prompt_tokens: int, n_act: int, act_token_id: int,
              device) -> dict:
    """Processor-shaped inputs for `batch` samples: [prompt | (<vision_start> image <vision_end>) x n | ACT x n_act]."""
    v = cfg.vision_config
    grid = image_px // v.patch_size  # patches per side
    merged = (grid // v.spatial_merge_size) ** 2  # LLM tokens per image
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    ids = []
    for _ in range(batch):
        # ordinary text ids above the offline tokenizer's few hundred (special tokens, ACT rows)
        seq = torch.randint(1000, cfg.text_config.vocab_size - 1, (prompt_tokens,), generator=g).tolist()
        for _ in range(n_images):
            seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * merged + [cfg.vision_end_token_id]
        seq += [act_token_id] * n_act
        ids.append(seq)
    input_ids = torch.tensor(ids, device=device)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == cfg.image_token_id).int(),
        pixel_values=torch.randn(batch * n_images * grid * grid, patch_dim, generator=g).to(device),
        image_grid_thw=torch.tensor([[1, grid, grid]] * (batch * n_images), device=device),
    )


# ------------------------------------------------------------------------------------------- steps


def _timeit(step, warmup: int, iters: int, device) -> float:
    """Seconds per step (median of `iters` after `warmup`)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench_hf(cfg, inputs: dict, act_token_id: int, action_dim: int, chunk: int, finetune: str, weights: str,
             device, warmup: int, iters: int) -> float:
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    model.train()
    if finetune == "frozen_vision":
        model.model.visual.requires_grad_(False)
    head = torch.nn.Linear(cfg.text_config.hidden_size, chunk * action_dim // 8 + 1).to(device, dtype)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    act_mask = inputs["input_ids"] == act_token_id
    b = inputs["input_ids"].shape[0]
    target = torch.randn(b, int(act_mask[0].sum()), head.out_features, device=device, dtype=dtype)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if weights == "fp32_autocast"
                else contextlib.nullcontext())

    def step():
        with autocast:
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            h = out.hidden_states[-1][act_mask].view(b, -1, cfg.text_config.hidden_size)
            loss = torch.nn.functional.mse_loss(head(h).float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timeit(step, warmup, iters, device)
    del model, opt, head
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sec


def save_random_backbone(cfg, folder) -> None:
    """Write a random-init Qwen3-VL (bf16) + the offline tokenizer to `folder`, so VLAPolicy can load it like a
    hub checkpoint. The tokenizer's special-token ids are written into the config (the vocabulary size stays
    151936, so the embedding matrix has the real size)."""
    from transformers import Qwen3VLForConditionalGeneration

    from vla_core.policy.backbone import build_tiny_tokenizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init of 2B parameters is ~10x faster on the GPU
        model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    tok = build_tiny_tokenizer()
    tok.save_pretrained(folder)


def with_tokenizer_ids(cfg):
    """Qwen3VLConfig whose image/video/vision-start/end ids are those of the offline tokenizer."""
    from vla_core.policy.backbone import IMAGE_PAD, VIDEO_PAD, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg.image_token_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    cfg.video_token_id = tok.convert_tokens_to_ids(VIDEO_PAD)
    cfg.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    cfg.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
    return cfg


def bench_ours(folder: str, batch: int, image_px: int, n_act: int, finetune: str, device, warmup: int, iters: int,
               world_dim: int) -> tuple[float, int]:
    """One VLAPolicy training step: forward(batch) -> loss (memory pred: Prophet + gated cross-attention, MSE head),
    backward, fused AdamW over the fp32 trainable weights. Returns (seconds per step, sequence length)."""
    import numpy as np

    from vla_core.data.normalize import feature_stats
    from vla_core.policy.config import PolicyConfig
    from vla_core.policy.modeling import VLAPolicy

    rng = np.random.default_rng(0)
    state_dim, action_dim, T, K = 8, 7, 4, 4
    stats = {"observation.state": feature_stats(rng.normal(size=(1000, state_dim)), "observation.state"),
             "action": feature_stats(np.clip(rng.normal(size=(1000, action_dim)), -1, 1), "action", mode="quantile",
                                     passthrough_dims=(action_dim - 1,))}
    pcfg = PolicyConfig(backbone=folder, image_size=image_px, chunk_size=n_act, state_dim=state_dim,
                        action_dim=action_dim, memory="pred", world_dim=world_dim, world_history=T, world_horizon=K,
                        head="mse", finetune=finetune, autocast_bf16=device.type == "cuda",
                        frozen_dtype="bfloat16" if device.type == "cuda" else "float32",
                        attn_implementation="sdpa")
    policy = VLAPolicy(pcfg, stats).to(device).train()
    # ~32 text tokens around the images, as in the plain HF inputs
    task = "pick up the black bowl between the plate and the small cup and place it on the plate"
    raw = {
        "images": rng.integers(0, 256, size=(batch, 2, image_px, image_px, 3), dtype=np.uint8),
        "state": rng.normal(size=(batch, state_dim)).astype(np.float32),
        "task": [task] * batch,
        "actions": np.clip(rng.normal(size=(batch, n_act, action_dim)), -1, 1).astype(np.float32),
        "action_mask": np.ones((batch, n_act), dtype=bool),
        "world_history": rng.normal(size=(batch, T, world_dim)).astype(np.float32),
        "world_future": rng.normal(size=(batch, K, world_dim)).astype(np.float32),
        "future_mask": np.ones((batch, K), dtype=bool),
    }
    inputs = policy.prepare(raw)  # processed once, on the device: the step measures the model, not the loader
    params = [p for _, p in policy.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step():
        out = policy(inputs)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _timeit(step, warmup, iters, device)
    seq = int(inputs["input_ids"].shape[1])
    del policy, opt, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sec, seq


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, runs in seconds on a CPU (smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (4 with --tiny)")
    ap.add_argument("--image-px", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    ap.add_argument("--iters", type=int, default=None, help="default 10 (2 with --tiny)")
    ap.add_argument("--finetune", nargs="+", default=["full", "frozen_vision"], choices=["full", "frozen_vision"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf_bf16", "hf_autocast", "ours"])
    args = ap.parse_args(argv)
    tiny = args.tiny
    batch = args.batch or (4 if tiny else 32)
    image_px = 64 if tiny and args.image_px == 224 else args.image_px
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    iters = args.iters if args.iters is not None else (2 if tiny else 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = with_tokenizer_ids(qwen3_vl_config(tiny))
    n_act, prompt_tokens, n_images, chunk, action_dim = 8, 32, 2, 8, 7
    act_token_id = cfg.text_config.vocab_size - 1  # an ordinary id standing in for <ACT>: same cost as a new row
    inputs = hf_inputs(cfg, batch, image_px, n_images, prompt_tokens, n_act, act_token_id, device)
    tmp = tempfile.TemporaryDirectory(prefix="wmvla_bench_")
    if "ours" not in args.skip:
        t0 = time.perf_counter()
        save_random_backbone(cfg, tmp.name)
        print(f"random backbone written to {tmp.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    result: dict = {
        "shapes": "tiny" if tiny else "Qwen3-VL-2B",
        "batch": batch, "image_px": image_px, "images_per_sample": n_images, "act_tokens": n_act,
        "prompt_tokens": prompt_tokens, "seq_len_hf": int(inputs["input_ids"].shape[1]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "warmup": warmup, "iters": iters, "results": {},
    }
    for finetune in args.finetune:
        row = {}
        for name in ("hf_bf16", "hf_autocast", "ours"):
            if name in args.skip:
                continue
            try:
                if name == "ours":
                    sec, seq = bench_ours(tmp.name, batch, image_px, n_act, finetune, device, warmup, iters,
                                          world_dim=64 if tiny else 1024)
                    result["seq_len_ours"] = seq
                else:
                    weights = "bf16" if name == "hf_bf16" else "fp32_autocast"
                    sec = bench_hf(cfg, inputs, act_token_id, action_dim, chunk, finetune, weights, device,
                                   warmup, iters)
                row[name] = {"ms_per_step": round(sec * 1e3, 2), "samples_per_s": round(batch / sec, 2)}
            except torch.cuda.OutOfMemoryError as e:  # report, do not hide
                row[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            print(f"[{finetune}] {name}: {row[name]}", file=sys.stderr, flush=True)
        ours = row.get("ours", {}).get("samples_per_s")
        for base in ("hf_bf16", "hf_autocast"):
            other = row.get(base, {}).get("samples_per_s")
            if ours and other:
                row[f"ours_over_{base}"] = round(ours / other, 3)
        result["results"][finetune] = row
    tmp.cleanup()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
