"""Training samples: one frame t of a LeRobot dataset plus its action chunk and temporal windows.

`ChunkDataset(ds, chunk_size=H, history=T, horizon=K)[i]` (i = global frame index, or position in the
chosen episodes' frames) returns raw values; the policy's processor does resizing and normalisation:

    images          uint8 [n_cams, h, w, 3]    cameras in `keys.camera_keys` order (agent view first)
    state           float32 [S]
    actions         float32 [H, A]             a_t .. a_{t+H-1}; past the episode end the last action repeats
    action_mask     bool [H]                   False on those padded steps (exclude them from the loss)
    task            str                        the language instruction
    index, episode_index, frame_index  int64
    history_index   int64 [T]                  t-T+1 .. t, clamped at the episode start (repeats its first frame)
    history_mask    bool [T]                   False where clamped
    future_index    int64 [K]                  t+1 .. t+K, clamped at the episode end
    future_mask     bool [K]                   False where clamped

`collate_samples` stacks arrays into torch tensors and keeps `task` as a list of str. Use it as the
DataLoader's collate_fn so stacking happens in the workers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.data.windows import clamp_indices, future_offsets, history_offsets
from vla_core.utils import WmvlaError


class ChunkDataset(Dataset):
    """Map-style dataset over frames of `ds` (all episodes, or the episode ids in `episodes`)."""

    def __init__(self, ds: LeRobotDataset, chunk_size: int = 8, history: int = 1, horizon: int = 0,
                 keys: DatasetKeys | None = None, episodes: Sequence[int] | None = None, load_images: bool = True):
        if chunk_size < 1 or history < 1 or horizon < 0:
            raise WmvlaError(f"need chunk_size >= 1, history >= 1, horizon >= 0; got {chunk_size}, {history}, {horizon}")
        keys = keys or ds.keys
        if keys is None:
            raise WmvlaError("ChunkDataset needs DatasetKeys (pass keys=, or open the dataset with keys)")
        keys.validate(ds.features, source=str(ds.root))
        self.ds, self.keys = ds, keys
        self.chunk_size, self.history, self.horizon = chunk_size, history, horizon
        self.load_images = load_images
        shapes = {k: tuple(ds.features[k]["shape"]) for k in keys.camera_keys}
        if load_images and len(set(shapes.values())) > 1:
            raise WmvlaError(f"cameras have different shapes {shapes}; ChunkDataset stacks them into one array")
        # Numeric columns are read once here (pyarrow, whole columns) and shared copy-on-write with
        # forked DataLoader workers; images are decoded lazily in the workers.
        self.state = ds.columns(keys.state_key).astype(np.float32, copy=False)
        self.action = ds.columns(keys.action_key).astype(np.float32, copy=False)
        if self.state.ndim == 1:
            self.state = self.state[:, None]
        if self.action.ndim == 1:
            self.action = self.action[:, None]
        ds.columns("task_index" if keys.instruction_key == "task" else keys.instruction_key)
        if load_images and ds.video_keys:
            ds.columns("timestamp")
        if episodes is None:
            self.frame_indices = np.arange(ds.num_frames, dtype=np.int64)
        else:
            pos = [ds._pos_of_episode_index.get(int(e)) for e in episodes]
            if any(p is None for p in pos):
                missing = [e for e, p in zip(episodes, pos) if p is None]
                raise WmvlaError(f"{ds.root}: episodes {missing} do not exist")
            self.frame_indices = np.concatenate(
                [np.arange(ds.episodes[p].start, ds.episodes[p].stop, dtype=np.int64) for p in pos])
        self._hist = history_offsets(history)
        self._fut = future_offsets(horizon, start=1)
        self._chunk = future_offsets(chunk_size, start=0)

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, i: int) -> dict:
        ds = self.ds
        t = int(self.frame_indices[i])
        ep = ds.episodes[int(ds.episode_of[t])]
        chunk_idx, action_mask = clamp_indices(t, ep.start, ep.length, self._chunk)
        hist_idx, hist_mask = clamp_indices(t, ep.start, ep.length, self._hist)
        fut_idx, fut_mask = clamp_indices(t, ep.start, ep.length, self._fut)
        sample = {
            "state": self.state[t].copy(),
            "actions": self.action[chunk_idx],  # clamped indices repeat the episode's last action
            "action_mask": action_mask,
            "task": ds.tasks_of([t], self.keys.instruction_key)[0],
            "index": np.int64(t),
            "episode_index": np.int64(ep.episode_index),
            "frame_index": np.int64(t - ep.start),
            "history_index": hist_idx,
            "history_mask": hist_mask,
            "future_index": fut_idx,
            "future_mask": fut_mask,
        }
        if self.load_images:
            sample["images"] = np.stack([ds.frames(k, [t])[0] for k in self.keys.camera_keys])
        return sample


def collate_samples(batch: list[dict]) -> dict:
    """Stack numpy fields into torch tensors [B, ...]; `task` stays a list of str."""
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], str):
            out[key] = values
        else:
            out[key] = torch.from_numpy(np.stack(values))
    return out
