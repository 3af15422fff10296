"""Temporal windows that never cross an episode boundary.

The earlier attempt looked up episodes with a silent fallback to "one giant episode", so history windows
and future targets mixed frames of different episodes. Here every window is computed from the episode's
(start, length) and clamped into it; `valid_mask` says which positions were really inside the episode.
"""

from __future__ import annotations

import numpy as np


def clamp_indices(t, ep_start, ep_len, offsets) -> tuple[np.ndarray, np.ndarray]:
    """Global indices t + offsets clamped to the episode [ep_start, ep_start + ep_len).

    t, ep_start, ep_len: ints or int arrays of the same shape [...] (t must lie inside its episode);
    offsets: int array [W]. Returns (indices int64 [..., W], valid_mask bool [..., W]) where valid_mask is
    False for positions that fell outside the episode and were replaced by its first or last frame.
    """
    t = np.asarray(t, dtype=np.int64)
    start = np.asarray(ep_start, dtype=np.int64)
    length = np.asarray(ep_len, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    if np.any(length <= 0):
        raise ValueError(f"episode length must be positive, got {length}")
    last = start + length - 1
    if np.any((t < start) | (t > last)):
        raise ValueError(f"frame {t} is outside its episode [{start}, {last}]")
    raw = t[..., None] + offsets
    lo, hi = start[..., None], last[..., None]
    valid = (raw >= lo) & (raw <= hi)
    return np.clip(raw, lo, hi), valid


def history_offsets(T: int) -> np.ndarray:
    """[-(T-1), ..., -1, 0]: the current frame and the T-1 before it."""
    return np.arange(-(T - 1), 1, dtype=np.int64)


def future_offsets(K: int, start: int = 1) -> np.ndarray:
    """[start, ..., start+K-1]; start=1 gives t+1..t+K, start=0 gives an action chunk t..t+K-1."""
    return np.arange(start, start + K, dtype=np.int64)
