"""Every fix an error message (or help text) names must be reachable from the command line.

- A dataset whose gripper action is not in [-1, 1]: `wmvla train` refuses it with a message naming a flag;
  that very flag (taken from the message) trains it, the config-file form of it parses, and `wmvla matrix`
  passes it into every cell.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vla_core.cli import main


# ------------------------------------------------------------------ gripper outside [-1, 1] (issue 11.5)


@pytest.fixture(scope="module")
def gripper_255(tmp_path_factory):
    """A LIBERO-schema dataset (4 short episodes, 16 px) whose gripper command is 0 / 255, not -1 / +1."""
    from vla_core.data.fixtures import LIBERO_FPS, LIBERO_TASKS, episode_lengths, libero_features, libero_like_episode
    from vla_core.data.writer import LeRobotV3Writer

    path = tmp_path_factory.mktemp("gripper") / "ds"
    rng = np.random.default_rng(0)
    with LeRobotV3Writer(path, LIBERO_FPS, libero_features(16), robot_type="panda", image_storage="png") as w:
        for e, n in enumerate(episode_lengths(4, 0, 8, 12)):
            frames = libero_like_episode(e, n, 16, rng)
            frames["action"][:, -1] = np.where(frames["action"][:, -1] > 0, 255.0, 0.0)
            w.add_episode(LIBERO_TASKS[e % 2], frames)
    return path


def test_gripper_outside_unit_range_trains_with_the_flag_the_error_names(gripper_255, tmp_path, capsys):
    from vla_core.data.normalize import load_stats

    # E0: no latent cache needed; one step is enough to show the run starts and saves its statistics
    args = ["train", "--preset", "tiny", "--experiment", "E0", "--dataset", str(gripper_255), "--optim.steps", "1",
            "--val-every", "0", "--mean-baseline-check", "off", "--out-root", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dim 6 is passed through unnormalised" in err and "[0, 255]" in err, err
    flag = re.search(r"`wmvla train (--[\w.-]+)`", err)
    assert flag and flag.group(1) == "--norm.passthrough-dims", err

    assert main(args + [flag.group(1)]) == 0  # the flag as the message names it, with no value
    stats = load_stats(tmp_path / "runs" / "E0" / "tiny_m2_delta_mse" / "seed0" / "checkpoints" / "step_0000001"
                       / "norm_stats.json")["action"]
    assert stats.passthrough_dims == () and stats.max[6] == 255  # every dim normalised, the gripper included

    # the config file: the field the message names, in the file `--config` reads (and --print-config writes)
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("norm:\n  passthrough_dims: []\n")
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_file), "--print-config", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["norm"] == {"action_mode": "quantile", "passthrough_dims": []}
    assert main(["train", "--preset", "tiny", "--norm.passthrough-dims", "3", "-1", "--print-config", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["norm"]["passthrough_dims"] == [3, -1]


def test_passthrough_dims_negative_and_out_of_range(gripper_255):
    from vla_core.data.keys import DatasetKeys
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.data.normalize import compute_stats
    from vla_core.utils import WmvlaError

    ds = LeRobotDataset.open(gripper_255)
    ok = compute_stats(ds, DatasetKeys(), passthrough_dims=(0, -2))["action"]  # dims 0 and 5 are in [-1, 1]
    assert ok.passthrough_dims == (0, 5)
    with pytest.raises(WmvlaError, match=r"passthrough dims \[7\] do not exist.*--norm.passthrough-dims"):
        compute_stats(ds, DatasetKeys(), passthrough_dims=(7,))


def test_matrix_passes_the_passthrough_dims_into_every_cell(capsys):
    from vla_core.experiments.matrix import MatrixConfig, base_train_config, cell_config

    assert main(["matrix", "--norm-passthrough-dims", "--print-config", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["norm_passthrough_dims"] == []
    cell = cell_config(base_train_config(MatrixConfig(preset="tiny", norm_passthrough_dims=())), "E2", "mse", 1)
    assert cell.norm.passthrough_dims == ()
    assert cell_config(base_train_config(MatrixConfig(preset="tiny")), "E0", "mse", 0).norm.passthrough_dims == (-1,)
