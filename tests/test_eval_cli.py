"""`wmvla eval`: contract flags, summary.json, resume, bad input."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest

from wmvla.cli import main
from wmvla.eval.cli import EvalConfig, run_eval
from wmvla.utils import WmvlaError, read_jsonl


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
    from wmvla.eval.stats import compare_episode_files

    for name in ("noop", "random"):
        run_eval(EvalConfig(out=tmp_path / name, suite="core5", tasks="reach,push", episodes=3, workers=0,
                            scripted=name, max_steps=4, progress=False))
    out = compare_episode_files(tmp_path / "noop" / "episodes.jsonl", tmp_path / "random" / "episodes.jsonl")
    assert out["mcnemar"]["n_pairs"] == 6 and out["unpaired_a"] == out["unpaired_b"] == 0
