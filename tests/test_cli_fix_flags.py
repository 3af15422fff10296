"""Every fix an error message (or help text) names must be reachable from the command line.

- A dataset whose gripper action is not in [-1, 1]: `wmvla train` refuses it with a message naming a flag;
  that very flag (taken from the message) trains it, the config-file form of it parses, and `wmvla matrix`
  passes it into every cell.
- Every `--flag` written in a string of vla_core (errors, hints, help) parses for the command that module
  belongs to (`wmvla CMD ... --flag [VALUE] --print-config json`), so a message cannot name a flag that does
  not exist. A new module or a flag of another program must be added to the tables below.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

from vla_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------- every flag a message names

# The commands a module's messages speak about; a flag found in the module must parse for at least one.
MODULE_COMMANDS = {
    "cli.py": ("pipeline compile", "pipeline run"),  # the command table's help lines
    "data/inspect.py": ("data inspect",),
    "data/keys.py": ("train", "data inspect"),
    "data/normalize.py": ("train", "matrix"),
    "envs/generate.py": ("data generate",),
    "envs/registry.py": ("eval",),
    "eval/": ("eval",),
    "experiments/eval_shards.py": ("eval",),  # a shard is `wmvla eval --num-shards N --shard-index I`
    "experiments/cells.py": ("pipeline compile",),  # the plan step names how to compile for more GPUs
    "experiments/demo.py": ("demo",),
    "experiments/matrix.py": ("matrix", "train"),  # (its help points at `wmvla train --preset NAME --help`)
    "experiments/report.py": ("report",),
    "policy/vision_cache.py": ("vision-cache", "train"),
    "policy/": ("train", "eval"),
    "storage/": ("results push", "results list", "results pull"),
    "train/vision_cache.py": ("vision-cache",),
    "train/": ("train",),
    "world/cache.py": ("latents",),
    "world/encoder.py": ("latents", "train"),
    "world/prophet_train.py": ("prophet train",),
}
# Flags of other programs quoted in messages (torchrun, accelerate, hf, pip) and the generic options cli.py
# handles before tyro (tests/test_cli.py covers those).
# vla_core/keeper.py's own command line (`python -m vla_core.keeper`, started by Kept, never by a user) and
# benchmarks/bench_storage.py's --latency-ms (named in netproxy's docstring) too.
OTHER_PROGRAMS = {"--nproc_per_node", "--num_processes", "--standalone", "--repo-type", "--local-dir", "--no-deps",
                  "--control", "--grace", "--owner", "--status", "--latency-ms"}
GENERIC = {"--help", "--config", "--preset", "--print-config", "--flag"}
# Required positional arguments, so that --print-config can run.
POSITIONAL = {"data inspect": ["DS"], "data generate": ["metaworld", "--out", "DS"], "latents": ["DS"], "prophet train": ["CACHE"],
              "report": ["RUN_ROOT"], "results push": ["DIR", "s3://b/p"], "results pull": ["s3://b/p", "DIR"]}
# A value for flags that are neither booleans / sequences (parse alone) nor take a number or a path ("1").
VALUES = {"--distributed": "fsdp", "--env": "metaworld", "--experiment": "E2", "--policy.head": "flow",
          "--precision": "fp32", "--scripted": "expert", "--keys.wrist-image-key": "None", "--encoder": "tiny",
          "--policy.frozen-dtype": "float32", "--rollout-memory": "pred", "--policy.finetune": "lora",
          "--memory-plan": "off", "--optim.adam-state-dtype": "bfloat16", "--optim.ema-dtype": "bfloat16"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9]")


def _flags_in_strings(path: Path) -> set[str]:
    flags: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            flags |= set(FLAG.findall(node.value))
    return flags


def _parses(command: str, flag: str) -> bool:
    base = [*command.split(), *POSITIONAL.get(command, [])]
    tries = [[flag, VALUES[flag]]] if flag in VALUES else [[flag], [flag, "1"]]
    for extra in tries:
        try:
            if main([*base, *extra, "--print-config", "json"]) == 0:
                return True
        except SystemExit:  # tyro: unknown flag or a value it cannot parse
            pass
    return False


def test_every_flag_named_in_vla_core_parses_for_its_command(capsys):
    missing_modules, unknown = [], []
    checked = 0
    for path in sorted((ROOT / "vla_core").rglob("*.py")):
        rel = path.relative_to(ROOT / "vla_core").as_posix()
        flags = _flags_in_strings(path) - OTHER_PROGRAMS - GENERIC
        if not flags:
            continue
        commands = next((c for prefix, c in MODULE_COMMANDS.items() if rel == prefix or
                         (prefix.endswith("/") and rel.startswith(prefix))), None)
        if commands is None:
            missing_modules.append(f"{rel}: {sorted(flags)}")
            continue
        for flag in sorted(flags):
            checked += 1
            if not any(_parses(c, flag) for c in commands):
                unknown.append(f"{rel}: {flag} (wmvla {' / '.join(commands)})")
        capsys.readouterr()
    assert not missing_modules, f"add these modules to MODULE_COMMANDS: {missing_modules}"
    assert not unknown, "messages name flags that do not exist:\n" + "\n".join(unknown)
    assert checked > 60  # the scan found the messages (not vacuous)
