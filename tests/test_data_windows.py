"""Windows never cross an episode boundary (property tests); ChunkDataset samples, padding and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_core.data.fixtures import CAMERA_KEYS, libero_like_image, make_libero_like
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.data.samples import ChunkDataset, collate_samples
from vla_core.data.windows import clamp_indices, future_offsets, history_offsets
from vla_core.utils import WmvlaError

# ------------------------------------------------------------------------------- clamp_indices


@st.composite
def episodes_and_frame(draw):
    lengths = draw(st.lists(st.integers(1, 30), min_size=1, max_size=8))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    e = draw(st.integers(0, len(lengths) - 1))
    t = int(starts[e]) + draw(st.integers(0, lengths[e] - 1))
    offsets = draw(st.lists(st.integers(-40, 40), min_size=1, max_size=12))
    return lengths, starts, e, t, np.array(offsets)


@settings(max_examples=300, deadline=None)
@given(episodes_and_frame())
def test_clamp_never_crosses_episode(case):
    lengths, starts, e, t, offsets = case
    start, length = int(starts[e]), lengths[e]
    idx, valid = clamp_indices(t, start, length, offsets)
    assert idx.shape == offsets.shape and valid.shape == offsets.shape
    # every index lies in t's own episode
    assert np.all((idx >= start) & (idx < start + length))
    ep_of = np.repeat(np.arange(len(lengths)), lengths)
    assert np.all(ep_of[idx] == e)
    # valid exactly where the unclamped index was inside the episode, and there it is unchanged
    raw = t + offsets
    inside = (raw >= start) & (raw < start + length)
    np.testing.assert_array_equal(valid, inside)
    np.testing.assert_array_equal(idx[inside], raw[inside])
    # clamped positions repeat the nearest end of the episode
    assert np.all(idx[raw < start] == start) and np.all(idx[raw >= start + length] == start + length - 1)


@settings(max_examples=100, deadline=None)
@given(episodes_and_frame())
def test_clamp_vectorised_matches_scalar(case):
    lengths, starts, _, _, offsets = case
    ep_of = np.repeat(np.arange(len(lengths)), lengths)
    t = np.arange(len(ep_of))
    idx, valid = clamp_indices(t, starts[ep_of], np.asarray(lengths)[ep_of], offsets)
    for i in range(len(t)):
        a, b = clamp_indices(i, starts[ep_of[i]], lengths[ep_of[i]], offsets)
        np.testing.assert_array_equal(idx[i], a)
        np.testing.assert_array_equal(valid[i], b)


def test_clamp_rejects_frame_outside_episode():
    with pytest.raises(ValueError):
        clamp_indices(10, 0, 5, [0])
    with pytest.raises(ValueError):
        clamp_indices(0, 0, 0, [0])


def test_offsets():
    assert history_offsets(4).tolist() == [-3, -2, -1, 0]
    assert future_offsets(3).tolist() == [1, 2, 3]
    assert future_offsets(3, start=0).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------- samples


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = make_libero_like(tmp_path_factory.mktemp("win") / "d", layout="v3_png", episodes=5, image_size=16,
                            min_length=3, max_length=12)
    return LeRobotDataset.open(root, keys=DatasetKeys())


def test_every_sample_stays_in_its_episode(ds):
    H, T, K = 6, 4, 5
    cds = ChunkDataset(ds, chunk_size=H, history=T, horizon=K)
    assert len(cds) == ds.num_frames
    action = ds.columns("action")
    for i in range(len(cds)):
        s = cds[i]
        e = ds.episodes[int(ds.episode_of[i])]
        assert s["episode_index"] == e.episode_index and s["frame_index"] == i - e.start and s["index"] == i
        for name in ("history_index", "future_index"):
            assert np.all((s[name] >= e.start) & (s[name] < e.stop)), (i, name)
        # history t-T+1..t clamped at the start
        raw_h = i + np.arange(-T + 1, 1)
        np.testing.assert_array_equal(s["history_index"], np.clip(raw_h, e.start, e.stop - 1))
        np.testing.assert_array_equal(s["history_mask"], raw_h >= e.start)
        # future t+1..t+K clamped at the end
        raw_f = i + np.arange(1, K + 1)
        np.testing.assert_array_equal(s["future_index"], np.clip(raw_f, e.start, e.stop - 1))
        np.testing.assert_array_equal(s["future_mask"], raw_f < e.stop)
        # action chunk a_t..a_{t+H-1}; past the end, the episode's last action repeats and the mask is False
        n_valid = min(H, e.stop - i)
        np.testing.assert_array_equal(s["action_mask"], np.arange(H) < n_valid)
        np.testing.assert_array_equal(s["actions"][:n_valid], action[i:i + n_valid])
        np.testing.assert_array_equal(s["actions"][n_valid:], np.repeat(action[e.stop - 1][None], H - n_valid, 0))
        np.testing.assert_array_equal(s["state"], ds.columns("observation.state")[i])
        assert s["task"] == e.task


def test_chunk_padding_at_last_frame(ds):
    cds = ChunkDataset(ds, chunk_size=8, history=1, horizon=2)
    e = ds.episodes[2]
    s = cds[e.stop - 1]
    assert s["action_mask"].tolist() == [True] + [False] * 7
    assert np.all(s["actions"] == ds.columns("action")[e.stop - 1])
    assert s["future_mask"].tolist() == [False, False]
    assert s["future_index"].tolist() == [e.stop - 1, e.stop - 1]
    first = cds[e.start]
    assert first["history_index"].tolist() == [e.start]


def test_sample_images_and_dtypes(ds):
    cds = ChunkDataset(ds, chunk_size=4, history=3, horizon=2)
    i = ds.episodes[1].start + 2
    s = cds[i]
    assert s["images"].dtype == np.uint8 and s["images"].shape == (2, 16, 16, 3)
    for c in range(2):  # agent view first, then wrist; raw (not resized)
        np.testing.assert_array_equal(s["images"][c], libero_like_image(1, 2, c, 16))
    assert s["state"].dtype == np.float32 and s["actions"].dtype == np.float32
    assert s["history_index"].dtype == np.int64 and s["action_mask"].dtype == bool
    no_wrist = ChunkDataset(ds, keys=DatasetKeys(wrist_image_key=None), chunk_size=4)
    assert no_wrist[i]["images"].shape == (1, 16, 16, 3)
    no_images = ChunkDataset(ds, chunk_size=4, load_images=False)
    assert "images" not in no_images[i]


def test_collate_keeps_tasks_as_strings(ds):
    cds = ChunkDataset(ds, chunk_size=4, history=2, horizon=3)
    batch = collate_samples([cds[i] for i in range(5)])
    assert isinstance(batch["task"], list) and all(isinstance(t, str) for t in batch["task"])
    assert batch["images"].shape == (5, 2, 16, 16, 3) and batch["images"].dtype == torch.uint8
    assert batch["actions"].shape == (5, 4, 7) and batch["actions"].dtype == torch.float32
    assert batch["action_mask"].dtype == torch.bool and batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["history_index"].shape == (5, 2) and batch["future_mask"].shape == (5, 3)


def test_episode_subset(ds):
    ids = [ds.episodes[1].episode_index, ds.episodes[3].episode_index]
    cds = ChunkDataset(ds, chunk_size=2, episodes=ids)
    assert len(cds) == ds.episodes[1].length + ds.episodes[3].length
    assert {int(cds[i]["episode_index"]) for i in range(len(cds))} == set(ids)
    with pytest.raises(WmvlaError, match="do not exist"):
        ChunkDataset(ds, episodes=[99])


def test_chunk_dataset_checks_keys(ds):
    with pytest.raises(WmvlaError, match="instruction"):
        ChunkDataset(ds, keys=DatasetKeys(instruction_key="instruction"))
    with pytest.raises(WmvlaError):
        ChunkDataset(ds, chunk_size=0)


def test_video_dataset_history_frames_match(tmp_path):
    """Decoding the history window of an mp4 dataset gives the same frames as the PNG one (within codec error)."""
    png = LeRobotDataset.open(make_libero_like(tmp_path / "p", layout="v3_png", episodes=3, image_size=32, seed=3))
    mp4 = LeRobotDataset.open(make_libero_like(tmp_path / "m", layout="v3_mp4", episodes=3, image_size=32, seed=3))
    cds = ChunkDataset(mp4, keys=DatasetKeys(), history=4, horizon=3)
    s = cds[mp4.episodes[1].start + 1]
    a = mp4.frames(CAMERA_KEYS[0], s["history_index"])
    b = png.frames(CAMERA_KEYS[0], s["history_index"])
    assert np.abs(a.astype(int) - b).mean() < 6
