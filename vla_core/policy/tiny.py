"""Helpers to build and feed a tiny policy without any dataset (tests, demo, other modules' tests).

    cfg = tiny_policy_config(head="flow", memory="pred")
    policy = VLAPolicy(cfg, tiny_norm_stats(cfg))
    out = policy(random_batch(cfg, batch_size=4))
"""

from __future__ import annotations

import numpy as np

from vla_core.policy.config import PolicyConfig, tiny_policy_config

__all__ = ["tiny_policy_config", "tiny_norm_stats", "random_batch", "random_observation"]

TASKS = ("pick up the black bowl and place it on the plate", "open the top drawer", "push the red button")


def tiny_norm_stats(cfg: PolicyConfig, seed: int = 0, frames: int = 256) -> dict:
    """NormStats for random data shaped like the config: state mean/std, action quantile, gripper passthrough."""
    from vla_core.data.normalize import feature_stats

    rng = np.random.default_rng(seed)
    state = rng.normal(size=(frames, cfg.state_dim)) * 2.0 + 1.0
    action = rng.normal(size=(frames, cfg.action_dim)) * 0.5
    action[:, -1] = np.sign(action[:, -1] + 1e-9)  # gripper -1 / +1
    return {
        cfg.state_key: feature_stats(state, cfg.state_key),
        cfg.action_key: feature_stats(action, cfg.action_key, mode="quantile", passthrough_dims=(cfg.action_dim - 1,)),
    }


def random_batch(cfg: PolicyConfig, batch_size: int = 2, seed: int = 0, image_hw: int = 40,
                 with_world: bool = True) -> dict:
    """A collated batch as ChunkDataset + the trainer produce it (numpy; the processor accepts numpy or torch)."""
    rng = np.random.default_rng(seed)
    b, h = batch_size, cfg.chunk_size
    actions = (rng.normal(size=(b, h, cfg.action_dim)) * 0.5).astype(np.float32)
    actions[..., -1] = np.sign(actions[..., -1] + 1e-9)
    mask = np.ones((b, h), dtype=bool)
    mask[0, h - 1:] = False  # one padded step at the end of the first sample's chunk
    batch = {
        "images": rng.integers(0, 256, size=(b, len(cfg.camera_keys), image_hw, image_hw, 3), dtype=np.uint8),
        "state": (rng.normal(size=(b, cfg.state_dim)) * 2.0 + 1.0).astype(np.float32),
        "actions": actions,
        "action_mask": mask,
        "task": [TASKS[i % len(TASKS)] for i in range(b)],
    }
    if with_world:
        batch["world_history"] = rng.normal(size=(b, cfg.world_history, cfg.world_dim)).astype(np.float32)
        batch["world_future"] = rng.normal(size=(b, cfg.world_horizon, cfg.world_dim)).astype(np.float32)
        fm = np.ones((b, cfg.world_horizon), dtype=bool)
        fm[0, -1] = False
        batch["future_mask"] = fm
    return batch


def random_observation(cfg: PolicyConfig, seed: int = 0, image_hw: int = 40) -> dict:
    """One rollout observation: {"images": {camera_key: uint8 HxWx3}, "state": float32 [S], "task": str}."""
    rng = np.random.default_rng(seed)
    return {
        "images": {k: rng.integers(0, 256, size=(image_hw, image_hw, 3), dtype=np.uint8) for k in cfg.camera_keys},
        "state": (rng.normal(size=cfg.state_dim) * 2.0 + 1.0).astype(np.float32),
        "task": TASKS[seed % len(TASKS)],
    }
