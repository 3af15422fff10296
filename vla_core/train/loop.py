"""`wmvla train`: one readable training loop (nanoGPT / torchtitan style) on top of accelerate.

    wmvla train --preset tiny --dataset DS --latents DS_LATENTS.npy
    accelerate launch --num_processes 4 -m vla_core.cli train --preset libero-2b --dataset /data/libero
    torchrun --nproc_per_node 4 -m vla_core.cli train --preset libero-2b ...
    torchrun --nproc_per_node 4 -m vla_core.cli train --preset libero-2b --distributed fsdp \
        --policy.backbone Qwen/Qwen3-VL-8B-Instruct     # sharded weights / grads / AdamW state (FSDP2)

Order of one optimizer step: `grad_accum` micro-batches (DDP / FSDP gradient sync only on the last), gradient
clipping, AdamW step with the lr of the step (warmup + cosine, a pure function of the step), optional EMA
update, logging, validation, checkpoint. The data order, validation split and every random draw are seeded
(`seed + rank` per process), and the checkpoint carries optimizer, EMA, RNG and data position, so a run
killed at any point and started again with the same command continues exactly as if uninterrupted.

With `--distributed fsdp` (several processes) the loop shards the policy itself with FSDP2 (`train/fsdp.py`)
instead of wrapping it in DDP; validation then runs on every rank (a sharded forward needs all of them),
the checks read local shards, and checkpoints gather whole tensors to rank 0: the same checkpoint files.

Loud checks (the earlier attempt's silent failures, see LESSONS.md):
  - start-up: trainable weights fp32, every trainable parameter in the optimizer, nothing frozen in it;
    the dataset keys exist; the latent cache matches the expected encoder spec and the dataset;
  - first steps: every trainable parameter receives a non-zero gradient within the first
    `FIRST_CHECK_STEPS` steps (the memory branch gets its first gradient only after the gate opened in
    step 1) and changes; no frozen parameter changes; Adam moments are fp32;
  - every step: the loss is finite;
  - end: the validation action error must beat predicting the training-mean action (`mean_baseline_check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vla_core import telemetry
from vla_core.train.checks import (
    ParamSnapshot,
    check_first_step,
    check_fp32_trainable,
    check_optimizer_covers,
    check_optimizer_state_fp32,
    check_step_finite,
    grad_status,
    merge_grad_status,
)
from vla_core.train.config import PRESETS, TrainConfig  # noqa: F401  (PRESETS: `wmvla train --preset NAME`)
from vla_core.train.rundir import (
    CONFIG_FILE,
    DONE_FILE,
    TRAIN_LOG,
    VAL_LOG,
    check_same_config,
    run_dir_for,
    run_status,
    run_tag,
    truncate_log,
)
from vla_core.utils import WmvlaError, atomic_write_json, seed_everything, to_jsonable

FIRST_CHECK_STEPS = 3
# Trainable parameters whose gradient is zero by construction (allowed in the first-steps check): with zero
# memory (E1) the memory input projection's weight multiplies zeros. (The memory attention's key projection
# has no bias, which softmax would cancel, so nothing else is exempt.)
ZERO_MEMORY_NO_GRAD = ("*memory.mem_proj.weight",)
NO_DECAY_SUFFIXES = ("act_weight", "step_embed", "time_embed", "future_query", ".pos", "gate")


# ------------------------------------------------------------------------------------------- data


class WorldLatents:
    """Gathers world_history [T, D] / world_future [K, D] rows from the latent cache memmap by index.

    Holds only the path and opens the memmap lazily in each process (a pickled memmap would be copied
    whole into every DataLoader worker).
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._arr = None

    def _array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = np.load(self.path, mmap_mode="r")
        return self._arr

    def gather(self, index: np.ndarray) -> np.ndarray:
        idx = np.asarray(index, dtype=np.int64)
        return np.asarray(self._array()[idx.reshape(-1)], dtype=np.float32).reshape(*idx.shape, -1)

    def __getstate__(self):
        return {"path": self.path, "_arr": None}


class TrainCollate:
    """DataLoader collate_fn: stack samples, add world latents, run the policy's processor (in the workers)."""

    def __init__(self, processor, world: WorldLatents | None, vision=None):
        self.processor = processor
        self.world = world
        self.vision = vision  # a VisionFeatureCache: the frozen tower's outputs per frame (pickles as its path)

    def __call__(self, samples: list[dict]) -> dict:
        from vla_core.data.samples import collate_samples

        batch = collate_samples(samples)
        if self.vision is not None:  # instead of the images, which the loader then does not decode
            batch["vision_features"] = self.vision.get(batch["index"].numpy())
        if self.world is not None:
            batch["world_history"] = torch.from_numpy(self.world.gather(batch["history_index"].numpy()))
            batch["world_future"] = torch.from_numpy(self.world.gather(batch["future_index"].numpy()))
        out = self.processor(batch)
        out["raw_actions"] = batch["actions"]  # real units, for validation errors (normalise clips outliers)
        return out


def split_episodes(episode_ids: list[int], fraction: float, min_episodes: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split by episode (never by frame: neighbouring frames of one episode are near-duplicates)."""
    ids = sorted(int(e) for e in episode_ids)
    n_val = max(min_episodes, int(round(fraction * len(ids)))) if fraction > 0 else 0
    if n_val >= len(ids):
        raise WmvlaError(f"validation split of {n_val} episodes leaves none of the {len(ids)} for training; "
                         "lower --val-fraction / --val-min-episodes")
    perm = np.random.default_rng([seed, 7]).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    train = sorted(set(ids) - set(val))
    return train, val


# -------------------------------------------------------------------------------------- optimizer


def global_loss_weights(policy, micro_batches: list[dict], accelerator) -> tuple[list[tuple[float, float]],
                                                                                 list[tuple[float, float]]]:
    """Weights that make the gradient of one optimizer step the gradient of the global batch's loss.

    The action and world losses are masked means (over valid chunk steps / valid future latents). DDP
    averages gradients over processes and the loop over `grad_accum` micro-batches, i.e. it averages
    per-micro-batch means, which differs from the mean over the global batch whenever micro-batches have
    different numbers of valid terms (samples near an episode's end). With n_i the count of micro-batch
    i and N the total over all micro-batches of all processes (one all-reduce), weighting micro-batch i's
    loss by n_i / (N / (grad_accum * processes)) makes the averaged gradient exactly sum_i n_i grad L_i / N:
    single-process training with the global batch and DDP / gradient accumulation compute the same step.

    Returns (weights for `forward(loss_weights=...)`, shares) per micro-batch; shares are
    n_i * processes / N, so that summing loss_i * share_i over the micro-batches and then averaging over
    processes gives the global-batch loss (what is logged).
    """
    counts = torch.tensor([policy.loss_counts(b) for b in micro_batches], dtype=torch.float64)  # [G, 2]
    total = counts.sum(0)
    world_size = accelerator.num_processes
    if world_size > 1:
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    n_micro = len(micro_batches) * world_size
    safe = total.clamp_min(1e-12)  # a loss without any valid term is 0 (clamped mean): its weight is irrelevant
    weights = counts * n_micro / safe
    shares = counts * world_size / safe
    return [tuple(map(float, w)) for w in weights], [tuple(map(float, s)) for s in shares]


def build_optimizer(policy, cfg: TrainConfig, fused: bool, plan=None) -> torch.optim.Optimizer:
    """AdamW over exactly `policy.trainable_parameters()`; groups: decay or not x backbone or new modules.

    torch's (fused on GPU) AdamW with fp32 moments, unless the memory plan (or the config, without a plan) asks
    for bf16 Adam moments or the bf16-offset EMA: then `train.optim.AdamWLowMem` (the same update, fp32 masters)."""
    o = cfg.optim
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in policy.trainable_parameters():
        decay = p.ndim >= 2 and not name.endswith(NO_DECAY_SUFFIXES) and "embed" not in name.rsplit(".", 1)[-1]
        backbone = name.startswith("backbone.") and "lora_" not in name and not name.endswith("act_weight")
        groups.setdefault((decay, backbone), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": o.weight_decay if decay else 0.0,
         "lr_scale": o.backbone_lr_scale if backbone else 1.0, "name": f"{'backbone' if backbone else 'new'}"
                                                                       f"{'' if decay else '_no_decay'}"}
        for (decay, backbone), ps in sorted(groups.items())
    ]
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    adam_dtype = plan.adam_state_dtype if plan is not None else o.adam_state_dtype
    ema_dtype = plan.ema_dtype if plan is not None else o.ema_dtype
    if adam_dtype != "float32" or (ema_dtype != "float32" and o.ema_decay > 0):
        from vla_core.train.optim import AdamWLowMem

        return AdamWLowMem(param_groups, state_dtype=adam_dtype, **kwargs)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups, **kwargs)


# ------------------------------------------------------------------------------------- validation


@dataclass
class ValData:
    loader: torch.utils.data.DataLoader
    mean_action_norm: torch.Tensor  # [A] mean of the normalised training actions
    mean_action_real: np.ndarray  # [A]


@torch.no_grad()
def validate(policy, val: ValData, seed: int, extra_modes: tuple[str, ...] = ()) -> dict:
    """Held-out metrics: losses, action error (normalised and real units) vs the mean-action baseline,
    per-k Prophet metrics vs copy-the-present. Uses its own generator (same noise at every validation)."""
    from vla_core.world.prophet import add_metric_sums

    was_training = policy.training
    policy.eval()
    device = policy.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = dict(action_loss=0.0, world_loss=0.0, n_batches=0, se=0.0, se_base=0.0, n_vals=0.0)
    abs_err = abs_base = None
    mode_se = {m: 0.0 for m in extra_modes}
    prophet_sums = None
    try:
        for batch in val.loader:
            inputs = policy.prepare(batch)
            out = policy(inputs, generator=gen)
            sums["action_loss"] += float(out["action_loss"])
            sums["world_loss"] += float(out["world_loss"])
            sums["n_batches"] += 1
            pred = policy.predict_normalized(inputs, generator=gen, rollout=False)
            target, mask = inputs["actions"].float(), inputs["action_mask"].float()[..., None]
            sums["se"] += float(((pred - target) ** 2 * mask).sum())
            sums["se_base"] += float(((val.mean_action_norm.to(device) - target) ** 2 * mask).sum())
            sums["n_vals"] += float(mask.sum()) * target.shape[-1]
            for m in extra_modes:
                pm = policy.predict_normalized(inputs, memory_mode=m, generator=gen, rollout=True)
                mode_se[m] += float(((pm - target) ** 2 * mask).sum())
            real_pred = policy.processor.unnormalize_actions(pred)
            real = inputs["raw_actions"].float().cpu().numpy()
            m_np = mask.cpu().numpy()
            e = (np.abs(real_pred - real) * m_np).sum(axis=(0, 1))
            b = (np.abs(val.mean_action_real[None, None] - real) * m_np).sum(axis=(0, 1))
            abs_err = e if abs_err is None else abs_err + e
            abs_base = b if abs_base is None else abs_base + b
            if policy.prophet is not None and inputs.get("world_history") is not None:
                wp = policy.prophet(inputs["world_history"].float())
                ms = policy.prophet.metric_sums(wp, inputs["world_future"].float(), inputs["world_history"][:, -1].float(),
                                                inputs["future_mask"])
                prophet_sums = add_metric_sums(prophet_sums, ms)
    finally:
        policy.train(was_training)
    n_steps = sums["n_vals"] / abs_err.shape[0]
    rec = {
        "action_loss": sums["action_loss"] / sums["n_batches"],
        "world_loss": sums["world_loss"] / sums["n_batches"],
        "action_mse": sums["se"] / sums["n_vals"],
        "mean_baseline_mse": sums["se_base"] / sums["n_vals"],
        "action_mae_real": float(abs_err.sum() / sums["n_vals"]),
        "mean_baseline_mae_real": float(abs_base.sum() / sums["n_vals"]),
        "action_mae_real_per_dim": (abs_err / n_steps).tolist(),
        "mean_baseline_mae_real_per_dim": (abs_base / n_steps).tolist(),
    }
    rec["beats_mean_baseline"] = bool(rec["action_mse"] < rec["mean_baseline_mse"])
    for m in extra_modes:
        rec[f"action_mse_{m}_memory"] = mode_se[m] / sums["n_vals"]
    if prophet_sums is not None:
        from vla_core.world.prophet import Prophet

        for k, v in Prophet.finalize_metrics(prophet_sums).items():
            rec[f"prophet_{k}"] = v
    return rec


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    """Everything `train` builds before the loop (also used by the tests)."""

    cfg: TrainConfig  # resolved
    run_dir: Path
    ds: object
    train_episodes: list[int]
    val_episodes: list[int]
    stats: dict
    cache: object | None
    notes: list[str]


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    tag = run_tag(cfg.world.encoder, cfg.world.window, cfg.policy.prophet_delta, cfg.policy.head)
    return run_dir_for(cfg.out_root, cfg.experiment, tag, cfg.seed)


def prepare_run(cfg: TrainConfig) -> Setup:
    """Open and check the data and the latent cache; resolve data-determined policy fields; split; stats."""
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.data.normalize import compute_stats
    from vla_core.train.config import resolve_for_data

    if not cfg.dataset:
        raise WmvlaError("no dataset: pass --dataset PATH_OR_REPO (a LeRobot v3.0/v2.1 folder or hub id)")
    ds = LeRobotDataset.open(cfg.dataset, cfg.keys, revision=cfg.dataset_revision)
    cache = None
    if cfg.uses_latents:
        from vla_core.world.cache import LatentCache, default_cache_path

        path = cfg.latents or str(default_cache_path(cfg.dataset, cfg.world))
        cache = LatentCache.open(path, expect=cfg.world, dataset=ds)
        cfg = dataclasses.replace(cfg, latents=str(cache.path))
    rcfg, notes = resolve_for_data(cfg, ds.features, cache.dim if cache is not None else None)
    train_eps, val_eps = split_episodes([e.episode_index for e in ds.episodes], cfg.val_fraction,
                                        cfg.val_min_episodes, cfg.seed)
    pos = {e.episode_index: e for e in ds.episodes}
    train_frames = np.concatenate([np.arange(pos[e].start, pos[e].stop) for e in train_eps])
    stats = compute_stats(ds, cfg.keys, action_mode=cfg.norm.action_mode, passthrough_dims=cfg.norm.passthrough_dims,
                          frame_indices=train_frames)
    return Setup(rcfg, resolve_run_dir(rcfg), ds, train_eps, val_eps, stats, cache, notes)


def build_policy(cfg: TrainConfig, stats: dict, cache=None):
    from vla_core.policy.modeling import VLAPolicy

    policy = VLAPolicy(cfg.policy, stats)
    if cache is not None and policy.prophet is not None:
        policy.set_world_normalization(cache.mean, cache.std)
    return policy


def open_vision_cache(cfg: TrainConfig, policy, ds):
    """The run's vision-feature cache, verified against the built policy (tower weights included) and the
    dataset; None without `vision_cache`."""
    if not cfg.vision_cache:
        return None
    from vla_core.policy.vision_cache import VisionFeatureCache, spec_for

    policy.check_vision_cache_allowed()
    return VisionFeatureCache.open(cfg.vision_cache, expect=spec_for(cfg.policy, policy.backbone), dataset=ds)


def _worker_init(worker_id: int) -> None:
    # numpy / python RNGs of a worker derive from torch's per-worker seed (itself from the loader generator)
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, batch_sampler, collate, num_workers: int, seed: int):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None, generator=g,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None,
    )


# ------------------------------------------------------------------------------------------- train


def run_train(cfg: TrainConfig) -> int:
    train(cfg)
    return 0


def train(cfg: TrainConfig) -> dict:
    """Train (or resume, or skip a finished run); returns the run summary (done.json contents, or the
    state at `stop_after`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from vla_core.data.samples import ChunkDataset
    from vla_core.train.checkpoint import (
        STATE_FILE,
        frozen_fingerprint,
        load_trained_weights,
        rng_state,
        save_checkpoint,
        set_rng_state,
        step_name,
    )
    from vla_core.train.ema import EMA
    from vla_core.train.fsdp import (
        all_reduce_max,
        full,
        full_model_state,
        full_optimizer_state,
        load_optimizer_state,
        shard_policy,
    )
    from vla_core.train.logger import TrainLogger
    from vla_core.train.memory import (
        configured_plan,
        device_total_memory,
        oom_message,
        plan_memory,
        shape_of,
        split_batch,
    )
    from vla_core.train.sampler import ResumableBatchSampler
    from vla_core.train.schedule import set_lr

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    accelerator = Accelerator(
        cpu=cfg.device == "cpu", mixed_precision="no",  # bf16 autocast is the policy's own (policy.autocast_bf16)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    is_main, rank, world_size = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    _refuse_sharded_training(accelerator)
    say = (lambda *a: accelerator.print(*a))  # noqa: E731

    # ---- run folder: finished -> skip, unfinished -> resume, new -> start
    run_dir = resolve_run_dir(cfg)
    if cfg.remote:  # a lost pod: bring the newest checkpoint back from the bucket (vla_core.train.remote)
        from vla_core.train.remote import restore_from_remote

        if accelerator.is_local_main_process:
            restore_from_remote(run_dir, cfg.remote, say)
        accelerator.wait_for_everyone()
    status = run_status(run_dir)
    # every rank reads the folder's state before rank 0 creates it (else a rank could see it half-made)
    accelerator.wait_for_everyone()
    if status.state == "finished":
        summary = json.loads((run_dir / DONE_FILE).read_text())
        say(f"train: {run_dir} already finished at step {summary.get('step')} ({DONE_FILE}); nothing to do. "
            "Use another --seed/--out-root for a new run.")
        return summary

    setup = prepare_run(cfg)
    rcfg, ds, stats = setup.cfg, setup.ds, setup.stats
    assert setup.run_dir == run_dir
    for n in setup.notes:
        say(f"train: {n}")
    resolved = to_jsonable(rcfg)
    ckpt = None
    if status.state == "unfinished":
        stored = json.loads((run_dir / CONFIG_FILE).read_text())
        check_same_config(run_dir, stored, resolved)
        ckpt = status.latest_checkpoint
        say(f"train: resuming {run_dir} from {ckpt.name if ckpt else 'the start (no checkpoint yet)'}")
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / CONFIG_FILE, resolved)
    accelerator.wait_for_everyone()

    # ---- seeds, model, optimizer
    seed_everything(rcfg.seed + rank)
    policy = build_policy(rcfg, stats, setup.cache)
    vision = open_vision_cache(rcfg, policy, ds)
    if vision is not None:
        say(f"train: vision tower outputs read from {vision.path} (the tower does not run on dataset frames)")
    fsdp = rcfg.distributed == "fsdp" and world_size > 1
    if rcfg.distributed == "fsdp" and world_size == 1:
        say("train: --distributed fsdp with one process: nothing to shard, training unsharded")
    # ---- memory plan: checkpointing / micro-batches / bf16 optimizer + EMA states for this GPU (train/memory.py)
    o = rcfg.optim
    plan = None
    total_memory = device_total_memory(accelerator.device)
    if total_memory is not None:
        shape = shape_of(policy, len(rcfg.policy.camera_keys))
        shards = world_size if fsdp else 1
        if rcfg.memory_plan == "auto":
            plan = plan_memory(shape, o.batch_size, o.ema_decay > 0, total_memory, shards)  # raises if nothing fits
            if plan.gradient_checkpointing and not rcfg.policy.gradient_checkpointing:
                policy.enable_gradient_checkpointing()
        else:
            plan = configured_plan(shape, o, rcfg.policy.gradient_checkpointing, o.ema_decay > 0, total_memory,
                                   shards)
            if plan.states_bytes > total_memory:  # cannot fit whatever the activations: say so before step 1
                raise WmvlaError(oom_message(plan, RuntimeError("the weights, gradients and optimizer/EMA states "
                                                                "alone exceed the GPU")))
        say(f"train: memory plan: {plan.summary()}")
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "memory_plan.json", plan.to_dict())
    if fsdp and plan is not None and (plan.adam_state_dtype != "float32" or plan.ema_dtype != "float32"):
        raise WmvlaError("--distributed fsdp shards fp32 Adam moments and EMA; bf16 states are for one process. "
                         "Use --optim.adam-state-dtype float32 --optim.ema-dtype float32 (or --memory-plan auto)")
    micro_batch = plan.micro_batch if plan is not None else o.micro_batch
    if rcfg.compile and not fsdp:  # FSDP2 + compiled blocks is not measured here: it runs eager
        say(f"train: torch.compile of {policy.compile_blocks()} decoder layers / vision blocks (first steps compile)")
    if ckpt is not None:  # whole tensors, before sharding (every rank reads the checkpoint)
        load_trained_weights(policy, ckpt, use_ema=False)
    # the frozen weights never change (checked after the first steps): fingerprint them once, while whole
    frozen = frozen_fingerprint(policy) if is_main else None
    if fsdp:
        counts = shard_policy(policy, accelerator.device)  # moves the shards to the device
        say(f"train: FSDP2 over {counts['processes']} processes, {counts['units']} units; "
            f"{counts['local_parameters']:,} of {counts['total_parameters']:,} parameter values on rank 0")
    else:
        policy.to(accelerator.device)
    reduce_max = all_reduce_max if fsdp else None
    optimizer = build_optimizer(policy, rcfg, fused=accelerator.device.type == "cuda", plan=plan)
    check_fp32_trainable(policy)
    check_optimizer_covers(policy, optimizer)
    summary_counts = policy.trainable_summary()
    say(f"train: {rcfg.experiment} ({rcfg.policy.memory} memory) head={rcfg.policy.head} seed={rcfg.seed} "
        f"-> {run_dir}")
    say(f"train: parameters {summary_counts}")
    say(f"train: prompt example: {policy.processor.prompt_text(ds.tasks_of([0], rcfg.keys.instruction_key)[0])!r}")

    ema = None
    if o.ema_decay > 0 and (plan.ema_dtype if plan is not None else o.ema_dtype) == "bfloat16":
        from vla_core.train.optim import OffsetEMA

        ema = OffsetEMA(dict(policy.trainable_parameters()), o.ema_decay, optimizer)  # updated inside the step
    elif o.ema_decay > 0:
        ema = EMA(dict(policy.trainable_parameters()), o.ema_decay)
    step = 0
    if ckpt is not None:
        # FSDP: every rank reads the whole optimizer state and keeps its shard; memory-mapped, so the host
        # holds one copy (the page cache), not one per process
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False, mmap=fsdp)
        if fsdp:
            load_optimizer_state(policy, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if ema is not None:
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")), state["ema_updates"])
        rng = state["rng"][rank] if rank < len(state["rng"]) else None
        if rng is None:
            raise WmvlaError(f"{ckpt} was written by {len(state['rng'])} processes, now {world_size}: the data "
                             "order and RNG streams cannot continue exactly. Resume with the same process count.")
        set_rng_state(rng)
        if is_main:
            truncate_log(run_dir / TRAIN_LOG, step)
            truncate_log(run_dir / VAL_LOG, step)
    elif is_main:  # a fresh start (also of a run killed before its first checkpoint): no stale logs
        truncate_log(run_dir / TRAIN_LOG, 0)
        truncate_log(run_dir / VAL_LOG, 0)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)

    if fsdp:
        model = policy  # the FSDP2 module itself; the optimizer steps its shards
    else:
        model, optimizer = accelerator.prepare(policy, optimizer)

    # ---- data
    H, T, K = rcfg.policy.chunk_size, rcfg.policy.world_history, rcfg.policy.world_horizon
    world = None
    if setup.cache is not None:
        world = WorldLatents(str(setup.cache.path))
    collate = TrainCollate(policy.processor, world, vision)
    train_set = ChunkDataset(ds, chunk_size=H, history=T, horizon=K, keys=rcfg.keys, episodes=setup.train_episodes,
                             load_images=vision is None)
    sampler = ResumableBatchSampler(np.arange(len(train_set)), o.batch_size, seed=rcfg.seed,
                                    start_batch=step * o.grad_accum, rank=rank, world_size=world_size,
                                    num_batches=o.steps * o.grad_accum, grad_accum=o.grad_accum)
    loader = make_loader(train_set, sampler, collate, rcfg.num_workers, rcfg.seed + rank)
    val = None
    if is_main or fsdp:  # FSDP: every rank runs the (sharded) validation forward, rank 0 logs it
        val = _val_data(rcfg, ds, setup, collate, policy, stats)

    logger = TrainLogger(run_dir, step, enabled=is_main)
    metrics = telemetry.start_job("train", cell=telemetry.cell_name(rcfg.experiment, rcfg.policy.head, rcfg.seed),
                                  active=is_main)  # Prometheus (docs/metrics.md); never fails the run
    metrics.train_planned(o.steps, step)
    say(f"train: {len(train_set)} training frames ({len(setup.train_episodes)} episodes), "
        f"{len(setup.val_episodes)} validation episodes; {o.steps} steps x {o.batch_size} x {o.grad_accum} "
        f"x {world_size} processes")

    # ---- loop
    from vla_core.train.remote import CheckpointUploader

    uploader = CheckpointUploader(run_dir, rcfg.remote if is_main else "", say)  # off the step, one in flight

    def save(final: bool = False) -> Path | None:
        accelerator.wait_for_everyone()
        rngs = accelerator.gather_for_metrics([rng_state()], use_gather_object=True) if world_size > 1 else [rng_state()]
        path = None
        tensors = None
        if fsdp:  # collectives: every rank takes part, rank 0 receives whole CPU tensors
            tensors = full_model_state(policy)
            optim_state = full_optimizer_state(policy, optimizer)
            ema_state = ema.state_dict() if ema else None
        elif is_main:
            optim_state = optimizer.state_dict()
            ema_state = ema.state_dict() if ema else None
        if is_main:
            uploader.wait()  # the previous upload first: pruning below must not delete what it is reading
            train_state = {"optimizer": optim_state, "step": step, "micro_batches": step * o.grad_accum,
                           "rng": rngs, "ema_updates": ema.num_updates if ema else 0, "world_size": world_size}
            world_record = {"spec": setup.cache.spec.to_dict() if setup.cache is not None else None,
                            "latents": str(setup.cache.path) if setup.cache is not None else None,
                            "uses_memory": rcfg.policy.has_memory}
            path = save_checkpoint(run_dir, step, model=policy, config=resolved, stats=stats,
                                   tokenizer=policy.tokenizer, world=world_record, train_state=train_state,
                                   ema_state=ema_state, extra_meta={"experiment": rcfg.experiment, "final": final},
                                   keep_last=rcfg.keep_checkpoints, tensors=tensors, frozen=frozen)
            uploader.submit(path)
        accelerator.wait_for_everyone()
        return path

    def run_validation() -> dict | None:
        if not (is_main or fsdp):
            return None
        extra = ()
        if rcfg.policy.rollout_memory not in (None, rcfg.policy.memory):
            extra = (rcfg.policy.rollout_memory,)
        ctx = ema.swapped_in() if ema is not None else contextlib.nullcontext()
        with ctx:
            rec = validate(policy, val, seed=rcfg.seed + 12345, extra_modes=extra)
        rec = {"step": step, **rec}
        logger.log(VAL_LOG, rec, "val")  # rank 0 only (the logger is disabled elsewhere)
        metrics.train_validation(rec)
        say(f"val step {step}: action_mse {rec['action_mse']:.4f} (mean baseline {rec['mean_baseline_mse']:.4f}) "
            f"mae_real {rec['action_mae_real']:.4f} world_loss {rec['world_loss']:.4f}")
        return rec

    progress = _Progress(rcfg.progress and is_main, o.steps, step)
    data_iter = iter(loader)
    model.train()
    snapshot = None
    grads_seen: dict[str, str] = {}
    check_until = step + FIRST_CHECK_STEPS
    window: dict[str, float] = {}
    n_window, t_window = 0, time.perf_counter()
    last_val = None
    start_step = step
    t_start = time.perf_counter()
    try:
        while step < o.steps:
            lr = set_lr(optimizer, step, o.lr, o.warmup_steps, o.steps, o.min_lr_ratio)
            if step < check_until and snapshot is None:
                snapshot = ParamSnapshot(policy)
            diag: dict[str, float] = {}
            # each loaded batch may be split into micro-batches (memory plan): the same global-batch gradient
            micro_batches = [m for _ in range(o.grad_accum) for m in split_batch(next(data_iter), micro_batch)]
            n_micro = len(micro_batches)
            weights, shares = global_loss_weights(policy, micro_batches, accelerator)
            first_step = step == start_step
            for micro, batch in enumerate(micro_batches):
                sync = micro == n_micro - 1
                if fsdp:  # reduce-scatter the gradients only after the last micro-batch
                    model.set_requires_gradient_sync(sync)
                with (contextlib.nullcontext() if sync or fsdp else accelerator.no_sync(model)), \
                        _first_step_oom(first_step, plan, oom_message):
                    # no host sync inside the step: the checks are read after backward, before any update
                    out = model(batch, loss_weights=weights[micro], defer_checks=True)
                    accelerator.backward(out["loss"] / n_micro)
                    check_step_finite(out, step, rank)
                # per-process values whose mean over processes is the global-batch value (see global_loss_weights)
                diag["loss"] = diag.get("loss", 0.0) + float(out["loss"].detach()) / n_micro
                for k, share in (("action_loss", shares[micro][0]), ("world_loss", shares[micro][1])):
                    diag[k] = diag.get(k, 0.0) + float(out[k]) * share
                for k in ("gate", "memory_norm", "attn_entropy"):
                    if k in out:
                        diag[k] = diag.get(k, 0.0) + float(out[k].detach()) / n_micro
            if world_size > 1:  # the logged values are the global batch's, not rank 0's
                keys = list(diag)  # the same order on every rank
                vals = accelerator.reduce(torch.tensor([diag[k] for k in keys], dtype=torch.float64,
                                                       device=accelerator.device), "mean")
                diag = dict(zip(keys, vals.tolist()))
            if step < check_until:
                grads_seen = merge_grad_status(grads_seen, grad_status(policy, reduce_max))
            max_norm = o.grad_clip if o.grad_clip > 0 else float("inf")
            if fsdp:  # DTensor gradients: the norm is the whole model's (reduced over the shards)
                grad_norm = full(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm))
            else:
                grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)
            with _first_step_oom(first_step, plan, oom_message):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            if step == check_until:
                allow = ZERO_MEMORY_NO_GRAD if rcfg.policy.memory == "zero" else ()
                counts = check_first_step(policy, snapshot, grads_seen, allow, reduce_max)
                check_optimizer_state_fp32(optimizer)
                say(f"train: first-steps check passed ({counts['trainable_tensors']} trainable tensors received "
                    f"gradients ({counts['small_gradient_tensors']} still tiny), those with Adam-significant "
                    f"gradients moved; {counts['frozen_tensors']} frozen tensors unchanged)")
                snapshot = None
            # summed on the device, read at log time: reading it here would wait for the update just queued,
            # and the next step's host work (taking the batch, moving it, launching the forward) would start
            # on an idle GPU
            diag["grad_norm"] = grad_norm.detach().float()
            for k, v in diag.items():
                window[k] = window.get(k, 0.0) + v
            n_window += 1
            progress.update(step, diag.get("loss", float("nan")), lr)
            if step % rcfg.log_every == 0 or step == o.steps:
                dt = time.perf_counter() - t_window
                rec = {"step": step, **{k: float(v) / n_window for k, v in window.items()}, "lr": lr,
                       "samples_per_s": n_window * o.batch_size * o.grad_accum * world_size / max(dt, 1e-9),
                       "epoch": step * o.grad_accum / sampler.batches_per_epoch,
                       "elapsed_s": time.perf_counter() - t_start}
                logger.log(TRAIN_LOG, rec, "train")
                metrics.train_record(rec, torch.cuda.max_memory_allocated(accelerator.device)
                                     if accelerator.device.type == "cuda" else None)
                if not progress.enabled:
                    say(f"step {step}/{o.steps} loss {rec['loss']:.4f} action {rec['action_loss']:.4f} "
                        f"world {rec.get('world_loss', 0):.4f} gate {rec.get('gate', 0):.4f} lr {lr:.2e} "
                        f"{rec['samples_per_s']:.1f} samples/s")
                window, n_window, t_window = {}, 0, time.perf_counter()
            if step == o.steps or (rcfg.val_every and step % rcfg.val_every == 0):
                last_val = run_validation()
            if step == o.steps or step % rcfg.ckpt_every == 0 or step == rcfg.stop_after:
                path = save(final=step == o.steps)
                say(f"train: checkpoint {path.name if path else step_name(step)}")
            if rcfg.stop_after is not None and step >= rcfg.stop_after and step < o.steps:
                uploader.wait()
                say(f"train: stopped after step {step} (--stop-after); run the same command again to resume")
                return {"step": step, "finished": False, "run_dir": str(run_dir)}
        uploader.wait()  # the final checkpoint is in the store before the done marker
    except BaseException:
        uploader.wait(raise_error=False)  # let the upload in flight finish: a newer complete checkpoint to resume
        raise
    finally:
        progress.close()
        logger.close()
        metrics.close()  # the final push

    # ---- end: mean-baseline check, done marker
    summary = {"step": step, "finished": True, "run_dir": str(run_dir), "checkpoint": step_name(step),
               "experiment": rcfg.experiment, "head": rcfg.policy.head, "seed": rcfg.seed,
               "val": last_val, "train_seconds_this_session": round(time.perf_counter() - t_start, 1)}
    failure = None
    if is_main:
        if last_val is not None and not last_val["beats_mean_baseline"] and rcfg.mean_baseline_check != "off":
            msg = (f"validation action MSE {last_val['action_mse']:.4f} is not below the predict-the-mean baseline "
                   f"{last_val['mean_baseline_mse']:.4f} after {step} steps: the policy has not learned beyond the "
                   "average action (the earlier attempt's failure mode). Check lr, steps, normalisation, inputs.")
            summary["warning"] = msg
            if rcfg.mean_baseline_check == "fail":
                atomic_write_json(run_dir / "failed.json", summary)
                failure = msg
            else:
                say(f"train: WARNING: {msg}")
        if failure is None:
            atomic_write_json(run_dir / DONE_FILE, summary)
            if rcfg.remote:  # the done marker and final logs, so a re-run from the bucket skips the run
                from vla_core.train.remote import upload_run_files

                upload_run_files(run_dir, rcfg.remote)
    accelerator.wait_for_everyone()  # before raising: the other ranks must not wait for rank 0 forever
    if failure is not None:
        raise WmvlaError(failure)
    return summary


@contextlib.contextmanager
def _first_step_oom(first: bool, plan, message):
    """An out-of-memory error in the first step becomes a WmvlaError naming the fix (not a bare OOM trace)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        if not first:
            raise
        raise WmvlaError(message(plan, e)) from e


def _refuse_sharded_training(accelerator) -> None:
    """accelerate's own FSDP / DeepSpeed launches are refused: the loop shards the model itself
    (`--distributed fsdp`, PyTorch FSDP2), which accelerate's plugins would wrap a second time."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise WmvlaError(
            f"wmvla train does not support {kind.value} through an accelerate config: the loop applies FSDP itself. "
            "Launch without the FSDP/DeepSpeed config and pass --distributed fsdp, e.g. `torchrun --nproc_per_node 8 "
            "-m vla_core.cli train --preset libero-2b --distributed fsdp` or `accelerate launch --num_processes 8 -m "
            "vla_core.cli train ... --distributed fsdp` (docs/training.md 'Multiple GPUs').")


def _val_data(rcfg: TrainConfig, ds, setup: Setup, collate, policy, stats) -> ValData:
    from vla_core.data.normalize import normalize
    from vla_core.data.samples import ChunkDataset

    p = rcfg.policy
    val_set = ChunkDataset(ds, chunk_size=p.chunk_size, history=p.world_history, horizon=p.world_horizon,
                           keys=rcfg.keys, episodes=setup.val_episodes, load_images=collate.vision is None)
    n = min(len(val_set), rcfg.val_max_samples)
    pick = np.sort(np.random.default_rng([rcfg.seed, 11]).choice(len(val_set), size=n, replace=False))
    bs = rcfg.optim.batch_size
    batches = [pick[i: i + bs].tolist() for i in range(0, n, bs)]
    loader = torch.utils.data.DataLoader(val_set, batch_sampler=batches, collate_fn=collate, num_workers=0)
    pos = {e.episode_index: e for e in ds.episodes}
    train_frames = np.concatenate([np.arange(pos[e].start, pos[e].stop) for e in setup.train_episodes])
    actions = np.asarray(ds.columns(rcfg.keys.action_key), dtype=np.float32)[train_frames]
    actions = actions.reshape(len(actions), -1)
    mean_norm = np.asarray(normalize(actions, stats[rcfg.keys.action_key]), dtype=np.float32).mean(0)
    return ValData(loader, torch.from_numpy(mean_norm), actions.mean(0))


class _Progress:
    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("", total=total, completed=start)

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step, description=f"loss {loss:.4f} lr {lr:.2e}")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False
