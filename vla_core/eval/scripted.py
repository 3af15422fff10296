"""Built-in policies for the rollout engine: the MetaWorld scripted expert, uniform random actions, no-op.

They are reference points: the expert shows what the env + engine can reach (a harness bug shows up as
an expert that fails), random and no-op show the floor (a task "solved" by doing nothing is a bad task).
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from vla_core.envs.base import Observation
from vla_core.envs.registry import EnvConfig, action_dim, configure_gl
from vla_core.utils import WmvlaError

SCRIPTED_POLICIES = ("expert", "random", "noop")


class ExpertPolicy:
    """MetaWorld's scripted policy per slot (metaworld.policies.ENV_POLICY_MAP), one action per call.

    It reads the raw 39-d MetaWorld observation from `observation["extras"]["metaworld_obs"]`.
    """

    def __init__(self, env_cfg: EnvConfig):
        if env_cfg.env != "metaworld":
            raise WmvlaError(f"the scripted expert exists for MetaWorld only, not {env_cfg.env!r}; "
                             "use --scripted random or noop, or a --checkpoint")
        if "mujoco" not in sys.modules:
            configure_gl(env_cfg.render_backend)  # importing metaworld imports mujoco
        from vla_core.envs.metaworld_env import make_expert

        self._make_expert = make_expert
        self._by_task: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self._slot_task: dict[int, str] = {}

    def reset(self, slot: int, task: str, instruction: str) -> None:
        if task not in self._by_task:
            self._by_task[task] = self._make_expert(task)
        self._slot_task[slot] = task

    def act(self, slots: list[int], observations: list[Observation], instructions: list[str]) -> list[np.ndarray]:
        out = []
        for slot, obs in zip(slots, observations):
            extras = obs.get("extras") or {}
            if "metaworld_obs" not in extras:
                raise WmvlaError("the expert needs observation['extras']['metaworld_obs'] (MetaWorldEnv provides it)")
            out.append(self._by_task[self._slot_task[slot]](extras["metaworld_obs"])[None])
        return out


class RandomPolicy:
    """Uniform actions in [-1, 1]^A, chunks of `chunk_size`."""

    def __init__(self, env_cfg: EnvConfig, seed: int = 0, chunk_size: int = 1):
        self.dim = action_dim(env_cfg)
        self.chunk_size = chunk_size
        self.rng = np.random.default_rng(seed)

    def reset(self, slot: int, task: str, instruction: str) -> None:
        pass

    def act(self, slots: list[int], observations: list[Observation], instructions: list[str]) -> list[np.ndarray]:
        return [self.rng.uniform(-1.0, 1.0, size=(self.chunk_size, self.dim)).astype(np.float32) for _ in slots]


class NoopPolicy:
    """Do nothing: zero motion, gripper open on LIBERO (-1; MetaWorld's gripper effort 0)."""

    def __init__(self, env_cfg: EnvConfig, chunk_size: int = 1):
        action = np.zeros(action_dim(env_cfg), dtype=np.float32)
        if env_cfg.env == "libero":
            action[-1] = -1.0
        self.chunk = np.repeat(action[None], chunk_size, axis=0)

    def reset(self, slot: int, task: str, instruction: str) -> None:
        pass

    def act(self, slots: list[int], observations: list[Observation], instructions: list[str]) -> list[np.ndarray]:
        return [self.chunk.copy() for _ in slots]


def make_scripted_policy(name: str, env_cfg: EnvConfig, seed: int = 0, chunk_size: int = 1):
    if name == "expert":
        return ExpertPolicy(env_cfg)
    if name == "random":
        return RandomPolicy(env_cfg, seed=seed, chunk_size=chunk_size)
    if name == "noop":
        return NoopPolicy(env_cfg, chunk_size=chunk_size)
    raise WmvlaError(f"unknown scripted policy {name!r}; valid: {list(SCRIPTED_POLICIES)}")
