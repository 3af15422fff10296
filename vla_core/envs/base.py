"""The one environment interface every benchmark adapter implements.

Observations use the dataset's conventions (camera names are the dataset's image keys, state has the
dataset's layout), so a policy maps a rollout observation to model inputs with exactly the code it used
on training samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NotRequired, Protocol, TypedDict

import numpy as np


class Observation(TypedDict):
    images: dict[str, np.ndarray]  # camera key (dataset image key) -> uint8 [H, W, 3], upright as in the dataset
    state: np.ndarray  # float32 [S], the dataset's state layout
    # Benchmark-specific raw values that are not part of the dataset's inputs, e.g. MetaWorld's 39-d
    # observation under "metaworld_obs" for the scripted expert. Learned policies must not read them.
    extras: NotRequired[dict[str, Any]]


@dataclass
class StepResult:
    observation: Observation
    success: bool  # task solved at this step
    done: bool  # success or max_steps reached (the episode ends)
    info: dict[str, Any] = field(default_factory=dict)


class RolloutEnv(Protocol):
    """One task of one benchmark; `reset(init_index)` selects a numbered, reproducible initial condition."""

    task_name: str
    instruction: str  # the language task, as stored in the dataset's `task` column
    max_steps: int
    num_init_states: int  # valid init indices are 0 .. num_init_states-1
    action_dim: int
    state_dim: int
    camera_keys: tuple[str, ...]

    def reset(self, init_index: int) -> Observation: ...

    def step(self, action: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...
