"""Training configuration (`TrainConfig`) and named presets.

    wmvla train --preset tiny --dataset /tmp/ds --latents /tmp/ds.npy
    wmvla train --preset libero-2b --experiment E2 --policy.head flow --seed 1
    wmvla train --preset libero-2b --help          # every option with the preset's values as defaults

A preset is a complete TrainConfig; flags after it override single fields. The experiment decides the
policy's memory mode (E0 none / E1 zero / E2 pred / E3 oracle), so one preset serves the whole matrix.
Shapes that the data determines (state/action dims, camera keys, world latent width) are taken from the
dataset and the latent cache at start-up (`resolve_for_data`) and recorded in the run's config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

from vla_core.data.keys import DatasetKeys
from vla_core.data.normalize import NormConfig
from vla_core.policy.config import PolicyConfig, tiny_policy_config
from vla_core.utils import WmvlaError
from vla_core.world.encoder import WorldEncoderSpec

Experiment = Literal["E0", "E1", "E2", "E3"]
EXPERIMENTS = ("E0", "E1", "E2", "E3")

# Training memory of each experiment, and the rollout memory that is its own closed-loop condition.
# E3 trains with the true future latents, which do not exist online: it is evaluated with the Prophet's
# prediction (the Prophet is trained jointly in every memory experiment).
EXPERIMENT_MEMORY = {"E0": "none", "E1": "zero", "E2": "pred", "E3": "oracle"}
EXPERIMENT_ROLLOUT_MEMORY = {"E0": "none", "E1": "zero", "E2": "pred", "E3": "pred"}
EXPERIMENT_MEANING = {
    "E0": "no memory module (baseline)",
    "E1": "memory module fed zeros (capacity control)",
    "E2": "memory = Prophet's predicted future latents (trained jointly)",
    "E3": "memory = the true future latents (oracle upper bound; evaluated with the prediction)",
}


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay; gradient clipping and accumulation; optional EMA."""

    steps: int = 2000
    """optimizer steps (each of batch_size x grad_accum x processes samples)"""
    batch_size: int = 16
    """micro-batch per process"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step"""
    lr: float = 1e-4
    """peak learning rate of the new modules (ACT rows, memory, Prophet, heads, LoRA)"""
    backbone_lr_scale: float = 1.0
    """the pretrained backbone's trainable weights use lr * this (full fine-tuning typically 0.1-0.3)"""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """cosine decays to lr * min_lr_ratio at `steps`"""
    weight_decay: float = 0.01
    """decoupled weight decay on matrices only (not on biases, norms, gates, embeddings rows)"""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """max global gradient norm (0 = no clipping)"""
    ema_decay: float = 0.0
    """EMA of the trainable weights (0 = off); when on, validation and the saved policy use the EMA weights"""
    micro_batch: int = 0
    """samples per forward/backward inside a step (0 = the whole batch_size): each loaded batch is split and
    its gradients accumulated, the step unchanged. Set by the memory plan under `--memory-plan auto`"""
    adam_state_dtype: Literal["float32", "bfloat16"] = "float32"
    """Adam moments' dtype (weights stay fp32 masters; train/optim.py). Set by the memory plan under auto"""
    ema_dtype: Literal["float32", "bfloat16"] = "float32"
    """EMA storage: float32 copy, or bfloat16 *offset* from the fp32 weights (train/optim.py; needs the
    AdamWLowMem optimizer, used then). Set by the memory plan under `--memory-plan auto`"""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        problems = []
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (expected >= 1)")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} (expected > 0)")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay={self.ema_decay} (expected 0 = off, or in (0, 1))")
        if self.micro_batch < 0:
            problems.append(f"micro_batch={self.micro_batch} (expected 0 = whole batch, or >= 1)")
        for name in ("adam_state_dtype", "ema_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                problems.append(f"{name}={getattr(self, name)!r} (expected float32 or bfloat16)")
        if problems:
            raise WmvlaError("invalid OptimConfig: " + "; ".join(problems))


@dataclass
class TrainConfig:
    """Train one VLA policy: one experiment (E0-E3), one head, one seed -> `<out_root>/<E>/<tag>/seed<k>`.

    Presets: `--preset tiny|demo|metaworld-gpu|libero-2b` sets every default; flags after it override.
    """

    # ---- data
    dataset: str = ""
    """LeRobot dataset folder (v3.0 / v2.1) or hub repo id"""
    dataset_revision: str | None = None
    keys: DatasetKeys = field(default_factory=DatasetKeys)
    """dataset column names (cameras, state, action, instruction = `task`, episode)"""
    norm: NormConfig = field(default_factory=NormConfig)
    """action normalisation; `--norm.passthrough-dims` with no value for a gripper outside [-1, 1]"""
    val_fraction: float = 0.05
    """fraction of episodes held out for validation (at least `val_min_episodes`), chosen by seed"""
    val_min_episodes: int = 1
    val_max_samples: int = 512
    """validation frames evaluated each time (a fixed, seeded subset of the held-out episodes' frames)"""

    # ---- world latents
    latents: str = ""
    """latent cache (.npy from `wmvla latents`); "" = the default path cache/<dataset>/...; unused by E0"""
    world: WorldEncoderSpec = field(default_factory=WorldEncoderSpec)
    """the world encoder the run expects; the cache must match it (None fields match anything)"""

    # ---- frozen vision tower
    vision_cache: str = ""
    """precomputed vision-tower outputs (.npy from `wmvla vision-cache`, same flags as this run) read instead of
    running the frozen tower on training/validation frames; "" = run the tower. Needs policy.finetune
    frozen_vision / lora / heads_only; refused unless its spec matches this run's policy and dataset. (The data
    path has no image augmentation; one added later must refuse the cache.)"""

    # ---- model and experiment
    experiment: Experiment = "E2"
    """E0 no memory | E1 zero memory | E2 predicted memory | E3 oracle (true future) memory"""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """policy; `memory`/`rollout_memory` are set from `experiment`, `init_seed` from `seed`, data shapes
    from the dataset. Precision: `policy.autocast_bf16` (bf16 compute; trainable weights stay fp32)"""

    # ---- optimisation
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    """seeds everything: data order, validation split, dropout, flow noise (per rank: seed + rank)"""

    # ---- output and bookkeeping
    out_root: str = "runs"
    """runs go to <out_root>/<experiment>/<tag>/seed<seed>"""
    run_dir: str = ""
    """explicit run folder (overrides the naming scheme)"""
    remote: str = ""
    """URI mirroring the run folder (s3://bucket/prefix/<run> or a folder): every checkpoint is uploaded when
    saved; a start without a local checkpoint resumes from the newest complete one there (docs/storage.md)"""
    log_every: int = 10
    val_every: int = 200
    """validate every N steps and at the end (0 = only at the end)"""
    ckpt_every: int = 500
    """checkpoint every N steps and at the end"""
    keep_checkpoints: int = 2
    """older periodic checkpoints are deleted (the final one is always kept)"""
    mean_baseline_check: Literal["fail", "warn", "off"] = "warn"
    """at the end: validation action error must be below predicting the mean action (else warn / fail)"""
    num_workers: int = 2
    """DataLoader worker processes"""
    device: str = "auto"
    """auto = cuda if available; ignored under accelerate launch (each process takes its GPU)"""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """with several processes (accelerate launch / torchrun): ddp = replicated weights; fsdp = weights,
    gradients and AdamW state sharded over the processes (PyTorch FSDP2, per decoder layer / vision block),
    for full fine-tuning of 4B/8B backbones. Same steps, same checkpoints; ignored with one process"""
    compile: bool = False
    """torch.compile the backbone's decoder layers and vision blocks for training (`VLAPolicy.compile_blocks`;
    the same loss and gradients, tested; evaluation stays eager). On in the GPU presets"""
    memory_plan: Literal["auto", "off"] = "auto"
    """on a GPU, auto picks activation checkpointing, micro-batches and bf16 Adam/EMA states from the GPU's
    memory (train/memory.py: the fastest settings whose estimate fits; a cell that cannot fit stops before its
    first step naming the fix) and overrides those four fields; off = use them as configured"""
    progress: bool = True
    """rich progress bar"""
    stop_after: int | None = None
    """stop after this optimizer step as if interrupted (a checkpoint is written; rerun to resume)"""

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise WmvlaError(f"experiment={self.experiment!r}; expected one of {list(EXPERIMENTS)}")
        if self.distributed not in ("ddp", "fsdp"):
            raise WmvlaError(f"distributed={self.distributed!r}; expected ddp or fsdp")
        if self.memory_plan not in ("auto", "off"):
            raise WmvlaError(f"memory_plan={self.memory_plan!r}; expected auto or off")
        if self.mean_baseline_check not in ("fail", "warn", "off"):
            raise WmvlaError(f"mean_baseline_check={self.mean_baseline_check!r}; expected fail|warn|off")
        if self.vision_cache:
            from vla_core.policy.vision_cache import check_vision_frozen

            check_vision_frozen(self.policy)
        # The experiment decides the memory; anything else would make E0..E3 labels lie.
        memory, rollout = EXPERIMENT_MEMORY[self.experiment], EXPERIMENT_ROLLOUT_MEMORY[self.experiment]
        if self.policy.memory != memory or self.policy.rollout_memory != rollout:
            self.policy = dataclasses.replace(self.policy, memory=memory, rollout_memory=rollout)
        # One seed per run: it also initialises the new modules (a repeat with another seed is a real repeat).
        if self.policy.init_seed != self.seed:
            self.policy = dataclasses.replace(self.policy, init_seed=self.seed)

    @property
    def uses_latents(self) -> bool:
        return self.experiment != "E0"

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def resolve_for_data(cfg: TrainConfig, features: dict, world_dim: int | None) -> tuple[TrainConfig, list[str]]:
    """Fill the policy's data-determined fields from the dataset features and the latent width.

    Returns the resolved config and one note per changed field (printed at start-up, so nothing changes
    silently). Camera and column names always come from `cfg.keys` (one source of truth).
    """
    p = cfg.policy
    keys = cfg.keys
    want = {
        "camera_keys": tuple(keys.camera_keys),
        "state_key": keys.state_key,
        "action_key": keys.action_key,
        "state_dim": int(_flat_dim(features[keys.state_key]["shape"])),
        "action_dim": int(_flat_dim(features[keys.action_key]["shape"])),
    }
    if world_dim is not None:
        want["world_dim"] = int(world_dim)
    notes = [f"policy.{k}: {getattr(p, k)!r} -> {v!r} (from the data)" for k, v in want.items() if getattr(p, k) != v]
    return dataclasses.replace(cfg, policy=dataclasses.replace(p, **want)), notes


def _flat_dim(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------ presets


def preset_tiny() -> TrainConfig:
    """CPU tests: tiny random Qwen3-VL, tiny world encoder, a few dozen steps."""
    return TrainConfig(
        keys=DatasetKeys(),
        val_fraction=0.2,
        val_max_samples=32,
        world=WorldEncoderSpec(encoder="tiny", window=2, image_size=32),
        experiment="E2",
        policy=tiny_policy_config(),
        optim=OptimConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=2, weight_decay=0.01, grad_clip=1.0),
        log_every=2,
        val_every=6,
        ckpt_every=6,
        num_workers=0,
        device="cpu",
        progress=False,
    )


# MetaWorld datasets written by `wmvla data generate` use these keys (agent view only by default).
METAWORLD_KEYS = DatasetKeys(image_key="observation.images.image", wrist_image_key=None)


def preset_demo() -> TrainConfig:
    """The offline MetaWorld demo on 2 CPU cores (`wmvla demo` sets the dataset and latents)."""
    return TrainConfig(
        keys=METAWORLD_KEYS,
        val_fraction=0.1,
        val_max_samples=128,
        world=WorldEncoderSpec(encoder="tiny", window=4, image_size=64),
        experiment="E2",
        policy=tiny_policy_config(image_size=64, chunk_size=8, world_history=4, world_horizon=4,
                                  head_hidden=128, flow_width=64, prophet_width=64, world_dim=64),
        optim=OptimConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.01, grad_clip=1.0),
        log_every=20,
        val_every=200,
        ckpt_every=200,
        keep_checkpoints=1,
        num_workers=0,
        device="cpu",
    )


def preset_metaworld_gpu() -> TrainConfig:
    """MetaWorld MT10 on one GPU: Qwen3-VL-2B (LoRA), V-JEPA 2 ViT-L latents, m=4."""
    return TrainConfig(
        keys=METAWORLD_KEYS,
        val_fraction=0.05,
        val_max_samples=1024,
        world=WorldEncoderSpec(encoder="facebook/vjepa2-vitl-fpc64-256", window=4),
        experiment="E2",
        policy=PolicyConfig(backbone="Qwen/Qwen3-VL-2B-Instruct", image_size=224, chunk_size=8,
                            world_dim=1024, world_history=4, world_horizon=4, finetune="lora",
                            autocast_bf16=True, frozen_dtype="bfloat16"),
        optim=OptimConfig(steps=20000, batch_size=32, lr=2e-4, warmup_steps=500, weight_decay=0.01,
                          grad_clip=1.0),
        log_every=20,
        val_every=1000,
        ckpt_every=2000,
        num_workers=8,
        compile=True,
    )


def preset_libero_2b() -> TrainConfig:
    """LIBERO (HuggingFaceVLA/libero) with Qwen3-VL-2B full fine-tuning and V-JEPA 2 ViT-L latents, m=4."""
    return TrainConfig(
        dataset="HuggingFaceVLA/libero",
        keys=DatasetKeys(),  # agent view + wrist, observation.state (8), action (7), task
        val_fraction=0.02,
        val_max_samples=2048,
        world=WorldEncoderSpec(encoder="facebook/vjepa2-vitl-fpc64-256", window=4),
        experiment="E2",
        policy=PolicyConfig(backbone="Qwen/Qwen3-VL-2B-Instruct", image_size=224, chunk_size=8, state_dim=8,
                            action_dim=7, world_dim=1024, world_history=4, world_horizon=4, finetune="full",
                            autocast_bf16=True, frozen_dtype="bfloat16", gradient_checkpointing=False),
        optim=OptimConfig(steps=30000, batch_size=32, lr=1e-4, backbone_lr_scale=0.2, warmup_steps=1000,
                          weight_decay=0.01, grad_clip=1.0, ema_decay=0.999),
        log_every=20,
        val_every=2000,
        ckpt_every=2000,
        num_workers=8,
        compile=True,
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": preset_tiny,
    "demo": preset_demo,
    "metaworld-gpu": preset_metaworld_gpu,
    "libero-2b": preset_libero_2b,
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise WmvlaError(f"unknown training preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
