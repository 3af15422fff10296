"""The GPU memory plan of a training run: what a step needs, and the cheapest settings that fit the GPU.

A step holds, besides the frozen weights: fp32 trainable weights, their fp32 gradients, two Adam moments,
optionally an EMA copy, and the activations of the micro-batch. For the default cell (libero-2b: Qwen3-VL-2B
full fine-tune, batch 32, two 224 px images, EMA 0.999) that is 43.5 GB of states alone, more than an L40S
(48 GB) can give once activations come. `plan_memory` walks the settings from the fastest / most exact to
the leanest and takes the first whose estimate fits `BUDGET_FRACTION` of the GPU:

    adam moments / EMA  fp32/fp32 -> bf16/fp32 -> bf16/bf16-offset      (train.optim; fp32 master weights always)
    per state level     full batch -> micro-batches of 1/2, 1/4         (gradient accumulation inside the step)
                        -> activation checkpointing with full batch -> 1/2 -> 1/4 -> 1/8 ... -> 1 sample

None of these changes what a step computes except the rounding of the bf16 states (tests: accumulation and
checkpointing give the same loss and gradients; bf16 states still learn). Micro-batches split each loaded
batch inside the step: the data order, `batch_size` and `grad_accum` stay what the config says.

The activation model is arithmetic, calibrated on the H200 (docs/benchmarks.md, "Memory"): bytes per
(token x hidden width x layer) of a layer whose activations are kept for backward, ACT_BYTES_FULL without
checkpointing and ACT_BYTES_CKPT with it (the layer input kept, one layer recomputed at a time), plus the
bf16 copies autocast caches of the fp32 weights during the forward (2 bytes per trainable weight; the
policy turns that cache off under checkpointing). When nothing fits, the run stops before its first step
with the numbers and the fixes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vla_core.utils import WmvlaError

GB = 1e9
BUDGET_FRACTION = 0.88  # of total_memory: allocator fragmentation, CUDA context, temporaries of the optimizer
# Per token x width x layer, bf16 autocast. Fitted to the H200 peaks of the libero-2b cell at micro-batch 8
# (2026-12-04, docs/benchmarks.md "Memory"): no checkpointing 42.0 GB measured (11.7 GB over the states,
# 4.3 GB of it autocast's weight cache), checkpointing 44.75 GB (1.4 GB over the states); rounded up.
ACT_BYTES_FULL = 52.0
ACT_BYTES_CKPT = 10.0
PROMPT_TEXT_TOKENS = 64  # chat template + instruction, generous
STATE_LEVELS = (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"))


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the policy (read off the built model by `shape_of`)."""

    trainable: int  # trainable parameter values (fp32)
    frozen_bytes: int  # bytes of the frozen parameters
    text_width_layers: int  # hidden size x decoder layers of the language model
    vision_width_layers: int  # hidden size x blocks of the vision tower (0 when it is frozen: nothing kept)
    tokens_per_sample: int  # language-model sequence length
    patches_per_sample: int  # vision-tower patches of all cameras of one sample


def shape_of(policy, n_cameras: int) -> ModelShape:
    bb = policy.backbone
    cfg = bb.model.config
    trainable = frozen = 0
    vision_trainable = False
    for n, p in policy.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            vision_trainable |= ".visual." in n
        else:
            frozen += p.numel() * p.element_size()
    tc, vc = cfg.text_config, cfg.vision_config
    patches = (policy.cfg.image_size // bb.patch_size) ** 2
    return ModelShape(
        trainable=trainable, frozen_bytes=frozen,
        text_width_layers=int(tc.hidden_size) * int(tc.num_hidden_layers),
        vision_width_layers=int(vc.hidden_size) * int(vc.depth) if vision_trainable else 0,
        tokens_per_sample=PROMPT_TEXT_TOKENS + n_cameras * (bb.tokens_per_image + 2) + policy.cfg.chunk_size,
        patches_per_sample=n_cameras * patches,
    )


@dataclass(frozen=True)
class MemoryPlan:
    gradient_checkpointing: bool
    micro_batch: int
    adam_state_dtype: str
    ema_dtype: str
    estimate_bytes: int
    states_bytes: int
    total_bytes: int
    source: str  # "auto" (picked for this GPU) or "config" (as configured)

    def summary(self) -> str:
        return (f"{'activation checkpointing' if self.gradient_checkpointing else 'no checkpointing'}, micro-batch "
                f"{self.micro_batch}, Adam moments {self.adam_state_dtype}, EMA {self.ema_dtype}: estimated peak "
                f"{self.estimate_bytes / GB:.1f} GB (states {self.states_bytes / GB:.1f} GB) of "
                f"{self.total_bytes / GB:.1f} GB ({self.source})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def states_bytes(shape: ModelShape, adam: str, ema: str, ema_on: bool, shards: int = 1) -> int:
    """Weights + gradients + Adam moments + EMA (trainable ones divided over `shards` FSDP processes)."""
    per_trainable = 4 + 4 + 2 * _bytes(adam) + (_bytes(ema) if ema_on else 0)
    return int(shape.trainable * per_trainable / shards + shape.frozen_bytes / shards)


def activation_bytes(shape: ModelShape, micro_batch: int, checkpointing: bool, shards: int = 1) -> int:
    per_unit = ACT_BYTES_CKPT if checkpointing else ACT_BYTES_FULL
    units = shape.tokens_per_sample * shape.text_width_layers + shape.patches_per_sample * shape.vision_width_layers
    cast_cache = 0 if checkpointing else 2 * shape.trainable / shards  # autocast's bf16 copies of fp32 weights
    return int(micro_batch * units * per_unit + cast_cache)


def estimate(shape: ModelShape, micro_batch: int, checkpointing: bool, adam: str, ema: str, ema_on: bool,
             shards: int = 1) -> tuple[int, int]:
    """(estimated peak bytes, of which states)."""
    s = states_bytes(shape, adam, ema, ema_on, shards)
    return s + activation_bytes(shape, micro_batch, checkpointing, shards), s


def _micro_batches(batch: int, smallest: int) -> list[int]:
    out, m = [], batch
    while m >= smallest:
        out.append(m)
        if m == 1:
            break
        m = max(1, m // 2)
    return out


def candidates(batch: int, fsdp: bool):
    """Settings from the fastest / most exact to the leanest (see the module doc)."""
    levels = STATE_LEVELS[:1] if fsdp else STATE_LEVELS  # FSDP shards the fp32 states instead
    for adam, ema in levels:
        for m in _micro_batches(batch, max(1, batch // 4)):
            yield False, m, adam, ema
        for m in _micro_batches(batch, 1):
            yield True, m, adam, ema


def plan_memory(shape: ModelShape, batch: int, ema_on: bool, total_bytes: int, shards: int = 1) -> MemoryPlan:
    """The first candidate whose estimate fits BUDGET_FRACTION of `total_bytes`; WmvlaError if none does."""
    budget = BUDGET_FRACTION * total_bytes
    for ckpt, m, adam, ema in candidates(batch, fsdp=shards > 1):
        est, st = estimate(shape, m, ckpt, adam, ema, ema_on, shards)
        if est <= budget:
            return MemoryPlan(ckpt, m, adam, ema if ema_on else "float32", est, st, total_bytes, "auto")
    adam, ema = STATE_LEVELS[0] if shards > 1 else STATE_LEVELS[-1]
    est, st = estimate(shape, 1, True, adam, ema, ema_on, shards)
    need_gpus = max(2, math.ceil(states_bytes(shape, "float32", "float32", ema_on) / (budget * 0.8)))
    raise WmvlaError(
        f"this cell does not fit the GPU: {shape.trainable / 1e9:.2f} B trainable parameters need about "
        f"{est / GB:.1f} GB (states {st / GB:.1f} GB) even with bf16 Adam moments, a bf16 EMA offset, activation "
        f"checkpointing and micro-batches of 1, over {shards} process(es); {budget / GB:.1f} GB of "
        f"{total_bytes / GB:.1f} GB are usable. Fix: shard over more GPUs (`gpus_per_cell` >= {need_gpus} with "
        "`--distributed fsdp`), or train fewer weights (`--policy.finetune frozen_vision` or `lora`), or a GPU with "
        "more memory.")


def configured_plan(shape: ModelShape, optim, checkpointing: bool, ema_on: bool, total_bytes: int,
                    shards: int = 1) -> MemoryPlan:
    """The plan the config spells out (`--memory-plan off`)."""
    m = optim.micro_batch or optim.batch_size
    est, st = estimate(shape, m, checkpointing, optim.adam_state_dtype, optim.ema_dtype, ema_on, shards)
    return MemoryPlan(checkpointing, m, optim.adam_state_dtype, optim.ema_dtype if ema_on else "float32", est, st,
                      total_bytes, "config")


def device_total_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def split_batch(batch: dict, micro_batch: int) -> list[dict]:
    """A processed batch -> consecutive micro-batches of at most `micro_batch` samples (tensors and lists whose
    first dimension is the batch are split; everything else is shared)."""
    n = int(batch["input_ids"].shape[0])
    if micro_batch <= 0 or micro_batch >= n:
        return [batch]
    out = []
    for lo in range(0, n, micro_batch):
        hi = min(n, lo + micro_batch)
        part = {}
        for k, v in batch.items():
            if (isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n) or (isinstance(v, list) and len(v) == n):
                part[k] = v[lo:hi]
            else:
                part[k] = v
        out.append(part)
    return out


def oom_message(plan: MemoryPlan | None, err: BaseException) -> str:
    what = plan.summary() if plan is not None else "no memory plan (CPU or --memory-plan off)"
    return (f"out of GPU memory in the first training step ({what}): {str(err).splitlines()[0]}. Fix: "
            "`--memory-plan auto` (picks checkpointing, micro-batches and bf16 optimizer/EMA states for this GPU), "
            "or set them yourself: `--policy.gradient-checkpointing`, `--optim.micro-batch 8`, "
            "`--optim.adam-state-dtype bfloat16`, `--optim.ema-dtype bfloat16`; or shard over more GPUs "
            "(`gpus_per_cell`, `--distributed fsdp`).")
