"""`wmvla eval`: contract flags, summary.json, resume, bad input."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest

from vla_core.cli import main
from vla_core.eval.cli import EvalConfig, run_eval
from vla_core.utils import WmvlaError, read_jsonl


def test_eval_writes_episodes_and_summary_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--env", "metaworld", "--suite", "core5", "--tasks", "reach,1", "--episodes", "2",
            "--workers", "0", "--out", str(out), "--scripted", "expert", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 4 and summary["overall"]["success_rate"] == 1.0
    lo, hi = summary["overall"]["ci95"]
    assert 0 < lo < 1 and hi == 1.0
    assert set(summary["per_task"]) == {"reach-v3", "push-v3"}
    cfg = summary["config"]
    assert cfg["tasks"] == ["reach-v3", "push-v3"] and cfg["init_indices"] == [0, 1]
    assert cfg["max_steps_per_task"] == {"reach-v3": 150, "push-v3": 150} and cfg["replan_steps"] == 5
    assert cfg["seeds"] == {"env": 1000, "policy": 0} and cfg["condition"] == "scripted-expert"
    assert cfg["render"]["shadow_map_size"] == 1024 and cfg["render"]["backend"] == "egl"
    assert cfg["policy"] == {"kind": "scripted", "name": "expert", "seed": 0}
    recs = read_jsonl(out / "episodes.jsonl")
    assert len(recs) == 4 and {r["condition"] for r in recs} == {"scripted-expert"}
    # one more episode per task: only the two new ones run; the summary covers all six
    assert args[8] == "2"
    assert main(args[:8] + ["3"] + args[9:]) == 0
    assert len(read_jsonl(out / "episodes.jsonl")) == 6
    assert json.loads((out / "summary.json").read_text())["overall"]["n"] == 6
    assert "reach-v3" in capsys.readouterr().out


def test_noop_scores_zero_and_records_max_steps(tmp_path):
    out = tmp_path / "noop"
    run_eval(EvalConfig(out=out, suite="core5", tasks="push", episodes=2, workers=0, scripted="noop",
                        max_steps=20, progress=False))
    s = json.loads((out / "summary.json").read_text())
    assert s["overall"]["success_rate"] == 0.0 and s["config"]["max_steps_per_task"] == {"push-v3": 20}
    assert all(r["steps"] == 20 for r in read_jsonl(out / "episodes.jsonl"))


def test_bad_input(tmp_path, capsys):
    base = dict(out=tmp_path / "x", suite="core5", workers=0, progress=False)
    with pytest.raises(WmvlaError, match="exactly one policy"):
        run_eval(EvalConfig(**base))
    with pytest.raises(WmvlaError, match="exactly one policy"):
        run_eval(EvalConfig(**base, scripted="noop", checkpoint=tmp_path))
    with pytest.raises(WmvlaError, match="out of range"):
        run_eval(EvalConfig(**base, scripted="noop", episodes=51))
    with pytest.raises(WmvlaError, match="MetaWorld only"):
        run_eval(EvalConfig(out=tmp_path / "y", env="libero", scripted="expert", tasks="0"))
    with pytest.raises(WmvlaError, match="no such folder"):
        run_eval(EvalConfig(**base, checkpoint=tmp_path / "missing"))
    # through the CLI: a clear message listing the valid tasks, exit code 2, no traceback
    assert main(["eval", "--suite", "core5", "--tasks", "reach,nope", "--scripted", "noop", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "unknown metaworld task(s)" in err and "0:reach-v3" in err and "Traceback" not in err


def test_two_conditions_face_the_same_initial_conditions_and_pair_up(tmp_path):
    """E0 vs E2 in miniature: two policies, same flags -> every episode has a partner (same task, init, seed)."""
    from vla_core.eval.stats import compare_episode_files

    for name in ("noop", "random"):
        run_eval(EvalConfig(out=tmp_path / name, suite="core5", tasks="reach,push", episodes=3, workers=0,
                            scripted=name, max_steps=4, progress=False))
    out = compare_episode_files(tmp_path / "noop" / "episodes.jsonl", tmp_path / "random" / "episodes.jsonl")
    assert out["mcnemar"]["n_pairs"] == 6 and out["unpaired_a"] == out["unpaired_b"] == 0


def _random_metaworld_checkpoint(root, experiment: str = "E1", seed: int = 3):
    """A MetaWorld-shaped tiny checkpoint with random weights in the training layout (no training needed)."""
    import dataclasses

    import numpy as np

    from vla_core.data.keys import DatasetKeys
    from vla_core.data.normalize import feature_stats
    from vla_core.policy.config import tiny_policy_config
    from vla_core.policy.modeling import VLAPolicy
    from vla_core.train.checkpoint import save_checkpoint
    from vla_core.train.config import get_preset
    from vla_core.utils import to_jsonable

    keys = DatasetKeys(wrist_image_key=None)
    cfg = dataclasses.replace(get_preset("tiny"), keys=keys, experiment=experiment, seed=seed,
                              policy=tiny_policy_config(state_dim=39, action_dim=4, camera_keys=keys.camera_keys))
    rng = np.random.default_rng(0)
    stats = {"observation.state": feature_stats(rng.normal(size=(256, 39)), "observation.state"),
             "action": feature_stats(rng.uniform(-1, 1, size=(256, 4)), "action", mode="quantile",
                                     passthrough_dims=(3,))}
    policy = VLAPolicy(cfg.policy, stats)
    run = root / experiment / "tiny_m2_delta_mse" / f"seed{seed}"
    return save_checkpoint(run, 2, model=policy, config=to_jsonable(cfg), stats=stats, tokenizer=policy.tokenizer,
                           world={"spec": None, "latents": None, "uses_memory": True})


def test_checkpoint_eval_defaults_to_its_eval_folder_and_records_the_run(tmp_path, capsys):
    """Without --out a checkpoint evaluation goes where `wmvla matrix` puts it, and summary.json's config
    has experiment / head / seed / rollout_memory / checkpoint at the top level (the report reads them)."""
    from vla_core.eval.checkpoint_policy import eval_dir_for
    from vla_core.experiments.report import load_eval_runs

    ckpt = _random_metaworld_checkpoint(tmp_path / "runs")
    run = ckpt.parent.parent
    args = ["eval", "--env", "metaworld", "--suite", "core5", "--tasks", "reach", "--episodes", "2", "--workers", "0",
            "--max-steps", "5", "--image-size", "32", "--device", "cpu", "--no-progress", "--checkpoint", str(run)]
    assert main(args) == 0
    out = eval_dir_for(run, "metaworld", "core5", "zero")  # E1's own rollout memory
    assert out == run / "eval" / "step_0000002__metaworld_core5__mem-zero"
    assert "writing to" in capsys.readouterr().out
    cfg = json.loads((out / "summary.json").read_text())["config"]
    assert {k: cfg[k] for k in ("experiment", "head", "seed", "rollout_memory")} == {
        "experiment": "E1", "head": "mse", "seed": 3, "rollout_memory": "zero"}
    assert cfg["checkpoint"] == str(ckpt.resolve()) == cfg["policy"]["checkpoint"]
    assert len(read_jsonl(out / "episodes.jsonl")) == 2
    # the report takes them from the config (the same evaluation copied outside the E/tag/seed layout)
    import shutil

    elsewhere = tmp_path / "flat" / "some_eval"
    shutil.copytree(out, elsewhere)
    runs, _, refs = load_eval_runs(tmp_path / "flat")
    assert not refs and [(r.experiment, r.head, r.seed, r.rollout_memory) for r in runs] == [("E1", "mse", 3, "zero")]
    # --scripted still needs --out
    with pytest.raises(WmvlaError, match="--out DIR is required with --scripted"):
        run_eval(EvalConfig(suite="core5", workers=0, scripted="noop", progress=False))


def test_eval_resumes_after_sigkill(tmp_path):
    """`wmvla eval` killed mid-run (SIGKILL to its whole process group, env workers included), then re-run
    with the same flags: every episode is recorded exactly once, with the same outcomes as an uninterrupted
    run (the expert and the seeded resets are deterministic)."""
    import signal
    import subprocess
    import sys
    import time

    def cmd(out):
        return [sys.executable, "-m", "vla_core.cli", "eval", "--env", "metaworld", "--suite", "core5", "--tasks",
                "reach", "--episodes", "8", "--workers", "1", "--scripted", "expert", "--no-progress",
                "--out", str(out)]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    episodes = killed / "episodes.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if episodes.exists() and len(read_jsonl(episodes)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"eval ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_jsonl(episodes))
    assert 2 <= done_before < 8 and not (killed / "summary.json").exists()

    subprocess.run(cmd(killed), env=env, check=True, capture_output=True)
    full = tmp_path / "full"
    subprocess.run(cmd(full), env=env, check=True, capture_output=True)

    def outcomes(folder):
        recs = read_jsonl(folder / "episodes.jsonl")
        keys = [(r["task"], r["init_index"]) for r in recs]
        assert len(keys) == len(set(keys)) == 8, keys
        return {(r["task"], r["init_index"]): (r["success"], r["steps"]) for r in recs}

    assert outcomes(killed) == outcomes(full)
    assert json.loads((killed / "summary.json").read_text())["overall"] == \
        json.loads((full / "summary.json").read_text())["overall"]
