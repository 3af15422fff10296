"""The user's pipeline end to end at tiny scale: a policy trained on data with HuggingFaceVLA/libero's schema
(agent view + wrist, state 8, action 7, language under `task`) is evaluated in closed loop in LIBERO with
its predicted world memory, through `wmvla eval --checkpoint` exactly as on a GPU."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest

from wmvla.cli import main
from wmvla.utils import read_jsonl

pytestmark = pytest.mark.libero


@pytest.fixture(scope="module")
def libero_checkpoint(tmp_path_factory):
    from wmvla.data.fixtures import make_libero_like
    from wmvla.data.lerobot import LeRobotDataset
    from wmvla.train.config import get_preset
    from wmvla.train.loop import train
    from wmvla.world.cache import precompute_latents
    from wmvla.world.encoder import WorldEncoderSpec, build_world_encoder

    root = tmp_path_factory.mktemp("libero_ckpt")
    ds_path = make_libero_like(root / "ds", layout="v3_png", episodes=6, image_size=64, min_length=10, max_length=16)
    spec = WorldEncoderSpec(encoder="tiny", window=2, image_size=32)
    cache = precompute_latents(LeRobotDataset.open(ds_path), build_world_encoder(spec, "cpu"), root / "lat.npy",
                               batch_size=64, log=lambda *a: None)
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, dataset=str(ds_path), latents=str(cache.path), out_root=str(root / "runs"),
                              experiment="E2", optim=dataclasses.replace(cfg.optim, steps=4))
    return train(cfg)["run_dir"]


def test_checkpoint_runs_in_libero_with_predicted_memory(libero_checkpoint, tmp_path, capsys):
    args = ["eval", "--env", "libero", "--suite", "libero_spatial", "--tasks", "0", "--episodes", "2",
            "--workers", "1", "--max-steps", "15", "--image-size", "64", "--checkpoint", libero_checkpoint,
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pick up the black bowl" in out and "<ACT_0>" in out  # the printed prompt holds LIBERO's instruction
    eval_root = os.path.join(libero_checkpoint, "eval")  # no --out: the checkpoint's own evaluation folder
    (folder,) = [os.path.join(eval_root, d) for d in os.listdir(eval_root)]
    assert os.path.basename(folder).endswith("__libero_libero_spatial__mem-pred")
    summary = json.loads(open(os.path.join(folder, "summary.json")).read())
    cfg = summary["config"]
    assert (cfg["experiment"], cfg["rollout_memory"], cfg["suite"]) == ("E2", "pred", "libero_spatial")
    assert summary["overall"]["n"] == 2
    recs = read_jsonl(os.path.join(folder, "episodes.jsonl"))
    # an untrained policy does not succeed in 15 steps; what matters is that every step ran without error
    assert [(r["init_index"], r["steps"], r["error"]) for r in recs] == [(0, 15, None), (1, 15, None)]


def test_camera_resolution_other_than_the_latents_is_refused(libero_checkpoint, tmp_path, capsys):
    # LIBERO renders 256 px by default; the latents came from 64 px frames: resizing would change the latents
    args = ["eval", "--env", "libero", "--suite", "libero_spatial", "--tasks", "0", "--episodes", "1",
            "--workers", "1", "--max-steps", "3", "--checkpoint", libero_checkpoint, "--no-progress",
            "--out", str(tmp_path / "e256")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "(256, 256, 3)" in err and "(64, 64, 3)" in err and "render that camera at the dataset's resolution" in err
