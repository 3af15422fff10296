"""VLAPolicy: Qwen-VL backbone -> <ACT_i> readout (+ proprio) -> optional Model-F world memory -> action head.

    prompt = [image: agent view][image: wrist view] instruction <ACT_0> ... <ACT_{H-1}>
    h      = LayerNorm(last hidden state at the ACT positions)            [B, H, d]
    h      = h + StateMLP(normalised state)                               (use_state)
    h      = h + tanh(g) * CrossAttn(h, memory)                           (memory != none; g starts at 0)
    loss   = head loss on the normalised action chunk + w * Prophet loss  (the policy owns the Prophet)

Memory modes (`cfg.memory` in training, `cfg.rollout_memory` / `memory_mode=` at evaluation). The memory is
given to the memory module in the Prophet's standardised latent space ((z - mean) / std, the statistics the
trainer sets with `set_world_normalization`), so "zero" means "the average latent" and a norm-matched
Gaussian is a fair content-free replacement:
    pred     Prophet(world_history) (detached from the Prophet unless detach_memory=False)     -- E2
    zero     all zeros                                                                            -- E1
    random   Gaussian with the per-slot norms of the pred memory
    shuffle  another sample's pred memory (batch rolled by one; at batch size 1 a memory from an earlier call)
    oracle   the true future latents world_future
    none     no memory module at all                                                              -- E0

Precision: every trainable parameter (and so the AdamW state) is fp32; frozen backbone weights may be bf16
(`frozen_dtype`); compute runs under torch.autocast(bfloat16) when `autocast_bf16` is set, in `forward` and in
`predict_action` alike. `check_precision()` refuses anything else.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vla_core.policy.backbone import VLBackbone
from vla_core.policy.config import PolicyConfig
from vla_core.policy.heads import FlowHead, MSEHead, masked_mse
from vla_core.policy.memory import GatedMemoryAttention, ShuffleBank, random_like_memory
from vla_core.policy.processing import PolicyProcessor, image_grid_thw, move_to_device, pixel_values_from_images
from vla_core.utils import WmvlaError

log = logging.getLogger(__name__)

# LoRA targets: the language model's attention and MLP projections (not the vision tower, whose Qwen2.5-VL
# MLP uses the same gate/up/down names).
LORA_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _resolve_frozen_dtype(cfg: PolicyConfig) -> torch.dtype:
    if cfg.frozen_dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() and cfg.autocast_bf16 else torch.float32
    else:
        dtype = torch.bfloat16 if cfg.frozen_dtype == "bfloat16" else torch.float32
    if dtype == torch.bfloat16 and not cfg.autocast_bf16:
        raise WmvlaError("frozen_dtype=bfloat16 needs autocast_bf16=True (bf16 frozen weights next to fp32 trainable "
                         "ones only compose under autocast); set autocast_bf16=True or frozen_dtype=float32 "
                         "(`wmvla train --policy.autocast-bf16` or `--policy.frozen-dtype float32`)")
    return dtype


class VLAPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, stats: Mapping):
        super().__init__()
        self.cfg = cfg
        self.stats = stats
        self.backbone = VLBackbone(cfg)
        self.processor = PolicyProcessor.from_backbone(cfg, self.backbone, stats)
        d = self.backbone.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed + 2)
            # The ACT readout is normalised so the heads see the same scale for every backbone (the Qwen final
            # RMSNorm output has a large per-channel scale).
            self.readout_norm = nn.LayerNorm(d)
            # Proprio: projected and added to every ACT state, not inserted as a prompt token. (1) The
            # normalised state reaches the heads unblurred by 28 bf16 layers; (2) the prompt stays the model's own
            # format, text and image tokens only (positions and image masks follow transformers' rules);
            # (3) it is on from step 0 with no gate: every experiment (E0..E3) has it, unlike the memory,
            # whose zero gate exists to make E1 == E0 at the start.
            self.state_proj = (nn.Sequential(nn.Linear(cfg.state_dim, d), nn.SiLU(), nn.Linear(d, d))
                               if cfg.use_state else None)
            if cfg.has_memory:
                from vla_core.world.prophet import Prophet, ProphetConfig

                self.memory = GatedMemoryAttention(d, cfg.world_dim, cfg.world_horizon, cfg.memory_heads,
                                                   cfg.memory_gate)
                self.prophet = Prophet(ProphetConfig(
                    dim=cfg.world_dim, history=cfg.world_history, horizon=cfg.world_horizon, width=cfg.prophet_width,
                    depth=cfg.prophet_depth, heads=cfg.prophet_heads, delta=cfg.prophet_delta, loss=cfg.prophet_loss))
            else:
                self.memory = None
                self.prophet = None
            if cfg.head == "mse":
                self.head = MSEHead(d, cfg.head_hidden, cfg.action_dim)
            else:
                self.head = FlowHead(d, cfg.flow_width, cfg.flow_depth, cfg.flow_heads, cfg.action_dim,
                                     cfg.chunk_size, cfg.flow_steps, cfg.flow_time_sampling)
        self._shuffle_bank = ShuffleBank(cfg.shuffle_bank_size)
        # Randomness of the memory ablations (random noise, shuffle-bank draws) has its own CPU stream, so the
        # action-noise generator passed to forward/predict_action draws the same numbers in every memory mode
        # (paired ablations compare the same flow noise).
        self.memory_rng = torch.Generator().manual_seed(cfg.init_seed + 7)
        self._configure_finetuning()
        self._autocast_cache = True
        self._checkpointing = False
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.check_precision()

    def compile_blocks(self, mode: str | None = None, options: dict | None = None, vision_region: str = "blocks",
                       vision_mode: str | None = None, decoder_region: str = "layers",
                       decoder_mode: str | None = None) -> int:
        """torch.compile every decoder layer and vision block in place (`nn.Module.compile`: parameter names and
        checkpoints unchanged; all layers of a kind share one compiled graph), and on a GPU the policy's own
        modules around the backbone (state projection, Prophet, memory attention, the head's network). Fuses the
        elementwise work between the matmuls and removes most kernel launches (docs/benchmarks.md). Returns the
        number of modules compiled. `mode` / `options`: torch.compile's (one or the other).

        Fewer, larger regions (Qwen3-VL; options of benchmarks/bench_train.py, not used by the trainer: on the
        H200, full fine-tuning took 175-188 ms per step with both below against 180-208 ms per block, within
        the lent machines' noise, LoRA 9 % longer, and they take ~2.5 minutes instead of ~40 s to compile;
        docs/benchmarks.md):
        - `vision_region="tower"` (grid inputs precomputed): the whole vision tower as ONE compiled region
          instead of one per block (its shapes are fixed by `image_size`, and with the grid inputs precomputed
          it traces without a graph break), `vision_mode` its torch.compile mode (e.g. reduce-overhead: one
          CUDA graph for the tower's forward and one for its backward).
        - `decoder_region="stack"` (the backbone's sync-free forward): the language model's whole forward (all
          decoder layers, the DeepStack additions, rotary embedding, mask, final norm) as ONE region,
          `decoder_mode` its mode. Each region's Python wrappers then run once per step instead of per layer.
        Both are refused under gradient checkpointing (one region would trace through the per-layer
        checkpoints)."""
        import torch._dynamo

        # 28 + 24 modules of two kinds, each compiled once per input shape (sequence lengths vary per batch)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if vision_region not in ("blocks", "tower"):
            raise WmvlaError(f"vision_region={vision_region!r}; expected 'blocks' or 'tower'")
        if decoder_region not in ("layers", "stack"):
            raise WmvlaError(f"decoder_region={decoder_region!r}; expected 'layers' or 'stack'")
        bb = self.backbone
        visual, lm = bb.vision_tower, bb.language_model
        tower, stack = vision_region == "tower", decoder_region == "stack"
        if tower and (bb.vision_grid_inputs is None or self._checkpointing):
            raise WmvlaError("vision_region='tower' needs a Qwen3-VL tower with precomputed grid inputs and no "
                             "gradient checkpointing (one region would trace through the per-block checkpoints). "
                             "Fix: vision_region='blocks'.")
        if stack and (not bb.sync_free_forward or self._checkpointing):
            raise WmvlaError("decoder_region='stack' needs a Qwen3-VL backbone with its sync-free forward and no "
                             "gradient checkpointing (one region would trace through the per-layer checkpoints). "
                             "Fix: decoder_region='layers'.")
        blocks = ([] if stack else list(lm.layers)) + ([] if tower else list(getattr(visual, "blocks", [])))
        # the policy's modules: a few hundred small eager kernels between the backbone and the backward on a GPU
        # (the memory's finiteness check is deferred in training, so the memory module compiles without a
        # break); on a CPU there is no launch cost to remove, only compile time
        if self.device.type == "cuda":
            blocks += [m for m in (self.state_proj, self.prophet, self.memory) if m is not None]
            blocks += list(self.head.blocks) if isinstance(self.head, FlowHead) else [self.head]
        def settings(region_mode: str | None) -> dict:  # a region's own mode, else the blocks' mode or options
            return {"mode": region_mode or mode, "options": None if (region_mode or mode) else options}

        for block in blocks:
            block.compile(**settings(None))
        if tower:  # transformers' own forward, called by the tower's `_vision_forward` (install_vision_forward)
            visual._wmvla_hf_forward = torch.compile(visual._wmvla_hf_forward, **settings(vision_mode))
        if stack:
            lm.compile(**settings(decoder_mode))
        return len(blocks) + int(tower) + int(stack)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every decoder layer / vision block in backward (the trainer's memory plan may call this
        after building the policy). Autocast's cache of bf16 weight copies is turned off with it: under
        checkpointing the forward keeps no activations, and the cache alone would hold a bf16 copy of every
        fp32 trainable weight (4.3 GB for 2B) until the forward ends; a re-cast per layer costs far less."""
        model = self.backbone.model
        kwargs = {"use_reentrant": False}  # frozen embeddings: the reentrant variant would drop gradients
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._autocast_cache = False
        self._checkpointing = True

    @classmethod
    def from_config(cls, cfg: PolicyConfig, stats: Mapping) -> "VLAPolicy":
        """The same modules (and, for the tiny backbone, the same seeded weights); then load_trainable_state_dict."""
        return cls(cfg, stats)

    # ------------------------------------------------------------------------------ trainable set, dtypes

    def _configure_finetuning(self) -> None:
        cfg = self.cfg
        if cfg.finetune == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=LORA_TARGET_REGEX, bias="none")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.init_seed + 3)
                inject_adapter_in_model(lora, self.backbone.model)
            if not any("lora_" in n for n, _ in self.named_parameters()):
                raise WmvlaError(f"LoRA found no target modules matching {LORA_TARGET_REGEX!r} in {cfg.backbone!r}")
        frozen_dtype = _resolve_frozen_dtype(cfg)
        for name, p in self.named_parameters():
            trainable = self._is_trainable(name)
            p.requires_grad_(trainable)
            p.data = p.data.to(torch.float32 if trainable else frozen_dtype)

    def _is_trainable(self, name: str) -> bool:
        if not name.startswith("backbone."):
            return True  # new modules: readout norm, state projection, memory, Prophet, head
        if name.endswith("embed_tokens.act_weight"):
            return True  # the <ACT_i> rows train in every mode
        if "lora_" in name:
            return True
        mode = self.cfg.finetune
        if mode == "full":
            return True
        if mode == "frozen_vision":
            return ".visual." not in name
        return False  # lora, heads_only: the backbone's own weights are frozen

    def check_vision_cache_allowed(self) -> None:
        """Cached vision-tower outputs stand in for the tower only while it is frozen (its output then never
        changes); refuse them when it trains (`finetune=full`)."""
        if getattr(self, "_vision_frozen", False):
            return
        trains = [n for n, p in self.named_parameters() if ".visual." in n and p.requires_grad]
        self._vision_frozen = not trains
        if trains:
            raise WmvlaError(
                f"a vision-feature cache was given but the vision tower trains (finetune={self.cfg.finetune!r}, "
                f"{len(trains)} trainable tower parameters, e.g. {trains[0]}): its outputs change every step, a "
                "cache of them would be stale. Fix: drop --vision-cache, or freeze the tower "
                "(--policy.finetune frozen_vision / lora / heads_only).")

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer must update -- give exactly these to it."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @staticmethod
    def parameter_group(name: str) -> str:
        if name.endswith("act_weight"):
            return "act_embedding"
        if "lora_" in name:
            return "lora"
        if name.startswith("backbone."):
            return "backbone.vision" if ".visual." in name else "backbone.language"
        return name.split(".")[0]

    def trainable_summary(self) -> dict[str, int]:
        """Parameter counts per group: trainable ones by group, plus `trainable_total` and `frozen_total`."""
        out: dict[str, int] = {}
        frozen = 0
        for n, p in self.named_parameters():
            if p.requires_grad:
                g = self.parameter_group(n)
                out[g] = out.get(g, 0) + p.numel()
            else:
                frozen += p.numel()
        out = dict(sorted(out.items()))
        out["trainable_total"] = sum(out.values())
        out["frozen_total"] = frozen
        return out

    def check_precision(self) -> None:
        """Refuse trainable parameters that are not fp32 (bf16 AdamW updates below ~2^-8 relative vanish)."""
        bad = [f"{n} ({p.dtype})" for n, p in self.trainable_parameters() if p.dtype != torch.float32]
        if bad:
            raise WmvlaError(f"trainable parameters must be float32 (master weights), found: {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}. Do not cast the policy with .half()/.bfloat16(); "
                             "use autocast_bf16 for bf16 compute.")

    def _persistent_keys(self) -> set[str]:
        """Keys of the trainable-weights state dict: trainable parameters + persistent buffers (the Prophet's
        latent mean/std; transformers' rotary buffers are not persistent)."""
        state_keys = set(self.state_dict().keys())
        params = dict(self.named_parameters())
        return {n for n, p in params.items() if p.requires_grad} | {n for n in state_keys if n not in params}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must store: trainable weights (+ Prophet normalisation buffers); no frozen backbone."""
        keys = self._persistent_keys()
        return {k: v.detach() for k, v in self.state_dict().items() if k in keys}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a `trainable_state_dict`; every trainable key must be present and no other key."""
        expected = self._persistent_keys()
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise WmvlaError(f"trainable state dict does not match this policy config: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]} ({len(missing)} / {len(unexpected)} in all). "
                             "Build the policy from the checkpoint's own config.")
        self.load_state_dict(dict(state_dict), strict=False)
        self.check_precision()

    def first_step_zero_grad_patterns(self) -> tuple[str, ...]:
        """Glob patterns of trainable parameters whose gradient is exactly zero at the first step, by design.

        - the memory block behind the closed gate (tanh(0) = 0 multiplies its output; only the gate itself
          gets a gradient at step 1, the rest from step 2 on);
        - LoRA A matrices (B starts at zero, so dL/dA = 0 until B has moved);
        - the memory input projection's weight under zero memory (its input is all zeros);
        - the Prophet behind its zero-initialised output layer (delta prediction starts at copy-the-present).
        Everything else must get a non-zero gradient at step 1 (train.checks.check_first_step).
        """
        patterns = []
        if self.memory is not None:
            patterns += [f"memory.{n}" for n, _ in self.memory.named_parameters() if n != "gate"]
        if self.prophet is not None and self.cfg.prophet_delta:
            # the Prophet's zero-initialised output layer (delta = 0: copy-the-present) shields the rest
            patterns += [f"prophet.{n}" for n, _ in self.prophet.named_parameters() if not n.startswith("out_proj.")]
        if self.cfg.finetune == "lora":
            patterns.append("*.lora_A.*")
        return tuple(patterns)

    def gate_value(self) -> float | None:
        """|tanh(g)| of the memory gate (mean over channels); None without memory (E0)."""
        return None if self.memory is None else float(torch.tanh(self.memory.gate.detach()).abs().mean())

    @property
    def tokenizer(self):
        """The tokenizer with the <ACT_i> tokens (save it with the checkpoint)."""
        return self.backbone.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_world_normalization(self, mean, std) -> None:
        """Per-dimension latent mean/std (from the latent cache) for the Prophet and the memory space."""
        if self.prophet is None:
            raise WmvlaError("this policy has no world memory (memory=none): nothing to normalise")
        self.prophet.set_normalization(mean, std)

    def autocast(self):
        device_type = self.device.type
        if not self.cfg.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=self._autocast_cache)

    # -------------------------------------------------------------------------------------------- model

    def prepare(self, batch: Mapping) -> dict:
        """Raw batch (images/state/task...) or already processed one -> processed tensors on the model's device."""
        inputs = batch if "input_ids" in batch else self.processor(batch)
        ids = inputs["input_ids"]
        if isinstance(ids, torch.Tensor) and ids.device.type == "cpu":  # free on the host, a sync on the device
            images = inputs.get("vision_features", inputs.get("images"))
            if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim >= 2:
                self.backbone.check_image_tokens(ids, int(images.shape[0]) * int(images.shape[1]))
        return move_to_device(inputs, self.device)

    def encode(self, inputs: Mapping) -> torch.Tensor:
        """Processed inputs -> ACT states [B, H, d] (fp32) after readout norm and proprio."""
        bb = self.backbone
        cached = inputs.get("vision_features")  # [B, n_cams, 1 + n_deepstack, tokens, d] from the vision cache
        if cached is not None:
            self.check_vision_cache_allowed()
            # the tower is skipped: no pixels (the images need not even be loaded), only the grid (token
            # counts, M-RoPE positions)
            side = self.cfg.image_size // bb.patch_size
            pixel_values = torch.zeros(0, 3 * bb.temporal_patch_size * bb.patch_size**2, device=cached.device)
            n_images = cached.shape[0] * cached.shape[1]
            grid = image_grid_thw(n_images, side, side)
            cached = cached.flatten(0, 1)
        else:
            images = inputs["images"]  # uint8 [B, n_cams, 3, S, S]
            pixel_values, grid = pixel_values_from_images(images.flatten(0, 1), bb.image_mean, bb.image_std,
                                                          bb.patch_size, bb.merge_size, bb.temporal_patch_size)
        hidden = bb(inputs["input_ids"], inputs["attention_mask"], pixel_values, grid, inputs["mm_token_type_ids"],
                    vision_features=cached)
        index = inputs["act_index"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        h = self.readout_norm(hidden.gather(1, index).float())
        if self.state_proj is not None:
            h = h + self.state_proj(inputs["state"].to(h.dtype)).unsqueeze(1)  # same state for all H
        return h.float()

    def reset_memory_rng(self, seed: int) -> None:
        """Reseed the memory-ablation stream (random / shuffle); e.g. once per evaluation run."""
        self.memory_rng.manual_seed(seed)

    def _memory(self, mode: str, inputs: Mapping, world_pred: torch.Tensor | None) -> torch.Tensor:
        """Memory [B, K, D] in the Prophet's standardised latent space for the given mode."""
        b = inputs["input_ids"].shape[0]
        shape = (b, self.cfg.world_horizon, self.cfg.world_dim)
        if mode == "zero":
            return torch.zeros(shape, device=self.device)
        if mode == "oracle":
            if inputs.get("world_future") is None:
                raise WmvlaError("memory mode oracle needs world_future (the true future latents); at rollout they "
                                 "do not exist -- evaluate with rollout_memory=pred/zero/random/shuffle "
                                 "(`wmvla eval --rollout-memory pred`)")
            return self.prophet.normalize(inputs["world_future"])
        if world_pred is None:
            raise WmvlaError(f"memory mode {mode} needs world_history [B, T={self.cfg.world_history}, "
                             f"D={self.cfg.world_dim}] (the Prophet's input)")
        pred = self.prophet.normalize(world_pred.detach() if self.cfg.detach_memory or mode != "pred" else world_pred)
        if mode == "pred":
            return pred
        if mode == "random":
            return random_like_memory(pred, self.memory_rng)
        if mode == "shuffle":
            if b > 1:
                out = pred.roll(1, dims=0)
            else:
                drawn = self._shuffle_bank.draw(1, self.memory_rng)
                if drawn is None:
                    log.warning("shuffle memory at batch size 1 with an empty bank: using zeros for this call")
                    out = torch.zeros_like(pred)
                else:
                    out = drawn.to(pred.device)
            self._shuffle_bank.push(pred)
            return out
        raise WmvlaError(f"unknown memory mode {mode!r}")

    def _resolve_mode(self, memory_mode: str | None, rollout: bool) -> str:
        cfg = self.cfg
        if memory_mode is None:
            memory_mode = (cfg.rollout_memory or cfg.memory) if rollout else cfg.memory
            if rollout and memory_mode == "oracle" and cfg.rollout_memory is None:
                raise WmvlaError("trained with oracle memory: choose rollout_memory (pred/zero/random/shuffle; "
                                 "`wmvla eval --rollout-memory pred`) or pass memory_mode=")
        if (memory_mode == "none") != (self.memory is None):
            raise WmvlaError(f"memory_mode={memory_mode!r} but this policy was built with memory={cfg.memory!r}: "
                             "none means the module does not exist (E0); a policy with the module uses zero instead")
        return memory_mode

    def _run(self, inputs: Mapping, mode: str, check_finite: bool = True) -> tuple[torch.Tensor, dict]:
        """Shared by forward and predict: ACT states after memory + diagnostics + Prophet prediction."""
        info: dict = {"memory_mode": mode}
        h = self.encode(inputs)
        world_pred = None
        if self.prophet is not None and inputs.get("world_history") is not None:
            world_pred = self.prophet(inputs["world_history"].float())
        info["world_pred"] = world_pred
        if self.memory is not None:
            mem = self._memory(mode, inputs, world_pred)
            info["memory_norm"] = mem.detach().float().norm(dim=-1).mean()
            h, mem_info = self.memory(h, mem.float(), check_finite=check_finite)
            info.update(mem_info)
        return h.float(), info

    def loss_counts(self, batch: Mapping) -> tuple[float, float]:
        """The number of terms each loss of `forward` averages over for this batch: (valid action chunk steps,
        valid future latents). Masked means of micro-batches / ranks with different counts only combine into
        the mean over the whole global batch when weighted by these (the training loop does this)."""
        def count(mask, shape) -> float:
            return float(mask.sum()) if mask is not None else float(shape[0] * shape[1])

        actions = batch.get("actions")
        n_action = count(batch.get("action_mask"), actions.shape[:2]) if actions is not None else 0.0
        future = batch.get("world_future")
        n_world = count(batch.get("future_mask"), future.shape[:2]) if future is not None else 0.0
        return n_action, n_world

    def forward(self, batch: Mapping, memory_mode: str | None = None,
                generator: torch.Generator | None = None,
                loss_weights: tuple[float, float] | None = None, defer_checks: bool = False) -> dict:
        """Training/validation step. Returns loss (with graph) and detached diagnostics:
        action_loss, world_loss, gate (|tanh g|), memory_norm, attn_entropy, memory_finite, memory_mode.

        defer_checks: no host sync inside the step (the GPU would drain and then wait for Python): the memory's
        finiteness is returned as `memory_finite` instead of checked, and the caller calls
        `train.checks.check_step_finite(out, step)` before it uses the step (the trainer: after backward, before
        the update).

        loss_weights: (a, w) -> loss = a * action_loss + w * world_loss_weight * world_loss (the reported
        action_loss / world_loss stay unweighted); the training loop passes count / mean count (see
        `loss_counts`) so that micro-batches and ranks average over the global batch exactly."""
        inputs = self.prepare(batch)
        if inputs.get("actions") is None:
            raise WmvlaError("forward needs `actions` (and action_mask) in the batch; use predict_action at rollout")
        mode = self._resolve_mode(memory_mode, rollout=False)
        with self.autocast():
            h, info = self._run(inputs, mode, check_finite=not defer_checks)
            action_loss = self.head.loss(h, inputs["actions"], inputs.get("action_mask"), generator)
            world_loss = None
            world_pred = info.pop("world_pred")
            if (world_pred is not None and inputs.get("world_future") is not None
                    and self.cfg.world_loss_weight > 0):
                mask = inputs.get("future_mask")
                if mask is None:
                    mask = torch.ones(world_pred.shape[:2], dtype=torch.bool, device=world_pred.device)
                world_loss = self.prophet.loss(world_pred.float(), inputs["world_future"].float(), mask)
        wa, ww = loss_weights if loss_weights is not None else (1.0, 1.0)
        loss = wa * action_loss.float()
        if world_loss is not None:
            loss = loss + ww * self.cfg.world_loss_weight * world_loss.float()
        out = {"loss": loss, "action_loss": action_loss.detach().float(),
               "world_loss": (world_loss.detach().float() if world_loss is not None
                              else torch.zeros((), device=loss.device))}
        out.update({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in info.items()})
        return out

    @torch.no_grad()
    def predict_normalized(self, batch: Mapping, memory_mode: str | None = None,
                           generator: torch.Generator | None = None, rollout: bool = True) -> torch.Tensor:
        """Normalised action chunks [B, H, A] (fp32) for a raw or processed batch; eval mode, same autocast."""
        was_training = self.training
        self.eval()
        try:
            inputs = self.prepare(batch)
            mode = self._resolve_mode(memory_mode, rollout=rollout)
            with self.autocast():
                h, _ = self._run(inputs, mode)
                return self.head.predict(h, generator).float()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_action(self, observation: Mapping | Sequence[Mapping], world_history=None,
                       memory_mode: str | None = None, generator: torch.Generator | int | None = None,
                       task: str | Sequence[str] | None = None, world_future=None) -> np.ndarray:
        """Raw observation(s) -> denormalised action chunk: [H, A] for one observation, [B, H, A] for a list.

        An observation is {"images": {camera_key: uint8 HxWx3} (or an array [n_cams, H, W, 3] in
        camera_keys order), "state": float [S], "task": str}; `task=` overrides/supplies the instruction.
        world_history: [T, D] or [B, T, D] latents for memory modes pred/random/shuffle. generator: a
        torch.Generator on the model's device or an int seed, for the flow head's noise (the memory ablations
        draw from `memory_rng`, so the same generator gives the same action noise in every memory mode).
        """
        single = isinstance(observation, Mapping)
        observations = [observation] if single else list(observation)
        if task is None:
            tasks = [o.get("task") for o in observations]
        else:
            tasks = [task] * len(observations) if isinstance(task, str) else list(task)
        inputs = self.processor.observations(observations, tasks)
        for key, value in (("world_history", world_history), ("world_future", world_future)):
            if value is not None:
                t = torch.as_tensor(np.asarray(value, dtype=np.float32) if not isinstance(value, torch.Tensor)
                                    else value, dtype=torch.float32)
                inputs[key] = t.unsqueeze(0) if t.ndim == 2 else t
        if isinstance(generator, int):
            generator = torch.Generator(device=self.device).manual_seed(generator)
        chunk = self.predict_normalized(inputs, memory_mode=memory_mode, generator=generator, rollout=True)
        actions = self.processor.unnormalize_actions(chunk)
        return actions[0] if single else actions

    def action_mse(self, batch: Mapping, memory_mode: str | None = None,
                   generator: torch.Generator | None = None) -> float:
        """MSE of predicted vs true normalised actions over valid steps (flow: sampled chunks)."""
        inputs = self.prepare(batch)
        pred = self.predict_normalized(inputs, memory_mode=memory_mode, generator=generator, rollout=False)
        return float(masked_mse(pred, inputs["actions"], inputs.get("action_mask")))
