"""`wmvla data generate metaworld`: a readable LeRobot v3.0 dataset of successful expert episodes."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np
import pyarrow.parquet as pq
import pytest

from vla_core.cli import main
from vla_core.envs.generate import GenerateConfig, load_generation_record, run_generate
from vla_core.envs.registry import EnvConfig, make_env
from vla_core.utils import WmvlaError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "mw"
    rc = main(["data", "generate", "metaworld", "--tasks", "reach,button-press-topdown", "--episodes", "3",
               "--out", str(out), "--workers", "2", "--seed", "5"])
    assert rc == 0
    return out


def test_dataset_reads_back_with_the_project_reader(dataset):
    from vla_core.data.keys import DatasetKeys
    from vla_core.data.lerobot import LeRobotDataset

    ds = LeRobotDataset.open(dataset, DatasetKeys(wrist_image_key=None))
    assert ds.version == "v3.0" and ds.fps == 80 and ds.num_episodes == 6
    assert [e.task for e in ds.episodes] == ["move the gripper to the goal"] * 3 + ["press the button down from the top"] * 3
    state, action = ds.columns("observation.state"), ds.columns("action")
    assert state.shape == (ds.num_frames, 39) and action.shape == (ds.num_frames, 4)
    assert np.all(np.abs(action) <= 1.0)
    imgs = ds.frames("observation.images.image", [0, ds.num_frames - 1])
    assert imgs.shape == (2, 128, 128, 3) and imgs.dtype == np.uint8
    assert ds.features["observation.state"]["names"][:4] == ["hand_x", "hand_y", "hand_z", "gripper_opening"]


def test_episodes_record_seed_and_init_and_stop_after_success(dataset):
    eps = pq.read_table(dataset / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["metaworld_seed"] for e in eps] == [5] * 6
    assert [e["init_index"] for e in eps] == [0, 1, 2, 0, 1, 2]  # all succeeded: attempts 0, 1, 2
    for e in eps:
        assert e["length"] == e["success_step"] + 5  # 5 steps recorded after the first success
    rec = load_generation_record(dataset)
    assert rec["seeds_used"] == [5] and rec["eval_seed_excluded"] == 1000
    assert rec["env_config"]["metaworld"]["shadows"] is False and rec["env_config"]["image_size"] == 128


def test_first_frame_is_exactly_what_evaluation_renders(dataset):
    """Same adapter, same settings: the dataset's first image equals a fresh env's reset image."""
    from vla_core.data.lerobot import LeRobotDataset

    ds = LeRobotDataset.open(dataset)
    ep = ds.episodes[4]  # button-press-topdown, init 1 of seed 5
    env = make_env(EnvConfig(seed=5), "button-press-topdown-v3")
    try:
        obs = env.reset(1)
    finally:
        env.close()
    np.testing.assert_array_equal(ds.frames("observation.images.image", [ep.start])[0], obs["images"]["observation.images.image"])
    np.testing.assert_array_equal(ds.columns("observation.state")[ep.start], obs["state"])


def test_generation_refuses_the_evaluation_seed(tmp_path):
    with pytest.raises(WmvlaError, match="evaluation seed 1000"):
        run_generate(GenerateConfig(env="metaworld", out=tmp_path / "x", tasks="reach", episodes=2, seed=1000))
    # seeds 990..999 + attempts spilling into seed 1000 are refused too
    with pytest.raises(WmvlaError, match="include the evaluation"):
        run_generate(GenerateConfig(env="metaworld", out=tmp_path / "x", tasks="reach", episodes=200, seed=997))


def test_noise_and_in_process_generation(tmp_path):
    out = tmp_path / "noisy"
    run_generate(GenerateConfig(env="metaworld", out=out, tasks="reach", episodes=1, workers=0,
                                action_noise=0.3, steps_after_success=0, image_size=64))
    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert eps[0]["action_noise"] == 0.3 and eps[0]["length"] == eps[0]["success_step"]
    data = pq.read_table(out / "data/chunk-000/file-000.parquet", columns=["action"]).to_pylist()
    a = np.array([d["action"] for d in data])
    assert np.abs(np.diff(a[:, 3])).max() > 0  # the gripper dim is noisy (the reach expert outputs 0)
