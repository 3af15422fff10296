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

from vla_core.cli import main
from vla_core.utils import read_jsonl

pytestmark = pytest.mark.libero


@pytest.fixture(scope="module")
def libero_checkpoint(data, tmp_path_factory):
    """An E2 checkpoint trained briefly on the session's LIBERO-schema dataset (32 px, tests/conftest.py)."""
    from vla_core.train.config import get_preset
    from vla_core.train.loop import train

    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, dataset=data["dataset"], latents=data["latents"],
                              out_root=str(tmp_path_factory.mktemp("libero_ckpt") / "runs"), experiment="E2",
                              optim=dataclasses.replace(cfg.optim, steps=4))
    return train(cfg)["run_dir"]


def test_checkpoint_runs_in_libero_with_predicted_memory(libero_checkpoint, tmp_path, capsys):
    args = ["eval", "--env", "libero", "--suite", "libero_spatial", "--tasks", "0", "--episodes", "2",
            "--workers", "1", "--max-steps", "15", "--image-size", "32", "--checkpoint", libero_checkpoint,
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
    # LIBERO renders 256 px by default; the latents came from 32 px frames: resizing would change the latents
    args = ["eval", "--env", "libero", "--suite", "libero_spatial", "--tasks", "0", "--episodes", "1",
            "--workers", "1", "--max-steps", "3", "--checkpoint", libero_checkpoint, "--no-progress",
            "--out", str(tmp_path / "e256")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "(256, 256, 3)" in err and "(32, 32, 3)" in err and "render that camera at the dataset's resolution" in err
