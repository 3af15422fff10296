"""LeRobot writer/fixtures -> reader round trips for every layout, LeRobot-compatible structure, workers."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vla_core.data.fixtures import (
    CAMERA_KEYS,
    LIBERO_TASKS,
    episode_lengths,
    libero_features,
    libero_like_episode,
    libero_like_image,
    make_libero_like,
)
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.data.samples import ChunkDataset, collate_samples
from vla_core.data.writer import LeRobotV3Writer
from vla_core.utils import WmvlaError

SIZE = 32
EPISODES = 5
LAYOUTS = ["v3_png", "v3_mp4", "v2.1", "v2.1_png"]


def _expected_numeric(seed=0, episodes=EPISODES, size=SIZE):
    """The fixture's state/action arrays, regenerated with the same RNG sequence."""
    rng = np.random.default_rng(seed)
    lengths = episode_lengths(episodes, seed, 8, 20)
    eps = [libero_like_episode(e, n, size, rng) for e, n in enumerate(lengths)]
    return (np.concatenate([e["observation.state"] for e in eps]), np.concatenate([e["action"] for e in eps]), lengths)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_io")
    out = {}
    for layout in LAYOUTS:
        # tiny file-size limits force several data files (and video files) in the v3 layouts
        kw = dict(data_files_size_in_mb=0.001, video_files_size_in_mb=0.0) if layout.startswith("v3") else {}
        out[layout] = make_libero_like(root / layout, layout=layout, episodes=EPISODES, seed=0, image_size=SIZE, **kw)
    # v3 mp4 with all episodes in ONE video file (non-zero from_timestamp for later episodes)
    out["v3_mp4_onefile"] = make_libero_like(root / "v3_mp4_onefile", layout="v3_mp4", episodes=EPISODES, seed=0,
                                             image_size=SIZE)
    return out


@pytest.mark.parametrize("layout", LAYOUTS + ["v3_mp4_onefile"])
def test_round_trip_metadata_and_numeric(datasets, layout):
    ds = LeRobotDataset.open(datasets[layout], keys=DatasetKeys())
    state, action, lengths = _expected_numeric()
    assert ds.version == ("v3.0" if layout.startswith("v3") else "v2.1")
    assert ds.fps == 10
    assert ds.num_episodes == EPISODES and ds.num_frames == sum(lengths)
    assert [e.length for e in ds.episodes] == lengths
    assert len(set(lengths)) > 1  # episodes of different lengths
    assert [e.start for e in ds.episodes] == list(np.cumsum([0] + lengths[:-1]))
    assert [e.task for e in ds.episodes] == [LIBERO_TASKS[e % 3] for e in range(EPISODES)]
    assert ds.tasks == list(LIBERO_TASKS[:3])
    np.testing.assert_array_equal(ds.columns("observation.state"), state)
    np.testing.assert_array_equal(ds.columns("action"), action)
    assert ds.columns("action").dtype == np.float32 and ds.columns("action").shape == (sum(lengths), 7)
    assert set(np.unique(ds.columns("action")[:, -1])) == {-1.0, 1.0}  # gripper +-1
    np.testing.assert_array_equal(ds.columns("index"), np.arange(ds.num_frames))
    np.testing.assert_array_equal(ds.episode_of, np.repeat(np.arange(EPISODES), lengths))
    for e in ds.episodes:
        fi = ds.columns("frame_index")[e.start:e.stop]
        np.testing.assert_array_equal(fi, np.arange(e.length))
        assert ds.tasks_of([e.start, e.stop - 1]) == [e.task, e.task]
    for key in CAMERA_KEYS:
        assert list(ds.features[key]["shape"]) == [SIZE, SIZE, 3]


@pytest.mark.parametrize("layout", LAYOUTS + ["v3_mp4_onefile"])
def test_round_trip_frames(datasets, layout):
    ds = LeRobotDataset.open(datasets[layout], keys=DatasetKeys())
    rng = np.random.default_rng(1)
    # random order, repeats, both ends of every episode
    idx = np.concatenate([rng.permutation(ds.num_frames)[:25], [e.start for e in ds.episodes],
                          [e.stop - 1 for e in ds.episodes], [3, 3]])
    png = "png" in layout
    for cam, key in enumerate(CAMERA_KEYS):
        frames = ds.frames(key, idx)
        assert frames.dtype == np.uint8 and frames.shape == (len(idx), SIZE, SIZE, 3)
        for j, i in enumerate(idx):
            e = int(ds.episode_of[i])
            t = int(i - ds.episodes[e].start)
            expect = libero_like_image(e, t, cam, SIZE)
            if png:
                np.testing.assert_array_equal(frames[j], expect)
            else:
                err = np.abs(frames[j].astype(int) - expect).mean()
                assert err < 6, (layout, i, err)
                # it is the right frame: closer to frame t than to its neighbours in the episode
                for dt in (-1, 1):
                    if 0 <= t + dt < ds.episodes[e].length:
                        other = np.abs(frames[j].astype(int) - libero_like_image(e, t + dt, cam, SIZE)).mean()
                        assert err < other, (layout, i, dt, err, other)


def test_multiple_files_were_written(datasets):
    root = datasets["v3_mp4"]
    assert len(list((root / "data").glob("chunk-*/file-*.parquet"))) > 1
    assert len(list((root / "videos" / CAMERA_KEYS[0]).glob("chunk-*/file-*.mp4"))) == EPISODES
    one = datasets["v3_mp4_onefile"]
    assert len(list((one / "videos" / CAMERA_KEYS[0]).glob("chunk-*/file-*.mp4"))) == 1
    eps = pq.read_table(one / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert eps[0][f"videos/{CAMERA_KEYS[0]}/from_timestamp"] == 0
    assert eps[-1][f"videos/{CAMERA_KEYS[0]}/from_timestamp"] > 0


def test_v3_layout_matches_lerobot(datasets):
    """The files LeRobot's loader reads, with the fields and columns it expects."""
    root = datasets["v3_mp4"]
    info = json.loads((root / "meta/info.json").read_text())
    for field in ("codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
                  "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path",
                  "features"):
        assert field in info, field
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert info["features"][key]["shape"] == [1]
    assert info["features"][CAMERA_KEYS[0]]["dtype"] == "video"
    assert info["features"][CAMERA_KEYS[0]]["info"]["video.fps"] == 10
    assert info["total_frames"] == sum(_expected_numeric()[2]) and info["total_tasks"] == 3

    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
    cols = set(eps.column_names)
    for c in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
              "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index"):
        assert c in cols, c
    for key in CAMERA_KEYS:
        for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
            assert f"videos/{key}/{c}" in cols
    for stat in ("min", "max", "mean", "std", "count"):
        assert f"stats/action/{stat}" in cols and f"stats/{CAMERA_KEYS[0]}/{stat}" in cols
    assert np.array(eps.column(f"stats/{CAMERA_KEYS[0]}/mean")[0].as_py()).shape == (3, 1, 1)

    # tasks.parquet: a pandas frame indexed by the task string (LeRobot reads it with pd.read_parquet)
    tasks = pq.read_table(root / "meta/tasks.parquet")
    meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert meta["index_columns"] == ["__index_level_0__"]
    assert tasks.column("__index_level_0__").to_pylist() == list(LIBERO_TASKS[:3])
    assert tasks.column("task_index").to_pylist() == [0, 1, 2]

    stats = json.loads((root / "meta/stats.json").read_text())
    action = _expected_numeric()[1]
    np.testing.assert_allclose(stats["action"]["mean"], action.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(action.astype(np.float64), 0.99, axis=0), rtol=1e-6)
    assert np.array(stats[CAMERA_KEYS[0]]["mean"]).shape == (3, 1, 1)

    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert str(data.schema.field("action").type) == "fixed_size_list<element: float>[7]"
    assert b"huggingface" in data.schema.metadata


def test_png_images_are_inline_structs(datasets):
    t = pq.read_table(datasets["v3_png"] / "data/chunk-000/file-000.parquet", columns=[CAMERA_KEYS[0]])
    item = t.column(0)[0].as_py()
    assert set(item) == {"bytes", "path"} and item["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_libero_exact_schema_256(tmp_path):
    """The fixture with HuggingFaceVLA/libero's exact shapes (256x256 cameras), kept small."""
    root = make_libero_like(tmp_path / "libero", layout="v3_png", episodes=2, image_size=256, min_length=3, max_length=5)
    ds = LeRobotDataset.open(root, keys=DatasetKeys())
    feats = ds.features
    assert {k: (feats[k]["dtype"], list(feats[k]["shape"])) for k in libero_features()} == {
        "observation.images.image": ("image", [256, 256, 3]),
        "observation.images.image2": ("image", [256, 256, 3]),
        "observation.state": ("float32", [8]),
        "action": ("float32", [7]),
    }
    assert ds.fps == 10 and len(ds.tasks) == 2
    frames = ds.frames("observation.images.image", [0, ds.num_frames - 1])
    np.testing.assert_array_equal(frames[0], libero_like_image(0, 0, 0, 256))
    np.testing.assert_array_equal(frames[1], libero_like_image(1, ds.episodes[1].length - 1, 0, 256))


def test_fingerprint_stable_and_sensitive(tmp_path, datasets):
    a = LeRobotDataset.open(datasets["v3_png"]).fingerprint()
    assert a == LeRobotDataset.open(datasets["v3_png"]).fingerprint()
    assert set(a) >= {"source", "revision", "version", "num_frames", "num_episodes", "content_hash"}
    other = make_libero_like(tmp_path / "other", layout="v3_png", episodes=EPISODES, seed=0, image_size=SIZE,
                             max_length=21)
    assert LeRobotDataset.open(other).fingerprint()["content_hash"] != a["content_hash"]


def test_pickle_and_dataloader_workers(datasets):
    """Workers open their own files lazily; results equal the main process's."""
    ds = LeRobotDataset.open(datasets["v3_mp4"], keys=DatasetKeys())
    ds.frames(CAMERA_KEYS[0], [0])  # open a decoder in the parent first
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.frames(CAMERA_KEYS[0], [5]), ds.frames(CAMERA_KEYS[0], [5]))
    cds = ChunkDataset(ds, chunk_size=4, history=2, horizon=3)
    ref = collate_samples([cds[i] for i in range(8)])
    loader = torch.utils.data.DataLoader(cds, batch_size=4, num_workers=2, collate_fn=collate_samples,
                                         multiprocessing_context="fork")
    batches = list(loader)
    got = {k: (sum((b[k] for b in batches[:2]), []) if k == "task" else torch.cat([b[k] for b in batches[:2]]))
           for k in ref}
    for k in ref:
        if k == "task":
            assert got[k] == ref[k]
        else:
            assert torch.equal(got[k], ref[k]), k


def test_writer_rejects_bad_episodes(tmp_path):
    feats = libero_features(16)
    w = LeRobotV3Writer(tmp_path / "w", 10, feats)
    good = libero_like_episode(0, 4, 16, np.random.default_rng(0))
    with pytest.raises(WmvlaError, match="non-empty"):
        w.add_episode("  ", good)
    with pytest.raises(WmvlaError, match="missing"):
        w.add_episode("task", {k: v for k, v in good.items() if k != "action"})
    with pytest.raises(WmvlaError, match="index columns"):
        w.add_episode("task", {**good, "index": np.arange(4)})
    with pytest.raises(WmvlaError, match="same length"):
        w.add_episode("task", {**good, "action": good["action"][:3]})
    with pytest.raises(WmvlaError, match="uint8"):
        w.add_episode("task", {**good, CAMERA_KEYS[0]: good[CAMERA_KEYS[0]].astype(np.float32)})
    bad = good["action"].copy()
    bad[1, 0] = np.nan
    with pytest.raises(WmvlaError, match="NaN"):
        w.add_episode("task", {**good, "action": bad})
    with pytest.raises(WmvlaError, match="no episodes"):
        w.finalize()
    # an existing dataset folder is not overwritten silently
    make_libero_like(tmp_path / "exists", episodes=1, image_size=16, min_length=2, max_length=2)
    with pytest.raises(WmvlaError, match="not empty"):
        LeRobotV3Writer(tmp_path / "exists", 10, feats)


def test_writer_episode_meta_and_float64_input(tmp_path):
    """episode_meta columns land in meta/episodes; float64 arrays are cast to the feature dtype."""
    feats = {"observation.state": {"dtype": "float32", "shape": [3], "names": None},
             "action": {"dtype": "float32", "shape": [2], "names": None},
             "observation.images.cam": {"dtype": "video", "shape": [16, 16, 3], "names": None}}
    rng = np.random.default_rng(0)
    with LeRobotV3Writer(tmp_path / "mw", 80, feats, robot_type="sawyer", image_storage="png") as w:
        for e in range(3):
            T = 5 + e
            w.add_episode(f"task {e % 2}", {"observation.state": rng.normal(size=(T, 3)),
                                           "action": rng.uniform(-1, 1, size=(T, 2)),
                                           "observation.images.cam": rng.integers(0, 255, (T, 16, 16, 3), dtype=np.uint8)},
                          episode_meta={"success": e != 1, "init_index": e})
    eps = pq.read_table(tmp_path / "mw/meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["success"] for r in eps] == [True, False, True] and [r["init_index"] for r in eps] == [0, 1, 2]
    ds = LeRobotDataset.open(tmp_path / "mw", keys=DatasetKeys(image_key="observation.images.cam", wrist_image_key=None))
    assert ds.features["observation.images.cam"]["dtype"] == "image"  # image_storage decides
    assert ds.columns("observation.state").dtype == np.float32 and ds.fps == 80
    assert ds.tasks == ["task 0", "task 1"]
    # an interrupted write leaves no meta/info.json: readers refuse it
    w = LeRobotV3Writer(tmp_path / "partial", 10, feats)
    w.add_episode("t", {"observation.state": np.zeros((2, 3)), "action": np.zeros((2, 2)),
                        "observation.images.cam": np.zeros((2, 16, 16, 3), np.uint8)})
    w.abort()
    with pytest.raises(WmvlaError, match="info.json"):
        LeRobotDataset.open(tmp_path / "partial")
