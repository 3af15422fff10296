"""`wmvla demo` with its defaults: the Kubeflow pipeline through kfp.local on the offline MetaWorld benchmark,
results in an embedded SeaweedFS and pulled back; within the 15-minute budget on a 2-core machine, with
every cell's policy solving the easy tasks (slow: `bash scripts/test.sh --slow`). And `wmvla demo --out D`
killed with -9 in training and in evaluation, then run again, ends with an uninterrupted run's results
(a small configuration of the same code path in the default suite)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.mark.slow
def test_demo_defaults_within_budget_and_successful(tmp_path):
    from pipelines.demo import DemoConfig, run_demo_steps

    t0 = time.perf_counter()
    summary = run_demo_steps(DemoConfig(out=tmp_path / "demo"))
    minutes = (time.perf_counter() - t0) / 60
    assert minutes < 15, f"the demo took {minutes:.1f} min"
    pulled = tmp_path / "demo" / "results"
    assert (pulled / "report.md").exists() and (pulled / "_manifest.json").exists()
    on_disk = json.loads((pulled / "summary.json").read_text())
    assert on_disk["verdict"] and on_disk["conditions"] == summary["conditions"]
    conds = summary["conditions"]
    assert set(conds) == {"E0-mse-none", "E2-mse-pred", "E2-mse-zero", "E2-mse-random", "E2-mse-shuffle",
                          "E0-flow-none", "E2-flow-pred", "E2-flow-zero", "E2-flow-random", "E2-flow-shuffle"}
    for name, c in conds.items():
        assert c["n"] == 45 and {"success_rate", "ci95"} <= set(c)
    for name in ("E0-mse-none", "E2-mse-pred", "E0-flow-none", "E2-flow-pred"):  # every cell's own condition
        assert conds[name]["success_rate"] >= 0.3, (name, conds[name]["success_rate"])


# ------------------------------------------------------------------------------- killed and resumed

# the demo's code path in a small configuration: one task, the E2-flow cell (its four evaluation conditions
# give evaluation a middle to be killed in), 30 steps, one episode per condition
SMALL = ["--tasks", "button-press-topdown", "--train-episodes", "2", "--eval-episodes", "1", "--steps", "30",
         "--cells", "E2-flow", "--workers", "1"]
TIMING = {"wall_s", "elapsed_s", "samples_per_s", "train_seconds_this_session"}


def run_results(run: Path, work_run: Path) -> dict:
    """What a run computed, without wall-clock fields: the success counts of every condition, every line of
    every log (training losses, validation, each evaluation episode) of the pulled run `run`, and a hash of
    each cell's final weights from the tasks' work folder `work_run` (checkpoints stay in the store)."""
    from safetensors.numpy import load_file

    from vla_core.utils import read_jsonl

    summary = json.loads((run / "summary.json").read_text())
    out = {"conditions": {k: (c["successes"], c["n"], c["errors"]) for k, c in summary["conditions"].items()}}
    for f in sorted(run.rglob("*.jsonl")):
        out[f.relative_to(run).as_posix()] = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(f)]
    for done in sorted(work_run.glob("*/*/seed*/done.json")):
        step = json.loads(done.read_text())["checkpoint"]
        weights = done.parent / "checkpoints" / step / "model.safetensors"
        tensors = load_file(str(weights))  # the tensors, not the file: its header's key order may differ
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode() + tensors[name].tobytes())
        out[f"{done.parent.relative_to(work_run).as_posix()}/weights"] = h.hexdigest()
    assert len(out) > 1 + 2, f"expected logs and weights of every cell in {run} and {work_run}: {sorted(out)}"
    return out


def start_killable(cmd: list[str], log: Path) -> subprocess.Popen:
    """A command in its own process group (as a terminal runs it), so it and its task subprocesses can be
    killed together with -9 (a killed terminal, a CI timeout)."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, what: str, log: Path, deadline_s: float = 600.0) -> None:
    """SIGKILL proc's whole process group as soon as ready() holds."""
    end = time.monotonic() + deadline_s
    try:
        while not ready():
            assert proc.poll() is None, f"finished before {what}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"no {what} in {deadline_s:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def in_training(work_run: Path) -> bool:
    return any(not (c.parent / "done.json").exists() for c in work_run.glob("*/*/seed*/config.json"))


def after_a_checkpoint(work_run: Path) -> bool:
    """A cell has saved a checkpoint (`checkpoints/latest` names it once it is complete) and still trains."""
    return any(p.read_text().strip() and not (p.parents[1] / "done.json").exists()
               for p in work_run.glob("*/*/seed*/checkpoints/latest"))


def in_evaluation(work_run: Path) -> bool:
    """An evaluate task has recorded an episode (its shard's log, before the merge task's eval/ copy)."""
    return any(f.stat().st_size for f in work_run.glob("*/*/seed*/eval-shards/*/*/shards/*.jsonl"))


def finished_evaluations(work_run: Path) -> int:
    """Evaluation shards (one per cell, condition and shard) that have written their summary."""
    return len(list(work_run.glob("*/*/seed*/eval-shards/*/*/summary.json")))


def demo_cmd(out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vla_core.cli", "demo", "--out", str(out), *args]


def work_run_of(out: Path) -> Path:
    """Where the demo's tasks keep their copy of the run (checkpoints included)."""
    return out / "work" / "store" / "wmvla-demo" / "runs" / "demo"


def killed_twice_then_resumed(out: Path, args: list[str], training) -> None:
    """`wmvla demo --out OUT ARGS` killed with -9 (its process group: the demo and its tasks) once
    training(work_run) holds, run again and killed in the middle of evaluation, then run to the end; every
    kill must leave no SeaweedFS behind."""
    from vla_core.storage.seaweed import PID_FILE, _start_time

    log, work_run = out.parent / f"{out.name}.log", work_run_of(out)
    for when, ready in (("training", training), ("evaluation", in_evaluation)):
        kill_when(start_killable(demo_cmd(out, args), log), lambda: ready(work_run), when, log)
        assert ready(work_run), f"killed, but not in {when}"
        info = json.loads((out / "s3" / PID_FILE).read_text())
        left = {p: _start_time(p) for p in (info["server"], info["keeper"])}
        end = time.monotonic() + 60
        while any(s is not None and _start_time(p) == s for p, s in left.items()):
            assert time.monotonic() < end, f"the demo was killed in {when} but its SeaweedFS {info} still runs"
            time.sleep(0.1)
    assert finished_evaluations(work_run) < 4, "killed after every evaluation had finished"
    done = subprocess.run(demo_cmd(out, args), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow  # ~3 min; the default run keeps `pipeline run --local` killed in evaluation (test_pipeline_local)
def test_demo_killed_in_training_and_in_evaluation_resumes_to_an_uninterrupted_runs_results(tmp_path):
    """`wmvla demo --out D` killed with -9 in the middle of training (before its first checkpoint: the
    demo preset saves every 200 steps; the slow test below kills it after one), run again and killed in the
    middle of evaluation, run again: it completes with exactly the results of an uninterrupted run (losses,
    episodes, success counts, final weights), and no kill leaves a SeaweedFS behind."""
    ref = subprocess.run(demo_cmd(tmp_path / "ref", SMALL), capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    killed_twice_then_resumed(tmp_path / "killed", SMALL, in_training)
    assert run_results(tmp_path / "killed" / "results", work_run_of(tmp_path / "killed")) == run_results(
        tmp_path / "ref" / "results", work_run_of(tmp_path / "ref"))


@pytest.mark.slow
def test_demo_killed_after_a_checkpoint_resumes_from_it_to_an_uninterrupted_runs_results(tmp_path):
    """As above with 240 steps: the kill comes after the cell's step-200 checkpoint (the demo preset saves
    every 200 steps), so the resumed training continues from it, bit for bit (slow: ~2x the small test)."""
    args = [*SMALL[:SMALL.index("--steps")], "--steps", "240", *SMALL[SMALL.index("--steps") + 2:]]
    ref = subprocess.run(demo_cmd(tmp_path / "ref", args), capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    killed_twice_then_resumed(tmp_path / "killed", args, after_a_checkpoint)
    assert "from step_0000200" in (tmp_path / "killed.log").read_text()  # "train: resuming RUN from step_..."
    assert run_results(tmp_path / "killed" / "results", work_run_of(tmp_path / "killed")) == run_results(
        tmp_path / "ref" / "results", work_run_of(tmp_path / "ref"))
