"""A trained checkpoint as a `BatchPolicy` for the rollout engine (`wmvla eval --checkpoint DIR`).

    policy = load_checkpoint_policy("runs/E2/tiny_m4_delta_mse/seed0", rollout_memory="pred", device="auto")
    run_rollouts(env_cfg, policy, episodes, out_dir=eval_dir_for(ckpt, "metaworld", "core5", "pred"))

World state per env slot, rebuilt exactly as in training:
  - an `OnlineWorldEncoder` built from the checkpoint's `world_spec.json` (same encoder class, weights,
    preprocessing, window m and ClipBuffer clamping as the latent precompute), fed EVERY frame of the
    episode: the engine calls `observe(slot, obs)` for the frames executed inside an action chunk and
    `act` with the newest one. Frames queued by `observe` are encoded lazily at the next `act`, batched
    across slots;
  - a per-slot history of the last T latents (a ClipBuffer of latents: at the episode start it repeats the
    first latent, exactly like the training windows clamp `history_index` at the episode start), which is
    the Prophet's input.
Rollout memory modes: pred (the Prophet's prediction), zero, random (norm-matched Gaussian), shuffle
(another slot's / an earlier call's prediction), none (E0 checkpoints only). oracle is impossible online
(the true future does not exist yet) and is refused. zero needs no world latents, so no encoder is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vla_core.utils import WmvlaError, to_jsonable

ROLLOUT_MEMORY_MODES = ("pred", "zero", "random", "shuffle", "none")
NEEDS_LATENTS = ("pred", "random", "shuffle")


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(s)).strip("-")


def eval_dir_for(checkpoint: str | Path, env: str, suite: str, rollout_memory: str, tag: str = "") -> Path:
    """Where the evaluation of a checkpoint goes: beside its run's checkpoints, named by everything that
    distinguishes it (checkpoint step, env, suite, rollout memory), so evaluations never overwrite each other.

        <run>/eval/<step_0000400>__<metaworld>_<core5>__mem-<pred>[__<tag>]/
    """
    from vla_core.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    run_dir = ckpt.parent.parent  # <run>/checkpoints/<step>
    name = f"{ckpt.name}__{_safe(env)}_{_safe(suite)}__mem-{_safe(rollout_memory)}" + (f"__{_safe(tag)}" if tag else "")
    return run_dir / "eval" / name


class CheckpointPolicy:
    """BatchPolicy over a VLAPolicy without world latents (memory none or zero)."""

    def __init__(self, policy, cfg, rollout_memory: str, seed: int = 0, print_prompt: bool = True):
        self.policy = policy
        self.cfg = cfg
        self.rollout_memory = rollout_memory
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self._print_prompt = print_prompt
        self.instructions: dict[int, str] = {}

    @property
    def action_dim(self) -> int:
        return self.policy.cfg.action_dim

    @property
    def chunk_size(self) -> int:
        return self.policy.cfg.chunk_size

    def describe(self) -> dict:
        """What `wmvla eval` records as summary.json["config"]["policy"]["details"] (read by the report)."""
        c = self.cfg
        return {"experiment": c.experiment, "head": c.policy.head, "seed": c.seed, "rollout_memory": self.rollout_memory,
                "training_memory": c.policy.memory, "backbone": c.policy.backbone, "world": to_jsonable(c.world),
                "chunk_size": c.policy.chunk_size}

    def reset(self, slot: int, task: str, instruction: str) -> None:
        self.instructions[slot] = instruction

    def _maybe_print_prompt(self, instruction: str) -> None:
        if self._print_prompt:
            self._print_prompt = False
            print(f"eval: prompt example ({self.rollout_memory} memory): "
                  f"{self.policy.processor.prompt_text(instruction)!r}", flush=True)

    def _world_history(self, slots: list[int], observations: list) -> np.ndarray | None:
        return None

    def act(self, slots: list[int], observations: list, instructions: list[str]) -> list[np.ndarray]:
        self._maybe_print_prompt(instructions[0])
        history = self._world_history(list(slots), list(observations))
        actions = self.policy.predict_action(list(observations), world_history=history,
                                             memory_mode=self.rollout_memory, generator=self.generator,
                                             task=list(instructions))
        return [np.asarray(a, dtype=np.float32) for a in actions]


class WorldCheckpointPolicy(CheckpointPolicy):
    """BatchPolicy that also keeps per-slot world state (online encoder + latent history) for the Prophet."""

    def __init__(self, policy, cfg, world_spec: dict, rollout_memory: str, device, seed: int = 0,
                 print_prompt: bool = True):
        super().__init__(policy, cfg, rollout_memory, seed, print_prompt)
        from vla_core.world.encoder import ClipBuffer, OnlineWorldEncoder

        self.online = OnlineWorldEncoder(world_spec, num_slots=0, device=device)
        if self.online.spec.dim != policy.cfg.world_dim:
            raise WmvlaError(f"world encoder dim {self.online.spec.dim} != the policy's world_dim {policy.cfg.world_dim}")
        self._history_buffer = lambda: ClipBuffer(policy.cfg.world_history)
        self.histories: dict[int, ClipBuffer] = {}
        self.pending: dict[int, list[np.ndarray]] = {}
        self.latest: dict[int, list[np.ndarray]] = {}

    def _slot(self, slot: int) -> None:
        while len(self.online.buffers) <= slot:
            self.online.buffers.append(self.online.encoder.new_clip_buffer())

    def reset(self, slot: int, task: str, instruction: str) -> None:
        super().reset(slot, task, instruction)
        self._slot(slot)
        self.online.reset(slot)
        self.histories[slot] = self._history_buffer()
        self.pending[slot] = []

    def _frame(self, obs) -> np.ndarray:
        key = self.online.camera_key
        images = obs["images"]
        if key not in images:
            raise WmvlaError(f"observation has no camera {key!r} (has {sorted(images)}); the world encoder of this "
                             "checkpoint was computed on that camera")
        return np.asarray(images[key])

    def observe(self, slot: int, observation) -> None:
        """A frame executed inside an action chunk: queued, encoded at the next act (in order)."""
        self.pending.setdefault(slot, []).append(self._frame(observation))

    def _world_history(self, slots: list[int], observations: list) -> np.ndarray:
        for slot, obs in zip(slots, observations):
            if slot not in self.histories:
                raise WmvlaError(f"act for slot {slot} before reset")
            self.pending[slot].append(self._frame(obs))
        # Every queued frame of every slot (the executed steps of the last chunk + this observation) in one
        # batched encoder call; the clips are still built in order per slot.
        ready = [s for s in slots if self.pending[s]]
        per_slot = self.online.push_sequences(ready, [self.pending[s] for s in ready])
        for s, latents in zip(ready, per_slot):
            self.pending[s] = []
            # round to the cache's storage dtype: training saw float16-stored latents, rollout sees the same values
            for z in latents.astype(np.float16).astype(np.float32):
                self.latest[s] = self.histories[s].push(z)  # the last T latents, oldest first
        return np.stack([np.stack(self.latest[s]) for s in slots]).astype(np.float32)


def load_checkpoint_policy(checkpoint_dir: str | Path, rollout_memory: str | None = None, device="auto",
                           seed: int = 0, use_ema: bool = True, print_prompt: bool = True):
    """Rebuild a checkpoint's policy (and its world encoder) as a BatchPolicy.

    rollout_memory: pred | zero | random | shuffle | none; None = the checkpoint's own rollout memory
    (E0 none, E1 zero, E2 pred, E3 pred). oracle is refused (the future is unknown online). For an E0
    checkpoint (no memory module) any mode is replaced by none, with a note.
    """
    from vla_core.train.checkpoint import _resolve_device, load_policy, read_world_record

    policy, cfg = load_policy(checkpoint_dir, device=device, use_ema=use_ema)
    has_memory = cfg.policy.memory != "none"
    mode = rollout_memory or cfg.policy.rollout_memory or cfg.policy.memory
    if not has_memory and mode != "none":
        # `wmvla eval` passes its default (pred) for every checkpoint; an E0 policy has no memory module
        print(f"eval: {cfg.experiment} checkpoint has no memory module; rollout memory {mode!r} does not apply "
              "(using none)", flush=True)
        mode = "none"
    if mode == "oracle":
        raise WmvlaError("rollout memory 'oracle' is impossible in closed loop: the true future latents do not exist "
                         "while the episode runs. Use pred (E3's own condition), zero, random or shuffle.")
    if mode not in ROLLOUT_MEMORY_MODES:
        raise WmvlaError(f"rollout memory {mode!r}; expected one of {list(ROLLOUT_MEMORY_MODES)}")
    if (mode == "none") == has_memory:
        raise WmvlaError(f"rollout memory {mode!r} does not fit this checkpoint (experiment {cfg.experiment}, trained "
                         f"with memory {cfg.policy.memory!r}): an E0 checkpoint has no memory module (use none); "
                         "the others have one (use pred/zero/random/shuffle)")
    if mode in NEEDS_LATENTS:
        world = read_world_record(checkpoint_dir)
        if not world.get("spec"):
            raise WmvlaError(f"{checkpoint_dir}: world_spec.json records no world encoder, but rollout memory {mode} "
                             "needs online world latents")
        return WorldCheckpointPolicy(policy, cfg, world["spec"], mode, _resolve_device(device), seed, print_prompt)
    return CheckpointPolicy(policy, cfg, mode, seed, print_prompt)
