"""Normalisation statistics for state and action, and the ONE normalize/unnormalize pair.

Training (the policy's processor on dataset samples) and evaluation (the same processor on rollout
observations, and on the predicted actions) both call `normalize` / `unnormalize` from here with the stats
saved next to the checkpoint, so the two can never drift apart. The earlier attempt had no normalisation:
its MSE was dominated by the +-1 gripper dimension and the model regressed to the mean.

Choices (explicit, per `NormStats`):
- state: mean/std, `(x - mean) / std`.
- action: quantile scaling to [-1, 1] with the 1st/99th percentiles, `2 (x - q01) / (q99 - q01) - 1`,
  clipped to [-1, 1] (robust to outliers; a bounded target suits both the MSE and the flow head).
  `mode="mean_std"` is selectable instead.
- gripper: the action dims in `passthrough_dims` (default: the last action dim) are left unchanged in
  both directions. LIBERO's and MetaWorld's gripper command is already in [-1, 1] (LIBERO: exactly -1
  open / +1 close), so scaling it would only move the decision threshold off 0. `compute_stats` refuses
  a passthrough dim whose values leave [-1, 1]; pass `passthrough_dims=()` for such data (`wmvla train
  --norm.passthrough-dims` with no value, `NormConfig`).
- constant dims (std or q99 - q01 ~ 0): the scale is replaced by 1, so they map to x - centre (0 on the
  data) and back, instead of dividing by ~0.

Statistics are computed once with vectorised numpy over whole columns (no per-frame Python loop) and
saved as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from vla_core.data.keys import DatasetKeys
from vla_core.utils import WmvlaError, atomic_write_json

MODES = ("mean_std", "quantile")
EPS = 1e-6  # scales below this are treated as a constant dimension
GRIPPER_TOL = 1e-3
# Where a user sets the passthrough dims (errors name it; tests/test_cli_fix_flags.py checks that these parse).
PASSTHROUGH_FLAG = ("`wmvla train --norm.passthrough-dims` (no value: normalise every dim; or the dims to pass "
                    "through, negative = from the end; config file: norm.passthrough_dims: []; "
                    "`wmvla matrix --norm-passthrough-dims`)")


@dataclass
class NormConfig:
    """How the actions are normalised (statistics of the training episodes, saved with every checkpoint, so
    evaluation uses the same). The state is always mean/std."""

    action_mode: Literal["quantile", "mean_std"] = "quantile"
    """quantile: the 1st/99th percentiles to [-1, 1], clipped; mean_std: (x - mean) / std"""
    passthrough_dims: tuple[int, ...] = (-1,)
    """action dims left as they are (the gripper, already in [-1, 1]); negative = from the end. Empty (the
    flag with no value) normalises every dim: for a gripper outside [-1, 1]"""

    def __post_init__(self) -> None:
        self.passthrough_dims = tuple(int(d) for d in self.passthrough_dims)
        if self.action_mode not in MODES:
            raise WmvlaError(f"norm.action_mode={self.action_mode!r}; expected one of {list(MODES)}")


@dataclass
class NormStats:
    """Per-dimension statistics of one feature and how to normalise it."""

    key: str  # the dataset key, e.g. "action"
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: int
    mode: str = "mean_std"  # "mean_std" | "quantile"
    passthrough_dims: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("mean", "std", "q01", "q99", "min", "max"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        self.passthrough_dims = tuple(int(d) for d in self.passthrough_dims)
        if self.mode not in MODES:
            raise WmvlaError(f"NormStats({self.key}): mode must be one of {MODES}, got {self.mode!r}")
        bad = [d for d in self.passthrough_dims if not 0 <= d < self.dim]
        if bad:
            raise WmvlaError(f"NormStats({self.key}): passthrough_dims {bad} out of range for {self.dim} dims")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def center_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """y = (x - center) / scale on normalised dims; center 0, scale 1 on passthrough dims."""
        if self.mode == "mean_std":
            center, scale = self.mean.copy(), self.std.copy()
        else:
            center, scale = (self.q01 + self.q99) / 2, (self.q99 - self.q01) / 2
        scale = np.where(scale < EPS, 1.0, scale)
        pt = list(self.passthrough_dims)
        center[pt], scale[pt] = 0.0, 1.0
        return center, scale

    def to_dict(self) -> dict:
        return {f.name: (getattr(self, f.name).tolist() if isinstance(getattr(self, f.name), np.ndarray)
                         else getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise WmvlaError(f"NormStats: unknown fields {sorted(unknown)}")
        return cls(**d)


def feature_stats(x: np.ndarray, key: str, mode: str = "mean_std", passthrough_dims: Sequence[int] = ()) -> NormStats:
    """Statistics of a column [N, D] (vectorised)."""
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(len(x), -1)
    if len(x) == 0:
        raise WmvlaError(f"{key}: no frames to compute statistics from")
    if not np.all(np.isfinite(x)):
        raise WmvlaError(f"{key}: contains NaN or inf values; fix the data before computing statistics")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    stats = NormStats(key=key, mean=x.mean(0), std=x.std(0), q01=q01, q99=q99, min=x.min(0), max=x.max(0),
                      count=len(x), mode=mode, passthrough_dims=tuple(passthrough_dims))
    for d in stats.passthrough_dims:
        lo, hi = stats.min[d], stats.max[d]
        if lo < -1 - GRIPPER_TOL or hi > 1 + GRIPPER_TOL:
            raise WmvlaError(
                f"{key}: dim {d} is passed through unnormalised (the gripper) but its values span "
                f"[{lo:.3g}, {hi:.3g}], outside [-1, 1]. Rescale the gripper to [-1, 1] in the data, or "
                f"normalise it like the other dims with passthrough_dims=(): {PASSTHROUGH_FLAG}."
            )
    return stats


def compute_stats(ds: Any, keys: DatasetKeys, action_mode: str = "quantile",
                  passthrough_dims: Sequence[int] | None = None, state_mode: str = "mean_std",
                  frame_indices: np.ndarray | None = None) -> dict[str, NormStats]:
    """{keys.state_key: NormStats, keys.action_key: NormStats} from whole columns of `ds` (a LeRobotDataset).

    The result is keyed by dataset key (e.g. "observation.state", "action"), as the policy processor
    looks stats up by the keys it was configured with.

    passthrough_dims: action dims left as they are (negative = from the end); None = the last action dim
    (the gripper).
    frame_indices: restrict to these frames (e.g. the training episodes); default all frames.
    """
    state = np.asarray(ds.columns(keys.state_key))
    action = np.asarray(ds.columns(keys.action_key))
    if frame_indices is not None:
        state, action = state[frame_indices], action[frame_indices]
    action = action.reshape(len(action), -1)
    dim = action.shape[1]
    if passthrough_dims is None:
        passthrough_dims = (dim - 1,)
    bad = [d for d in passthrough_dims if not -dim <= d < dim]
    if bad:
        raise WmvlaError(f"{keys.action_key}: passthrough dims {bad} do not exist, the action has {dim} dims "
                         f"(0..{dim - 1}, or -{dim}..-1 from the end). Fix: {PASSTHROUGH_FLAG}.")
    passthrough_dims = tuple(sorted({d % dim for d in passthrough_dims}))
    if keys.state_key == keys.action_key:
        raise WmvlaError(f"state_key and action_key are the same column {keys.state_key!r}")
    return {
        keys.state_key: feature_stats(state, keys.state_key, mode=state_mode),
        keys.action_key: feature_stats(action, keys.action_key, mode=action_mode, passthrough_dims=passthrough_dims),
    }


def save_stats(stats: dict[str, NormStats], path: str | os.PathLike, fingerprint: dict | None = None) -> None:
    atomic_write_json(path, {"format": "wmvla.norm_stats/1", "dataset": fingerprint,
                             "stats": {k: v.to_dict() for k, v in stats.items()}})


def load_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    path = Path(path)
    if not path.is_file():
        raise WmvlaError(f"{path}: normalisation statistics file is missing")
    try:
        data = json.loads(path.read_text())
        return {k: NormStats.from_dict(v) for k, v in data["stats"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WmvlaError(f"{path}: not a wmvla norm_stats file ({e})") from e


def _params(x, stats: NormStats):
    if x.shape[-1] != stats.dim:
        raise WmvlaError(f"normalize({stats.key}): last dim is {x.shape[-1]}, the statistics have {stats.dim}")
    center, scale = stats.center_scale()
    clip = stats.mode == "quantile"
    norm_mask = np.ones(stats.dim, dtype=bool)
    norm_mask[list(stats.passthrough_dims)] = False
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        # compute in fp32 (fp64 for fp64 input) even for bf16/fp16 tensors; the result keeps x's dtype
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        as_t = lambda a: torch.as_tensor(a, dtype=dtype, device=x.device)  # noqa: E731
        return as_t(center), as_t(scale), clip, torch.as_tensor(norm_mask, device=x.device), True
    return center, scale, clip, norm_mask, False


def normalize(x, stats: NormStats):
    """Raw -> normalised values, numpy or torch, shape [..., D]. Passthrough dims are returned unchanged."""
    center, scale, clip, mask, is_torch = _params(x, stats)
    if is_torch:
        x2 = x.to(center.dtype)
        y = (x2 - center) / scale
        if clip:
            y = y.clamp(-1.0, 1.0)
        return torch_where(mask, y, x2).to(x.dtype if x.is_floating_point() else center.dtype)
    x64 = np.asarray(x, dtype=np.float64)
    y = (x64 - center) / scale
    if clip:
        y = np.clip(y, -1.0, 1.0)
    y = np.where(mask, y, x64)
    return y.astype(np.asarray(x).dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float32)


def unnormalize(y, stats: NormStats):
    """Normalised -> raw values (inverse of `normalize`; quantile mode clips y to [-1, 1] first)."""
    center, scale, clip, mask, is_torch = _params(y, stats)
    if is_torch:
        y2 = y.to(center.dtype)
        z = (y2.clamp(-1.0, 1.0) if clip else y2) * scale + center
        return torch_where(mask, z, y2).to(y.dtype if y.is_floating_point() else center.dtype)
    y64 = np.asarray(y, dtype=np.float64)
    z = (np.clip(y64, -1.0, 1.0) if clip else y64) * scale + center
    z = np.where(mask, z, y64)
    return z.astype(np.asarray(y).dtype if np.issubdtype(np.asarray(y).dtype, np.floating) else np.float32)


def torch_where(mask, a, b):
    import torch

    return torch.where(mask, a, b)
