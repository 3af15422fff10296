"""Bad input: each case fails with a WmvlaError that names the file (or key) and the problem."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vla_core.data.fixtures import make_libero_like
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.utils import WmvlaError

SIZE = 16
EP_META = "meta/episodes/chunk-000/file-000.parquet"
CAM = "observation.images.image"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {layout: make_libero_like(root / layout, layout=layout, episodes=4, image_size=SIZE, min_length=4, max_length=9)
            for layout in ("v3_png", "v3_mp4", "v2.1")}


@pytest.fixture
def copy(pristine, tmp_path):
    def make(layout):
        dst = tmp_path / layout
        shutil.copytree(pristine[layout], dst)
        return dst
    return make


def _edit_parquet(path, fn):
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def _set_column(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type=table.schema.field(i).type))


def _edit_info(root, **changes):
    p = root / "meta/info.json"
    info = json.loads(p.read_text())
    info.update(changes)
    p.write_text(json.dumps(info))


# ------------------------------------------------------------------------------------------- keys


def test_missing_key_lists_available_keys(pristine):
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(pristine["v3_png"], keys=DatasetKeys(image_key="observation.images.front"))
    msg = str(e.value)
    assert "image_key='observation.images.front'" in msg
    assert "available keys" in msg and "observation.images.image2" in msg and "observation.state" in msg


def test_instruction_key_hint_points_to_task(pristine):
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(pristine["v3_png"], keys=DatasetKeys(instruction_key="instruction"))
    assert "instruction_key='instruction'" in str(e.value)
    assert "under `task`" in str(e.value)


def test_key_of_wrong_kind(pristine):
    with pytest.raises(WmvlaError, match="state_key='observation.images.image2' has dtype 'image'"):
        LeRobotDataset.open(pristine["v3_png"], keys=DatasetKeys(state_key="observation.images.image2"))
    with pytest.raises(WmvlaError, match="image_key='action' has dtype 'float32'"):
        LeRobotDataset.open(pristine["v3_png"], keys=DatasetKeys(image_key="action"))


def test_several_key_problems_reported_together(pristine):
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(pristine["v2.1"], keys=DatasetKeys(state_key="obs.state", action_key="actions"))
    assert "state_key='obs.state'" in str(e.value) and "action_key='actions'" in str(e.value)


# -------------------------------------------------------------------------------- truncated files


@pytest.mark.parametrize("layout,rel", [
    ("v3_png", "data/chunk-000/file-000.parquet"),
    ("v3_png", EP_META),
    ("v3_png", "meta/tasks.parquet"),
    ("v2.1", "data/chunk-000/episode_000002.parquet"),
])
def test_truncated_parquet(copy, layout, rel):
    root = copy(layout)
    path = root / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert str(path) in str(e.value) and "truncated or corrupt" in str(e.value)


def test_truncated_parquet_found_lazily_without_verify(copy):
    """With verify=False the damage shows up when the column is read, still naming the file."""
    root = copy("v3_png")
    path = root / "data/chunk-000/file-000.parquet"
    path.write_bytes(path.read_bytes()[:100])
    ds = LeRobotDataset.open(root, verify=False)
    with pytest.raises(WmvlaError, match="file-000.parquet: not a readable parquet"):
        ds.columns("action")


# -------------------------------------------------------------------------------------- videos


@pytest.mark.parametrize("layout", ["v3_mp4", "v2.1"])
def test_missing_video_file(copy, layout):
    root = copy(layout)
    victim = sorted((root / "videos").rglob("*.mp4"))[-1]
    victim.unlink()
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert str(victim) in str(e.value) and "missing" in str(e.value)


def test_video_deleted_after_open(copy):
    root = copy("v3_mp4")
    ds = LeRobotDataset.open(root)
    victim = root / f"videos/{CAM}/chunk-000/file-000.mp4"
    victim.unlink()
    with pytest.raises(WmvlaError, match="file-000.mp4: video file is missing"):
        ds.frames(CAM, [0])


def test_corrupt_video_file(copy):
    root = copy("v3_mp4")
    victim = root / f"videos/{CAM}/chunk-000/file-000.mp4"
    victim.write_bytes(b"\x00" * 64)
    ds = LeRobotDataset.open(root)
    with pytest.raises(WmvlaError, match="file-000.mp4"):
        ds.frames(CAM, [0])


def test_video_timestamps_inconsistent(copy):
    root = copy("v3_mp4")
    _edit_parquet(root / EP_META, lambda t: _set_column(
        t, f"videos/{CAM}/to_timestamp", (np.array(t.column(f"videos/{CAM}/to_timestamp").to_pylist()) + 5.0).tolist()))
    with pytest.raises(WmvlaError, match="video 'observation.images.image' spans"):
        LeRobotDataset.open(root)


def test_video_shorter_than_metadata(copy):
    """from_timestamp pointing past the end of the video: the frame is not there."""
    root = copy("v3_mp4")
    _edit_parquet(root / EP_META, lambda t: _set_column(
        t, f"videos/{CAM}/from_timestamp", (np.array(t.column(f"videos/{CAM}/from_timestamp").to_pylist()) + 100.0).tolist()))
    _edit_parquet(root / EP_META, lambda t: _set_column(
        t, f"videos/{CAM}/to_timestamp", (np.array(t.column(f"videos/{CAM}/to_timestamp").to_pylist()) + 100.0).tolist()))
    ds = LeRobotDataset.open(root)
    with pytest.raises(WmvlaError, match="no frame at t="):
        ds.frames(CAM, [0])


# ---------------------------------------------------------------------- metadata vs data mismatch


def test_total_frames_mismatch(copy):
    root = copy("v3_png")
    _edit_info(root, total_frames=999)
    with pytest.raises(WmvlaError, match=r"info.json: total_frames=999 but the episodes hold"):
        LeRobotDataset.open(root)


def test_episode_length_disagrees_with_data_file(copy):
    """Episode 0 claims one frame more (and every later episode shifts): the data file has fewer rows."""
    root = copy("v3_png")
    def grow(t):
        t = _set_column(t, "length", [n + (1 if i == 0 else 0) for i, n in enumerate(t.column("length").to_pylist())])
        t = _set_column(t, "dataset_from_index", [s + (1 if i > 0 else 0) for i, s in enumerate(t.column("dataset_from_index").to_pylist())])
        return _set_column(t, "dataset_to_index", [s + 1 for s in t.column("dataset_to_index").to_pylist()])
    _edit_parquet(root / EP_META, grow)
    _edit_info(root, total_frames=json.loads((root / "meta/info.json").read_text())["total_frames"] + 1)
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert "data/chunk-000/file-000.parquet" in str(e.value) and "rows" in str(e.value)


def test_length_disagrees_with_index_range(copy):
    root = copy("v3_png")
    _edit_parquet(root / EP_META, lambda t: _set_column(t, "length", [n + 1 for n in t.column("length").to_pylist()]))
    with pytest.raises(WmvlaError, match="dataset_to_index - dataset_from_index"):
        LeRobotDataset.open(root)


def test_episode_index_column_disagrees(copy):
    """Metadata says episodes 0,1,2,3 but relabels them 10.. : the per-frame episode_index column disagrees."""
    root = copy("v3_png")
    _edit_parquet(root / EP_META, lambda t: _set_column(t, "episode_index", [10 + i for i in t.column("episode_index").to_pylist()]))
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert "file-000.parquet" in str(e.value) and "episode_index=0" in str(e.value)


def test_v21_episode_length_disagrees(copy):
    root = copy("v2.1")
    p = root / "meta/episodes.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    rows[1]["length"] += 2
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _edit_info(root, total_frames=sum(r["length"] for r in rows))
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert "episode_000001.parquet" in str(e.value) and "rows" in str(e.value)


def test_task_index_out_of_range(copy):
    root = copy("v3_png")
    path = root / "data/chunk-000/file-000.parquet"
    _edit_parquet(path, lambda t: _set_column(t, "task_index", [7] * t.num_rows))
    with pytest.raises(WmvlaError, match="task_index=7"):
        LeRobotDataset.open(root)


# ------------------------------------------------------------------------------ versions, tasks, paths


@pytest.mark.parametrize("version", ["v1.6", "v4.0", "None"])
def test_unknown_codebase_version(copy, version):
    root = copy("v3_png")
    _edit_info(root, codebase_version=None if version == "None" else version)
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert "info.json" in str(e.value) and "codebase_version" in str(e.value) and "v3.0" in str(e.value)


def test_empty_task_string_v3(copy):
    root = copy("v3_png")
    _edit_parquet(root / "meta/tasks.parquet", lambda t: _set_column(t, "__index_level_0__", ["pick up", "  ", "open"]))
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open(root)
    assert "tasks.parquet" in str(e.value) and "empty task" in str(e.value)


def test_empty_task_string_v21(copy):
    root = copy("v2.1")
    p = root / "meta/tasks.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    rows[0]["task"] = ""
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(WmvlaError, match="tasks.jsonl: task_index 0 has an empty task string"):
        LeRobotDataset.open(root)


def test_missing_info_json(copy, tmp_path):
    root = copy("v3_png")
    (root / "meta/info.json").unlink()
    with pytest.raises(WmvlaError, match="info.json: missing"):
        LeRobotDataset.open(root)
    with pytest.raises(WmvlaError, match="no such folder"):
        LeRobotDataset.open(tmp_path / "does" / "not" / "exist")


def test_hub_id_offline_fails_fast_with_local_copy_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.time()
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open("someone/not-cached-dataset")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "someone/not-cached-dataset" in msg and "HF_HUB_OFFLINE" in msg and "--local-dir" in msg


def test_hub_id_unreachable_fails_fast(monkeypatch, tmp_path):
    """Hub not reachable (this machine): a bounded probe, then the same clear error."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.time()
    with pytest.raises(WmvlaError) as e:
        LeRobotDataset.open("someone/not-cached-dataset")
    assert time.time() - t0 < 30
    assert "someone/not-cached-dataset" in str(e.value) and "local" in str(e.value)
