"""Training throughput and memory: our VLAPolicy step vs the plain Hugging Face step of the same Qwen3-VL model.

Random weights, no downloads: the Qwen3-VL-2B shapes are rebuilt in code with `Qwen3VLConfig` (text: hidden
2048, 28 layers, 16 heads / 8 KV heads, MLP 6144; vision: 24 layers x 1024, patch 16, 2x2 merge, DeepStack
from vision layers 5/11/17). Every step sees, per sample, a 224 px agent view + a 224 px wrist view
(2 x 49 merged vision tokens), a ~32-token prompt and 8 <ACT> tokens; batch 32.

Speed rows, measured in the same process one after the other, for `full`, `frozen_vision` and `lora`:
  hf_bf16      Qwen3VLForConditionalGeneration with bf16 weights, forward on the same inputs, MSE on the
               last hidden states of the 8 ACT positions through a linear head, fused AdamW
               (the "plain HF step" of REFERENCE.md; not for lora)
  hf_autocast  the same with fp32 weights + bf16 autocast (our precision policy; not for lora)
  ours_ref     wmvla's VLAPolicy.forward(batch) -> loss (memory "pred" with the Prophet and the gated
               cross-attention, MSE head), fp32 trainable weights + bf16 autocast, fused AdamW, with
               transformers' own vision attention (one SDPA call per image per layer): the path before issue 21
  ours         the same with the batched vision attention (`policy.batched_vision_attention`, the default)
  ours_compiled  `ours` with every decoder layer and vision block under torch.compile (--compile)
  ours_cached_vision  `ours` (compiled as ours_compiled with --compile) with the frozen tower's outputs
               precomputed (frozen_vision / lora only): the
               features `wmvla vision-cache` would store (computed here in-process by the same random tower,
               bf16 on the GPU) are handed to forward, so the tower does not run (`--vision-cache` in training;
               the data loader's read of the cache rows is not in this number)
Each row: ms/step (median), samples/s, peak GPU memory, model FLOPs per step and MFU against the H200's dense
bf16 datasheet rate (989 TFLOP/s) and against the bf16 matmul rate measured in the same run.
MFU counts the matmul FLOPs of the model (`model_flops`): 2 per multiply-add of every linear layer and of
attention (QK^T and PV, full square), x3 for layers whose weights train (forward + 2 backward), x2 for frozen
layers that gradients flow through (LoRA's language model), x1 for a frozen vision tower; recomputation by
activation checkpointing is not counted.

`--check`: the same loss and gradients (relative L2 error of every trainable gradient) from the batched and
the per-image vision attention on one policy and one batch; and, with a frozen tower, from its outputs handed
in (as `--vision-cache` does) and the live tower.

`--memory-cell`: the default pipeline cell (preset libero-2b: full fine-tune, batch 32, EMA 0.999, grad clip,
its AdamW) under a per-process cap of `--cap-gb` (48 = an L40S): the settings the trainer's memory plan picks
for that GPU (`train/memory.py`) and a few fixed variants; peak memory (max_memory_allocated), estimated
peak, ms/step. `--profile`: the kernel mix of the picked cell's step (matmul/attention vs the rest), and the
L40S step time that the datasheet ratios give for it (arithmetic, not a measurement).

    python benchmarks/bench_train.py                               # on the GPU machine (2B shapes)
    python benchmarks/bench_train.py --memory-cell --profile --rows none
    python benchmarks/bench_train.py --tiny                        # seconds on a CPU: smoke test of the script
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import types

import torch


# ---------------------------------------------------------------------------------------- configs


def qwen3_vl_config(tiny: bool):
    """Qwen3VLConfig with the 2B shapes (or a tiny version for the smoke test)."""
    from transformers import Qwen3VLConfig

    if tiny:
        # 4 layers: each of the 3 DeepStack features is added before a later layer, as in the real model (with
        # fewer, the last ones never reach the ACT states: the trainer's first-step check refuses that)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
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
    step = make_hf_step(cfg, inputs, act_token_id, action_dim, chunk, finetune, weights, device)
    sec = _timeit(step, warmup, iters, device)
    del step
    return sec


def make_hf_step(cfg, inputs: dict, act_token_id: int, action_dim: int, chunk: int, finetune: str, weights: str,
                 device):
    """The plain Hugging Face training step (see the module doc) as a closure over its model and optimizer."""
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

    return step


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


# ------------------------------------------------------------------------------------------- ours


DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "L40S": 362.0, "A100": 312.0}
DATASHEET_BW_TBS = {"H200": 4.8, "H100": 3.35, "L40S": 0.864, "A100": 2.0}


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None


def raw_batch(batch: int, image_px: int, n_act: int, world_dim: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    state_dim, action_dim, T, K = 8, 7, 4, 4
    # ~32 text tokens around the images, as in the plain HF inputs
    task = "pick up the black bowl between the plate and the small cup and place it on the plate"
    return {
        "images": rng.integers(0, 256, size=(batch, 2, image_px, image_px, 3), dtype=np.uint8),
        "state": rng.normal(size=(batch, state_dim)).astype(np.float32),
        "task": [task] * batch,
        "actions": np.clip(rng.normal(size=(batch, n_act, action_dim)), -1, 1).astype(np.float32),
        "action_mask": np.ones((batch, n_act), dtype=bool),
        "world_history": rng.normal(size=(batch, T, world_dim)).astype(np.float32),
        "world_future": rng.normal(size=(batch, K, world_dim)).astype(np.float32),
        "future_mask": np.ones((batch, K), dtype=bool),
    }


def build_policy(folder: str, image_px: int, n_act: int, finetune: str, device, world_dim: int,
                 batched: bool = True, checkpointing: bool = False):
    import numpy as np

    from vla_core.data.normalize import feature_stats
    from vla_core.policy.config import PolicyConfig
    from vla_core.policy.modeling import VLAPolicy

    rng = np.random.default_rng(0)
    state_dim, action_dim = 8, 7
    stats = {"observation.state": feature_stats(rng.normal(size=(1000, state_dim)), "observation.state"),
             "action": feature_stats(np.clip(rng.normal(size=(1000, action_dim)), -1, 1), "action", mode="quantile",
                                     passthrough_dims=(action_dim - 1,))}
    pcfg = PolicyConfig(backbone=folder, image_size=image_px, chunk_size=n_act, state_dim=state_dim,
                        action_dim=action_dim, memory="pred", world_dim=world_dim, world_history=4, world_horizon=4,
                        head="mse", finetune=finetune, autocast_bf16=device.type == "cuda",
                        frozen_dtype="bfloat16" if device.type == "cuda" else "float32",
                        attn_implementation="sdpa", batched_vision_attention=batched,
                        gradient_checkpointing=checkpointing)
    return VLAPolicy(pcfg, stats).to(device).train()


def model_flops(policy, batch: int, seq: int, finetune: str, vision_cached: bool = False) -> float:
    """Matmul FLOPs of one training step (see the module doc): linear layers + attention, fwd x1/x2/x3."""
    cfg = policy.backbone.model.config
    tc, vc = cfg.text_config, cfg.vision_config
    d, hd = tc.hidden_size, getattr(tc, "head_dim", tc.hidden_size // tc.num_attention_heads)
    llm_linear = tc.num_hidden_layers * (d * hd * (tc.num_attention_heads * 2 + tc.num_key_value_heads * 2)
                                         + 3 * d * tc.intermediate_size)
    tokens = batch * seq
    llm_fwd = 2 * llm_linear * tokens + tc.num_hidden_layers * 4 * seq * seq * tc.num_attention_heads * hd * batch
    image_px = policy.cfg.image_size
    per_img = (image_px // vc.patch_size) ** 2
    n_img = batch * len(policy.cfg.camera_keys)
    patches = n_img * per_img
    dv = vc.hidden_size
    vis_block = 4 * dv * dv + 2 * dv * vc.intermediate_size
    merge_in = dv * vc.spatial_merge_size ** 2
    mergers = (1 + len(getattr(vc, "deepstack_visual_indexes", []))) * (merge_in * merge_in + merge_in * vc.out_hidden_size)
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    vis_fwd = (2 * vc.depth * vis_block * patches + vc.depth * 4 * per_img * per_img * dv * n_img
               + 2 * mergers * patches / vc.spatial_merge_size ** 2 + 2 * patch_in * dv * patches)
    llm_mult = {"full": 3, "frozen_vision": 3, "lora": 2}[finetune]
    vis_mult = 3 if finetune == "full" else (0 if vision_cached else 1)
    return float(llm_mult * llm_fwd + vis_mult * vis_fwd)


def uses_cuda_graphs(mode: str | None, options: dict | None, regions: dict | None) -> bool:
    """Whether a compiled row replays CUDA graphs (then each step starts with cudagraph_mark_step_begin)."""
    modes = [mode, (regions or {}).get("vision_mode"), (regions or {}).get("decoder_mode")]
    return any(m and "reduce-overhead" in m for m in modes) or bool((options or {}).get("triton.cudagraphs"))


def compile_policy(policy, mode: str | None, options: dict | None, regions: dict | None) -> bool:
    """compile_blocks as a row names it (`compile_variant`'s three values); True when its steps replay CUDA
    graphs."""
    policy.compile_blocks(mode=mode, options=options, **(regions or {}))
    return uses_cuda_graphs(mode, options, regions)


def variant_row(variant: str) -> str:
    """The row name of a --compile-variants / --ours-variant name ("" = the trainer's per-block compile)."""
    return f"ours_compiled[{variant}]" if variant else "ours_compiled"


def ours_train_step(policy, inputs: dict, opt, cuda_graphs: bool, read_checks: bool = True):
    """Our training step as the trainer runs it (checks read after backward, before the update), its phases
    named for the profiler. `read_checks=False` leaves that read (the step's one host sync) out: only for
    `--sync-cost`, which measures what the read costs."""
    from vla_core.train.checks import check_step_finite

    def step():
        if cuda_graphs:  # a new training step: earlier graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.profiler.record_function("forward"):
            out = policy(inputs, defer_checks=True)
        with torch.profiler.record_function("backward"):
            out["loss"].backward()
            if read_checks:
                check_step_finite(out, 0)
        with torch.profiler.record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def bench_ours(folder: str, batch: int, image_px: int, n_act: int, finetune: str, device, warmup: int, iters: int,
               world_dim: int, batched: bool = True, compile_: bool = False, profile: bool = False,
               trace_path: str = "", compile_mode: str | None = None, compile_options: dict | None = None,
               compile_regions: dict | None = None, cached_vision: bool = False) -> dict:
    """One VLAPolicy training step: forward(batch) -> loss (memory pred: Prophet + gated cross-attention, MSE head),
    backward, the trainer's finiteness checks, fused AdamW over the fp32 trainable weights."""
    policy = build_policy(folder, image_px, n_act, finetune, device, world_dim, batched=batched)
    cuda_graphs = compile_ and compile_policy(policy, compile_mode, compile_options, compile_regions)
    inputs = policy.prepare(raw_batch(batch, image_px, n_act, world_dim))  # on the device: measures the model
    if cached_vision:
        inputs["vision_features"] = cached_features(policy, inputs)
    params = [p for _, p in policy.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    step = ours_train_step(policy, inputs, opt, cuda_graphs)

    t0 = time.perf_counter()
    step()  # the first step (compilation, allocator warm-up) is timed on its own
    first = time.perf_counter() - t0
    sec = _timeit(step, max(warmup - 1, 0), iters, device)
    seq = int(inputs["input_ids"].shape[1])
    res = {"sec": sec, "seq": seq, "flops": model_flops(policy, batch, seq, finetune, cached_vision),
           "peak_gb": _peak_gb(device),
           "first_step_s": round(first, 1)}
    if profile and device.type == "cuda":
        res["kernel_mix"] = kernel_mix(step)
        res["host_profile"] = host_profile(step, trace_path)
    del policy, opt, inputs, params
    return res


def ours_full_step(folder: str, batch: int, image_px: int, n_act: int, device, world_dim: int, variant: str = "",
                   read_checks: tuple[bool, ...] = (True,)):
    """Our compiled full fine-tuning step as --alternate and --sync-cost time it: one policy (compiled as
    `variant` names, "" = the trainer's per-block compile), its batch and fused AdamW; one step function per
    entry of `read_checks` (see ours_train_step), all on that policy. Returns (policy, inputs, steps)."""
    policy = build_policy(folder, image_px, n_act, "full", device, world_dim)
    cuda_graphs = compile_policy(policy, *compile_variant(variant_row(variant), None))
    inputs = policy.prepare(raw_batch(batch, image_px, n_act, world_dim))
    opt = torch.optim.AdamW([p for _, p in policy.trainable_parameters()], lr=1e-5, fused=device.type == "cuda")
    return policy, inputs, [ours_train_step(policy, inputs, opt, cuda_graphs, read) for read in read_checks]


def timed_rounds(steps: dict, rounds: int, iters: int, device, label: str) -> dict[str, list[float]]:
    """Each step function timed in turn, `rounds` times (`_timeit`: median of `iters`; warm-up 2 in the first
    round, 1 after): drifts of the lent machine's speed reach every step alike. Seconds per step, per round."""
    rows: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            rows[name].append(_timeit(step, 2 if r == 0 else 1, iters, device))
        print(f"[{label}] round {r}: " + ", ".join(f"{n} {v[-1] * 1e3:.1f} ms" for n, v in rows.items()),
              file=sys.stderr, flush=True)
    return rows


def sync_cost(folder: str, batch: int, image_px: int, n_act: int, device, world_dim: int, rounds: int,
              iters: int) -> dict:
    """What the step's one host sync costs: our compiled step (full fine-tune, the trainer's per-block compile)
    with and without the finiteness read before the update, one policy and optimizer, alternating rounds. The
    difference bounds what an update that skips itself on the GPU (no read before it) could gain."""
    policy, _, (with_read, without_read) = ours_full_step(folder, batch, image_px, n_act, device, world_dim,
                                                          read_checks=(True, False))
    rows = timed_rounds({"with_read": with_read, "without_read": without_read}, rounds, iters, device, "sync_cost")
    diffs = sorted((w - wo) * 1e3 for w, wo in zip(rows["with_read"], rows["without_read"]))
    del policy
    return {"rounds": rounds, "iters_per_round": iters,
            **{f"{k}_ms": [round(x * 1e3, 1) for x in v] for k, v in rows.items()},
            "read_cost_ms_per_round_sorted": [round(d, 2) for d in diffs],
            "read_cost_ms_median": round(statistics.median(diffs), 2)}


def alternate(cfg, inputs: dict, folder: str, batch: int, image_px: int, n_act: int, device, world_dim: int,
              act_token_id: int, action_dim: int, chunk: int, rounds: int, iters: int,
              variant: str = "") -> dict:
    """The plain HF bf16 step and our compiled step (full fine-tune), both built once in one process and timed
    in alternating rounds of `iters` steps: the lent machine's speed drifts between runs (the HF step measured
    392-491 ms on different days' machines), so the ratio is taken per round and its median reported."""
    hf_step = make_hf_step(cfg, inputs, act_token_id, action_dim, chunk, "full", "bf16", device)
    policy, ours_inputs, (ours_step,) = ours_full_step(folder, batch, image_px, n_act, device, world_dim, variant)
    rows = timed_rounds({"hf_bf16": hf_step, "ours_compiled": ours_step}, rounds, iters, device, "alternate")
    ratios = sorted(h / o for h, o in zip(rows["hf_bf16"], rows["ours_compiled"]))
    seq = int(ours_inputs["input_ids"].shape[1])
    flops = model_flops(policy, batch, seq, "full")
    med = statistics.median(rows["ours_compiled"])
    del hf_step, policy
    return {"rounds": rounds, "iters_per_round": iters, "ours_variant": variant or "default",
            "hf_bf16_ms": [round(x * 1e3, 1) for x in rows["hf_bf16"]],
            "ours_compiled_ms": [round(x * 1e3, 1) for x in rows["ours_compiled"]],
            "ratio_per_round_sorted": [round(x, 3) for x in ratios], "ratio_median": round(statistics.median(ratios), 3),
            "ours_median_ms": round(med * 1e3, 1), "tflop_per_step": round(flops / 1e12, 2),
            "mfu_vs_datasheet_median": round(flops / med / 1e12 / DATASHEET_BF16_TFLOPS["H200"], 3)}


def check_same_numbers(folder: str, batch: int, image_px: int, n_act: int, device, world_dim: int,
                       compile_: bool = False, variant: str = "") -> dict:
    """Loss and gradients of our fast path (batched vision attention, patch embedding as a matmul, grid inputs
    precomputed, the sync-free backbone forward) vs transformers' own code (per-image attention, Conv3d, grid
    inputs per call, Qwen3VLModel.forward), vs transformers' backbone forward alone (expected bit-identical), and
    vs the compiled step (`variant`: as --compile-variants names it; default: the trainer's blocks); same policy,
    same batch: relative L2 error of all gradients together and of the worst tensors."""
    from vla_core.policy.backbone import set_batched_vision_attention

    policy = build_policy(folder, image_px, n_act, "full", device, world_dim, batched=True)
    inputs = policy.prepare(raw_batch(batch, image_px, n_act, world_dim, seed=1))
    bb = policy.backbone

    def run() -> tuple:
        policy.zero_grad(set_to_none=True)
        out = policy(inputs)
        out["loss"].backward()
        return float(out["loss"].detach()), {n: p.grad.detach().float().cpu()
                                             for n, p in policy.trainable_parameters() if p.grad is not None}

    def fast_path(on: bool) -> None:
        set_batched_vision_attention(bb.model, on)
        bb.precompute_vision_inputs = on
        bb.sync_free_forward = on

    results = []
    for on in (True, False):  # the whole fast path vs transformers' own code
        fast_path(on)
        results.append(run())
    fast_path(True)
    bb.sync_free_forward = False  # transformers' backbone forward, our vision path
    results.append(run())
    fast_path(True)
    if compile_:  # the compiled step against the eager fast path
        cuda_graphs = compile_policy(policy, *compile_variant(variant_row(variant), None))
        for _ in range(2):  # compile, then the compared call
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss_grads = run()
        results.append(loss_grads)
    del policy, inputs
    ref = results[0]
    out = {"reference": "eager, fast path (batched vision attention, patch matmul, precomputed grid inputs, "
                        "sync-free backbone forward)",
           "loss_reference": ref[0], "transformers_path": _compare(ref, results[1]),
           "transformers_backbone_forward": _compare(ref, results[2])}
    if compile_:
        out[f"compiled_{variant or 'blocks'}"] = _compare(ref, results[3])
    return out


def _compare(ref: tuple, got: tuple) -> dict:
    """(loss, {name: grad}) against the reference: loss and gradient relative differences."""
    (ref_loss, ref_grads), (loss, grads) = ref, got
    rel = {n: float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads
           if ref_grads[n].norm() > 0}
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    num = math.sqrt(sum(float((grads[n] - ref_grads[n]).norm()) ** 2 for n in ref_grads))
    den = math.sqrt(sum(float(ref_grads[n].norm()) ** 2 for n in ref_grads))
    return {"loss": loss, "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30),
            "grad_rel_l2_all": num / max(den, 1e-30), "grad_rel_l2_worst_tensors": {n: round(v, 5) for n, v in worst}}


def cached_features(policy, inputs: dict) -> torch.Tensor:
    """What the vision-feature cache holds for the prepared batch's images, in its storage dtype:
    [B, n_cams, 1 + n_deepstack, tokens, d] (computed here by the policy's own tower)."""
    from vla_core.policy.vision_cache import tower_features

    autocast = policy.cfg.autocast_bf16
    feats = tower_features(policy.backbone, inputs["images"].flatten(0, 1), autocast)
    return feats.to(torch.bfloat16 if autocast else torch.float32).unflatten(0, inputs["images"].shape[:2])


def check_cached_vision(folder: str, batch: int, image_px: int, n_act: int, device, world_dim: int) -> dict:
    """frozen_vision: loss and gradients with the tower's outputs handed in (stored as the vision-feature cache
    stores them: bf16 bits on the GPU) vs the live tower, same policy, same batch."""
    policy = build_policy(folder, image_px, n_act, "frozen_vision", device, world_dim, batched=True)
    inputs = policy.prepare(raw_batch(batch, image_px, n_act, world_dim, seed=1))
    feats = cached_features(policy, inputs)
    results = []
    for batch_in in (inputs, {**inputs, "vision_features": feats}):
        policy.zero_grad(set_to_none=True)
        out = policy(batch_in)
        out["loss"].backward()
        results.append((float(out["loss"].detach()), {n: p.grad.detach().float().cpu()
                                                      for n, p in policy.trainable_parameters() if p.grad is not None}))
    del policy, inputs, feats
    return {"reference": "frozen_vision, live tower", "cached_vision": _compare(results[0], results[1])}


# ------------------------------------------------------------------------------- the default cell


def memory_cell(folder: str, image_px: int, n_act: int, device, world_dim: int, cap_gb: float, variants,
                warmup: int, iters: int, profile: bool) -> dict:
    """The libero-2b cell under a per-process memory cap: the auto plan for that cap + fixed variants."""
    from vla_core.train.config import get_preset
    from vla_core.train.checks import check_step_finite
    from vla_core.train.loop import build_optimizer, global_loss_weights
    from vla_core.train.memory import MemoryPlan, estimate, plan_memory, shape_of, split_batch

    preset = get_preset("libero-2b")
    o = preset.optim
    batch = o.batch_size * o.grad_accum
    cap = int(cap_gb * 1e9)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else cap
    out: dict = {"cap_gb": cap_gb, "batch": batch, "ema_decay": o.ema_decay, "rows": {}}
    for name in variants:
        _free(device)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        policy = opt = ema = inputs = None
        try:
            policy = build_policy(folder, image_px, n_act, "full", device, world_dim)
            shape = shape_of(policy, 2)
            if name.startswith("auto"):  # "auto": as the trainer runs the preset; "auto-eager": without compile
                plan = plan_memory(shape, batch, True, cap)
                if preset.compile and name == "auto":
                    policy.compile_blocks()
            else:  # "ckpt-8-bf16-fp32": checkpointing, micro-batch 8, Adam bf16, EMA fp32
                ck, m, adam, emad = name.split("-")
                est, st = estimate(shape, int(m), ck == "ckpt", adam, emad, True)
                plan = MemoryPlan(ck == "ckpt", int(m), adam, emad, est, st, cap, "fixed")
            if plan.gradient_checkpointing:
                policy.enable_gradient_checkpointing()
            opt = build_optimizer(policy, preset, fused=device.type == "cuda", plan=plan)
            params = dict(policy.trainable_parameters())
            if plan.ema_dtype == "bfloat16":
                from vla_core.train.optim import OffsetEMA

                ema = OffsetEMA(params, o.ema_decay, opt)
            else:
                from vla_core.train.ema import EMA

                ema = EMA(params, o.ema_decay)
            inputs = policy.prepare(raw_batch(batch, image_px, n_act, world_dim))
            one = types.SimpleNamespace(num_processes=1)
            losses = []

            def step():
                parts = split_batch(inputs, plan.micro_batch)
                weights, _ = global_loss_weights(policy, parts, one)
                total_loss = 0.0
                for i, b in enumerate(parts):
                    res = policy(b, loss_weights=weights[i], defer_checks=True)
                    (res["loss"] / len(parts)).backward()
                    check_step_finite(res, 0)
                    total_loss += res["loss"].detach() / len(parts)
                torch.nn.utils.clip_grad_norm_(list(params.values()), o.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update()
                losses.append(total_loss)

            sec = _timeit(step, warmup, iters, device)
            row = {"plan": plan.to_dict(), "ms_per_step": round(sec * 1e3, 1), "samples_per_s": round(batch / sec, 2),
                   "peak_gb": _peak_gb(device), "estimate_gb": round(plan.estimate_bytes / 1e9, 2),
                   "states_gb": round(plan.states_bytes / 1e9, 2), "loss_first_last": [float(losses[0]), float(losses[-1])],
                   "optimizer": type(opt).__name__}
            if profile and name.startswith("auto") and device.type == "cuda":
                row["kernel_mix"] = kernel_mix(step)
        except torch.cuda.OutOfMemoryError as e:
            row = {"error": f"out of memory under the {cap_gb} GB cap: {str(e).splitlines()[0][:200]}"}
        except Exception as e:  # noqa: BLE001 - a variant that cannot be built (e.g. plan refused) is a result
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out["rows"][name] = row
        print(f"[memory cell {cap_gb} GB] {name}: {row}", file=sys.stderr, flush=True)
        del policy, opt, ema, inputs
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def kernel_mix(step) -> dict:
    """GPU kernel time of one step by kind (torch.profiler), and the L40S estimate from datasheet ratios:
    matmul/attention kernels scale with dense bf16 rate (989 -> 362 TFLOP/s), the rest with memory bandwidth
    (4.8 -> 0.864 TB/s). Arithmetic from the H200's kernel mix; launch gaps are assumed to overlap."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    mm = other = 0.0
    n_kernels = 0
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        if t <= 0:
            continue
        n_kernels += evt.count
        name = evt.key.lower()
        if any(k in name for k in ("gemm", "cutlass", "xmma", "sm90", "flash", "fmha", "attention", "cublas",
                                   "nvjet")):
            mm += t
        else:
            other += t
    mm_ms, other_ms = mm / 1e3, other / 1e3
    l40s = mm_ms * DATASHEET_BF16_TFLOPS["H200"] / DATASHEET_BF16_TFLOPS["L40S"] + \
        other_ms * DATASHEET_BW_TBS["H200"] / DATASHEET_BW_TBS["L40S"]
    return {"wall_ms_profiled": round(wall * 1e3, 1), "matmul_attention_ms": round(mm_ms, 1),
            "other_kernels_ms": round(other_ms, 1), "kernel_launches": n_kernels,
            "l40s_estimate_ms": round(l40s, 0)}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def host_profile(step, trace_path: str = "") -> dict:
    """Where a step waits on the host (torch.profiler with CPU + CUDA activities and Python stacks).

    Reports: wall time; GPU busy time (union of kernel intervals) and idle time per phase (the step's
    `record_function` ranges forward / backward / optimizer, where the step has them); device synchronisations
    (blocking CUDA runtime calls) with the Python line that caused each kind; the CPU operators with the most
    self time. A host-bound step shows as GPU idle time inside the forward: every sync drains the queue, and
    the GPU then waits for Python to launch the next kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = prof.events()
    # record_function ranges also appear on the GPU's timeline (user annotations): not kernels
    annotations = {e.name for e in events if e.device_type.name == "CPU" and e.name in ("forward", "backward", "optimizer")}
    kernel_events = [e for e in events if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
                     and e.name not in annotations and not e.name.startswith("Optimizer.")]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in kernel_events)
    merged: list[list[float]] = []
    for a, b in kernels:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])

    def busy_in(a: float, b: float) -> float:
        return sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged)

    phases = {}
    for e in events:
        if e.name in ("forward", "backward", "optimizer") and e.device_type.name == "CPU":
            a, b = e.time_range.start, e.time_range.end
            busy = busy_in(a, b)
            phases[e.name] = {"cpu_ms": round((b - a) / 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1),
                              "gpu_idle_ms": round((b - a - busy) / 1e3, 1)}
    syncs: dict[str, dict] = {}
    for e in events:
        if e.device_type.name == "CPU" and any(e.name.startswith(s) for s in SYNC_CALLS):
            frames = [f for f in (e.stack or []) if ".py(" in f and "torch/" not in f.replace("\\", "/")]
            where = frames[0] if frames else (e.stack[0] if e.stack else "?")
            key = f"{e.name} @ {where}"
            d = syncs.setdefault(key, {"count": 0, "ms": 0.0})
            d["count"] += 1
            d["ms"] += (e.time_range.end - e.time_range.start) / 1e3
    top_syncs = sorted(syncs.items(), key=lambda kv: -kv[1]["ms"])[:25]
    cpu_ops = sorted((evt for evt in prof.key_averages() if evt.self_cpu_time_total > 0),
                     key=lambda evt: -evt.self_cpu_time_total)[:25]
    busy_total = sum(b - a for a, b in merged)
    # the GPU's own work by kernel name (what is left once the host overhead is gone)
    by_kernel: dict[str, list] = {}
    for e in kernel_events:
        d = by_kernel.setdefault(e.name[:90], [0, 0.0])
        d[0] += 1
        d[1] += (e.time_range.end - e.time_range.start) / 1e3
    top_kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:30]
    return {"wall_ms_profiled": round(wall * 1e3, 1), "gpu_busy_ms": round(busy_total / 1e3, 1),
            "kernel_launches": sum(v[0] for v in by_kernel.values()),
            "top_kernels": [{"kernel": k, "count": v[0], "ms": round(v[1], 2)} for k, v in top_kernels],
            "phases": phases, "sync_calls": sum(d["count"] for d in syncs.values()),
            "syncs": [{"where": k, "count": v["count"], "ms": round(v["ms"], 2)} for k, v in top_syncs],
            "top_cpu_ops": [{"op": evt.key, "count": evt.count, "self_cpu_ms": round(evt.self_cpu_time_total / 1e3, 2)}
                            for evt in cpu_ops]}


def matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    del a, b
    return round(2 * 8192 ** 3 / dt / 1e12, 1)


# -------------------------------------------------------------------------------------------- main


def compile_variant(row: str, default_mode: str | None) -> tuple[str | None, dict | None, dict]:
    """How a row is compiled: (torch.compile mode, inductor options, VLAPolicy.compile_blocks' vision settings).
    `ours_compiled[reduce-overhead]` -> a mode; `ours_compiled[opt:cpp_wrapper=true,triton.cudagraphs=false]` ->
    inductor options; `ours_compiled[tower]` / `ours_compiled[tower:reduce-overhead]` -> the vision tower as one
    compiled region (in that mode); `ours_compiled[stack]` / `[stack:MODE]` -> the tower and the language model's
    whole forward as one region each; else --compile-mode."""
    if not (row.startswith("ours_compiled[") and row.endswith("]")):
        return default_mode, None, {}
    variant = row[len("ours_compiled["):-1]
    if variant == "tower" or variant.startswith("tower:"):
        return default_mode, None, {"vision_region": "tower", "vision_mode": variant.partition(":")[2] or None}
    if variant == "stack" or variant.startswith("stack:"):  # the tower and the decoder stack: one region each
        region_mode = variant.partition(":")[2] or None
        return default_mode, None, {"vision_region": "tower", "vision_mode": region_mode,
                                    "decoder_region": "stack", "decoder_mode": region_mode}
    if not variant.startswith("opt:"):
        return variant, None, {}
    options = {}
    for item in variant[4:].split(","):
        key, _, value = item.partition("=")
        options[key] = json.loads(value)  # true / false / numbers / "strings"
    return None, options, {}


ROWS = ("hf_bf16", "hf_autocast", "ours_ref", "ours", "ours_compiled", "ours_cached_vision")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, runs in seconds on a CPU (smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (4 with --tiny)")
    ap.add_argument("--image-px", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    ap.add_argument("--iters", type=int, default=None, help="default 10 (2 with --tiny)")
    ap.add_argument("--finetune", nargs="+", default=["full", "frozen_vision", "lora"],
                    choices=["full", "frozen_vision", "lora"])
    ap.add_argument("--rows", nargs="*", default=["hf_bf16", "hf_autocast", "ours_ref", "ours"],
                    help=f"speed rows to run, of {ROWS} (ours_compiled also with --compile); 'none' for none")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(ROWS))
    ap.add_argument("--compile", action="store_true", help="add the ours_compiled row")
    ap.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                    help="full fine-tune: hf_bf16 and ours_compiled built once, timed in ROUNDS alternating rounds")
    ap.add_argument("--sync-cost", type=int, default=0, metavar="ROUNDS",
                    help="our compiled full step with and without the pre-update finiteness read, alternating rounds")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the ours_compiled row "
                    "(default: inductor's default; reduce-overhead = CUDA graphs per block)")
    ap.add_argument("--compile-variants", nargs="*", default=[], metavar="VARIANT",
                    help="more ours_compiled rows, each compiled another way: a torch.compile mode "
                         "(reduce-overhead, max-autotune-no-cudagraphs) or inductor options as opt:KEY=VALUE[,...] "
                         "(e.g. opt:cpp_wrapper=true), or tower / tower:MODE (the vision tower as one compiled "
                         "region), or stack / stack:MODE (the tower and the language model: one region each); "
                         "rows named ours_compiled[VARIANT]")
    ap.add_argument("--ours-variant", default="", metavar="VARIANT",
                    help="how --alternate and --check compile our step (a --compile-variants name; default: the "
                         "trainer's per-block compile)")
    ap.add_argument("--check", action="store_true", help="our fast path vs transformers' code, and vs the compiled "
                    "step: loss and grads")
    ap.add_argument("--memory-cell", action="store_true", help="the libero-2b cell under --cap-gb")
    ap.add_argument("--cap-gb", type=float, default=48.0)
    ap.add_argument("--variants", nargs="*", default=["auto", "auto-eager", "ckpt-32-bfloat16-bfloat16",
                                                      "ckpt-8-float32-float32", "nockpt-8-bfloat16-bfloat16"],
                    help="auto = the trainer's plan for --cap-gb, as the preset runs (compiled); auto-eager = the "
                         "same plan without compile; CKPT-MICRO-ADAM-EMA = fixed settings")
    ap.add_argument("--profile", action="store_true",
                    help="kernel mix (+ L40S estimate) of each ours row's step and of the memory cell's step")
    ap.add_argument("--trace-dir", default="", help="with --profile: write each ours row's Chrome trace here")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    tiny = args.tiny
    batch = args.batch or (4 if tiny else 32)
    image_px = 64 if tiny and args.image_px == 224 else args.image_px
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    iters = args.iters if args.iters is not None else (2 if tiny else 10)
    rows = [r for r in args.rows if r != "none" and r not in args.skip]
    if args.compile and "ours_compiled" not in rows and "ours_compiled" not in args.skip:
        rows.append("ours_compiled")
    rows += [f"ours_compiled[{v}]" for v in args.compile_variants]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = with_tokenizer_ids(qwen3_vl_config(tiny))
    n_act, prompt_tokens, n_images, chunk, action_dim = 8, 32, 2, 8, 7
    world_dim = 64 if tiny else 1024
    act_token_id = cfg.text_config.vocab_size - 1  # an ordinary id standing in for <ACT>: same cost as a new row
    inputs = hf_inputs(cfg, batch, image_px, n_images, prompt_tokens, n_act, act_token_id, device)
    tmp = tempfile.TemporaryDirectory(prefix="wmvla_bench_")
    needs_folder = (any(r.startswith("ours") for r in rows) or args.check or args.memory_cell or args.alternate
                    or args.sync_cost)
    if needs_folder:
        t0 = time.perf_counter()
        save_random_backbone(cfg, tmp.name)
        print(f"random backbone written to {tmp.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result: dict = {
        "shapes": "tiny" if tiny else "Qwen3-VL-2B",
        "batch": batch, "image_px": image_px, "images_per_sample": n_images, "act_tokens": n_act,
        "prompt_tokens": prompt_tokens, "seq_len_hf": int(inputs["input_ids"].shape[1]),
        "device": dev_name, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "warmup": warmup, "iters": iters, "results": {},
        "matmul_bf16_tflops_measured": matmul_tflops(device),
    }
    peak_sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in dev_name), None)
    for finetune in args.finetune:
        row = {}
        for name in rows:
            if name.startswith("hf") and finetune == "lora":
                continue
            if name == "ours_cached_vision" and finetune == "full":  # the tower trains: nothing to cache
                continue
            _free(device)
            try:
                if name.startswith("ours"):
                    mode, options, regions = compile_variant(name, args.compile_mode)
                    r = bench_ours(tmp.name, batch, image_px, n_act, finetune, device, warmup, iters, world_dim,
                                   batched=name != "ours_ref",
                                   compile_=name.startswith("ours_compiled") or (name == "ours_cached_vision"
                                                                                 and args.compile),
                                   profile=args.profile,
                                   trace_path=f"{args.trace_dir}/{finetune}_{name}.json.gz" if args.trace_dir else "",
                                   compile_mode=mode, compile_options=options, compile_regions=regions,
                                   cached_vision=name == "ours_cached_vision")
                    result["seq_len_ours"] = r["seq"]
                    row[name] = {"ms_per_step": round(r["sec"] * 1e3, 2), "samples_per_s": round(batch / r["sec"], 2),
                                 "peak_gb": r["peak_gb"], "first_step_s": r["first_step_s"],
                                 "model_flop_per_step": r["flops"], "tflop_per_step": round(r["flops"] / 1e12, 2),
                                 "achieved_tflops": round(r["flops"] / r["sec"] / 1e12, 1)}
                    for key in ("kernel_mix", "host_profile"):
                        if key in r:
                            row[name][key] = r[key]
                    if peak_sheet:
                        row[name]["mfu_vs_datasheet"] = round(r["flops"] / r["sec"] / 1e12 / peak_sheet, 3)
                    if result["matmul_bf16_tflops_measured"]:
                        row[name]["mfu_vs_measured_matmul"] = round(
                            r["flops"] / r["sec"] / 1e12 / result["matmul_bf16_tflops_measured"], 3)
                else:
                    weights = "bf16" if name == "hf_bf16" else "fp32_autocast"
                    sec = bench_hf(cfg, inputs, act_token_id, action_dim, chunk, finetune, weights, device,
                                   warmup, iters)
                    row[name] = {"ms_per_step": round(sec * 1e3, 2), "samples_per_s": round(batch / sec, 2),
                                 "peak_gb": _peak_gb(device)}
            except torch.cuda.OutOfMemoryError as e:  # report, do not hide
                row[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            except Exception as e:  # noqa: BLE001 - e.g. a compile failure: a result, the other rows still run
                if not name.startswith("ours_compiled"):
                    raise
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[{finetune}] {name}: {row[name]}", file=sys.stderr, flush=True)
        for mine in [r for r in row if r.startswith("ours")]:
            ours = row.get(mine, {}).get("samples_per_s")
            for base in ("hf_bf16", "hf_autocast", "ours_ref", "ours"):
                other = row.get(base, {}).get("samples_per_s")
                if ours and other and mine != base:
                    row[f"{mine}_over_{base}"] = round(ours / other, 3)
        result["results"][finetune] = row
    if args.alternate:
        _free(device)
        result["alternate"] = alternate(cfg, inputs, tmp.name, batch, image_px, n_act, device, world_dim, act_token_id,
                                        action_dim, chunk, args.alternate, iters, args.ours_variant)
        print(f"[alternate] {result['alternate']}", file=sys.stderr, flush=True)
    if args.sync_cost:
        _free(device)
        result["sync_cost"] = sync_cost(tmp.name, batch, image_px, n_act, device, world_dim, args.sync_cost, iters)
        print(f"[sync_cost] {result['sync_cost']}", file=sys.stderr, flush=True)
    if args.check:
        _free(device)
        result["same_numbers"] = check_same_numbers(tmp.name, batch, image_px, n_act, device, world_dim,
                                                    compile_=args.compile, variant=args.ours_variant)
        _free(device)
        result["same_numbers_cached_vision"] = check_cached_vision(tmp.name, batch, image_px, n_act, device,
                                                                   world_dim)
        print(f"[check] {result['same_numbers']}", file=sys.stderr, flush=True)
    if args.memory_cell:
        _free(device)
        result["memory_cell"] = memory_cell(tmp.name, image_px, n_act, device, world_dim, args.cap_gb, args.variants,
                                            warmup, iters, args.profile)
    tmp.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    main()
