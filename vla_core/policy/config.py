"""Policy configuration: one dataclass, JSON round-trip with `vla_core.utils.to_jsonable` / `from_dict`.

The config alone (plus the normalisation stats and the trainable-weights state dict) rebuilds a policy:
`VLAPolicy.from_config(cfg, stats)` constructs the same modules, and for the offline "tiny" backbone the
same seeded random backbone weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vla_core.utils import WmvlaError

FAMILIES = ("qwen3_vl", "qwen2_5_vl")
HEADS = ("mse", "flow")
MEMORY_MODES = ("none", "zero", "pred", "oracle", "random", "shuffle")
FINETUNE_MODES = ("full", "lora", "frozen_vision", "heads_only")


@dataclass
class TinyBackboneConfig:
    """Sizes of the offline random-init backbone (`backbone="tiny"`): same transformers classes, tiny widths."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    patch_size: int = 8
    """vision patch size; image_size must be a multiple of patch_size * 2 (the 2x2 merge)"""


@dataclass
class PolicyConfig:
    """VLA policy: Qwen-VL backbone + <ACT_i> readout + optional Model-F world memory + action head."""

    # --- backbone
    backbone: str = "tiny"
    """"tiny" (offline random-init, built in code), a hub id (Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct)
    or a local folder with config.json + weights + tokenizer"""
    family: str = "auto"
    """"auto" (read config.json's model_type; "tiny" -> qwen3_vl), "qwen3_vl" or "qwen2_5_vl\""""
    revision: str | None = None
    """hub revision (commit) for a hub id"""
    attn_implementation: str = "auto"
    """"auto": flash_attention_2 when the flash_attn package is installed and CUDA is used, else sdpa"""
    tiny: TinyBackboneConfig = field(default_factory=TinyBackboneConfig)
    init_seed: int = 0
    """seed for every randomly initialised weight (tiny backbone, ACT rows, new modules)"""

    # --- observation / action
    image_size: int = 224
    """square side every camera image is resized to (same function in training and rollout); must be a
    multiple of patch_size * merge_size (32 for Qwen3-VL, 28 for Qwen2.5-VL; 224 suits both)"""
    camera_keys: tuple[str, ...] = ("observation.images.image", "observation.images.image2")
    """dataset image keys, agent view first; each becomes a separate image in the prompt"""
    state_key: str = "observation.state"
    action_key: str = "action"
    state_dim: int = 8
    action_dim: int = 7
    chunk_size: int = 8
    """H: number of <ACT_i> tokens = actions predicted per forward"""
    use_state: bool = True
    """add the projected normalised proprio state to the ACT states"""
    prompt_template: str = "What action should the robot take to {task}?"
    """text after the images; `{task}` is replaced by the dataset's language instruction"""
    vectorized_positions: bool = True
    """compute M-RoPE position ids for the whole batch with a few tensor ops (`mrope_position_ids`, tested equal
    to transformers' get_rope_index) instead of transformers' per-sample Python loop with host syncs"""

    # --- action head
    head: str = "mse"
    """"mse" (MLP per ACT state) or "flow" (rectified flow over the whole chunk)"""
    head_hidden: int = 512
    """MSE head MLP width"""
    flow_width: int = 256
    flow_depth: int = 4
    flow_heads: int = 4
    flow_steps: int = 10
    """Euler steps at sampling time"""
    flow_time_sampling: str = "uniform"
    """training time distribution: "uniform" or "beta" (t = 1 - Beta(1.5, 1): more weight near the noise end)"""

    # --- world memory (Model-F) and the Prophet
    memory: str = "none"
    """memory mode used in training: none (E0: no memory module), zero (E1), pred (E2), oracle, random, shuffle"""
    rollout_memory: str | None = None
    """memory mode at evaluation; None = same as `memory` (oracle training needs an explicit choice)"""
    world_dim: int = 1024
    """D: world latent width (V-JEPA 2 ViT-L 1024, ViT-g 1408)"""
    world_history: int = 4
    """T: history latents fed to the Prophet"""
    world_horizon: int = 4
    """K: future latents the Prophet predicts = memory slots"""
    memory_heads: int = 8
    memory_gate: str = "scalar"
    """"scalar" or "channel" (one gate per model channel); initialised to 0 either way"""
    prophet_width: int = 512
    prophet_depth: int = 4
    prophet_heads: int = 8
    prophet_delta: bool = True
    prophet_loss: str = "both"
    """"mse", "cosine" or "both" on standardised latents (vla_core.world.prophet)"""
    world_loss_weight: float = 1.0
    """weight of the Prophet's loss in the total loss (the policy owns and trains the Prophet)"""
    detach_memory: bool = True
    """stop the action loss from training the Prophet through the memory (the Prophet learns from the world loss)"""
    shuffle_bank_size: int = 64
    """memories kept from earlier calls for shuffle mode at batch size 1"""

    # --- fine-tuning and precision
    finetune: str = "lora"
    """full | lora (peft on the language model's attention/MLP projections) | frozen_vision | heads_only"""
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    autocast_bf16: bool = True
    """compute under torch.autocast(bfloat16) in training and evaluation; trainable weights stay fp32"""
    frozen_dtype: str = "auto"
    """dtype of frozen backbone weights: "auto" (bfloat16 when CUDA is available, else float32), "bfloat16", "float32\""""
    gradient_checkpointing: bool = False
    """recompute each decoder layer / vision block in the backward pass instead of keeping its activations
    (about a third more compute, a fraction of the activation memory); the trainer's memory plan
    (`--memory-plan auto`) turns it on when the GPU needs it"""
    batched_vision_attention: bool = True
    """Qwen3-VL vision tower: one scaled_dot_product_attention call per layer over all images of the batch
    ([images, heads, patches, dim]; every image has the same size here) instead of transformers' one call
    per image after a `cu_seqlens.tolist()` host sync per layer. Same function (tested); off = transformers' path"""

    def __post_init__(self) -> None:
        self.camera_keys = tuple(self.camera_keys)
        self.validate()

    def validate(self) -> None:
        problems = []

        def check(name: str, value, allowed) -> None:
            if value not in allowed:
                problems.append(f"{name}={value!r} (expected one of {list(allowed)})")

        check("family", self.family, ("auto",) + FAMILIES)
        check("head", self.head, HEADS)
        check("memory", self.memory, MEMORY_MODES)
        if self.rollout_memory is not None:
            check("rollout_memory", self.rollout_memory, MEMORY_MODES)
            if (self.memory == "none") != (self.rollout_memory == "none"):
                problems.append(
                    f"rollout_memory={self.rollout_memory!r} with memory={self.memory!r}: a policy trained without the "
                    "memory module (none) cannot use one at rollout, and one with it cannot drop it (use zero)"
                )
        check("finetune", self.finetune, FINETUNE_MODES)
        check("memory_gate", self.memory_gate, ("scalar", "channel"))
        check("frozen_dtype", self.frozen_dtype, ("auto", "bfloat16", "float32"))
        check("prophet_loss", self.prophet_loss, ("mse", "cosine", "both"))
        check("flow_time_sampling", self.flow_time_sampling, ("uniform", "beta"))
        if not self.camera_keys:
            problems.append("camera_keys is empty (expected the agent view, optionally the wrist view)")
        for name in ("chunk_size", "action_dim", "state_dim", "image_size", "flow_steps", "world_dim",
                     "world_history", "world_horizon"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (expected >= 1)")
        if problems:
            raise WmvlaError("invalid PolicyConfig: " + "; ".join(problems))

    @property
    def has_memory(self) -> bool:
        """The Model-F memory module (and the Prophet) exist: every mode except none (E0)."""
        return self.memory != "none"

    @property
    def is_tiny(self) -> bool:
        return self.backbone == "tiny"

    def replace(self, **changes) -> "PolicyConfig":
        return dataclasses.replace(self, **changes)


def tiny_policy_config(**overrides) -> PolicyConfig:
    """A policy small enough for CPU tests and the demo: tiny random Qwen3-VL, 32 px images, small heads.

    Any PolicyConfig field can be overridden, e.g. `tiny_policy_config(head="flow", memory="pred")`.
    """
    base = dict(
        backbone="tiny",
        image_size=32,
        chunk_size=4,
        state_dim=4,
        action_dim=4,
        head_hidden=64,
        flow_width=32,
        flow_depth=2,
        flow_heads=2,
        flow_steps=8,
        world_dim=16,
        world_history=3,
        world_horizon=2,
        memory_heads=4,
        prophet_width=32,
        prophet_depth=1,
        prophet_heads=2,
        finetune="full",
        lora_rank=4,
        lora_alpha=8,
        autocast_bf16=False,
        frozen_dtype="float32",
        shuffle_bank_size=8,
    )
    base.update(overrides)
    return PolicyConfig(**base)
