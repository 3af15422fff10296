"""The matrix pipeline run for real through kfp.local (tiny settings, a real S3 server on loopback), also as
`wmvla pipeline run --local` killed with -9 in evaluation and run again (the same results), and a
train microjob killed mid-run that resumes from the bucket on a fresh "pod" (an empty work folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


os.environ.setdefault("MUJOCO_GL", "egl")


ARGS = dict(dataset="metaworld", preset="demo", cells=["E0-mse", "E2-flow"], seeds=[0], steps=12, batch_size=8,
            eval_env="", eval_suite="", episodes=1, workers=1, ablations=["zero"],
            metaworld_tasks="button-press-topdown", metaworld_episodes=2, device="cpu")


def test_local_pipeline_end_to_end(tmp_path, s3_env):
    """Data generation -> latents -> two cells (E0-mse, E2-flow with the zero-memory ablation) -> report,
    every task a kfp.local subprocess; the run is then pulled from the bucket as a researcher would.
    Then the same run as `wmvla pipeline run --local` with the same results store, killed with -9 in the middle
    of evaluation, and run again: it ends with the same results (losses, episodes, final weights)."""
    from pipelines.cli import run_local
    from vla_core.storage import open_store, pull_run

    results = s3_env.create_bucket("pipeline-local") + "/runs"
    run_local(dict(ARGS, results_uri=results, run_name="tiny", workdir=str(tmp_path / "work")), tmp_path / "kfp")

    pulled = pull_run(f"{results}/tiny", tmp_path / "pulled")
    assert pulled["complete"]
    summary = json.loads((tmp_path / "pulled" / "summary.json").read_text())
    assert set(summary["conditions"]) == {"E0-mse-none", "E2-flow-pred", "E2-flow-zero"}
    assert all(c["n"] == 1 for c in summary["conditions"].values())
    # the published run carries the report and the evaluations, not the checkpoints (those stay in the
    # cells' folders of the same prefix, where a retried pod finds them)
    assert (tmp_path / "pulled" / "report.md").is_file()
    assert not any("checkpoints" in p.parts for p in (tmp_path / "pulled").rglob("*"))
    keys = [o.key for o in open_store(f"{results}/tiny").list()]
    assert any("/checkpoints/" in k for k in keys) and any(k.startswith("E2/") and "/eval/" in k for k in keys)
    assert any(o.key.startswith("dataset-metaworld-") for o in open_store(f"{results}/cache").list())

    # what the KFP UI shows: HTML with the plots inline, per-condition success rates as Metrics
    (html,) = (tmp_path / "kfp").glob("*/report/html")
    assert "data:image/png;base64," in html.read_text() and "<table>" in html.read_text()
    (md,) = (tmp_path / "kfp").glob("*/report/markdown")
    assert "](data:image/png;base64," in md.read_text()
    out = json.loads(next((tmp_path / "kfp").glob("*/report/executor_output.json")).read_text())
    metrics = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert set(metrics) == {"success/E0-mse-none", "success/E2-flow-pred", "success/E2-flow-zero"}

    # killed and resumed: the command a user types, in its own process group (killed with its tasks)
    from test_experiments_demo import finished_evaluations, in_evaluation, kill_when, run_results, start_killable

    cmd = [sys.executable, "-m", "vla_core.cli", "pipeline", "run", "--local",
           "--pipeline-root", str(tmp_path / "kfp2"),
           *(f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in ARGS.items()),
           f"results_uri={results}", "run_name=tiny-killed", f"workdir={tmp_path / 'work2'}"]
    work_run = tmp_path / "work2" / "store" / "pipeline-local" / "runs" / "tiny-killed"
    log = tmp_path / "killed.log"
    # in evaluation (a kill in training: the demo's test, and the train task's test below)
    kill_when(start_killable(cmd, log), lambda: in_evaluation(work_run), "evaluation", log)
    assert finished_evaluations(work_run) < 3, "killed after every evaluation had finished"
    again = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    pull_run(f"{results}/tiny-killed", tmp_path / "pulled-killed")
    assert run_results(tmp_path / "pulled-killed", work_run) == run_results(
        tmp_path / "pulled", tmp_path / "work" / "store" / "pipeline-local" / "runs" / "tiny")


def _train_in_subprocess(item: dict, dataset: str, latents: str, workdir: Path, log: Path) -> subprocess.Popen:
    code = ("import json, sys; from vla_core.experiments import cells; "
            "cells.train_cell(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], gpus=0)")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(item), dataset, latents, str(workdir)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_train_task_resumes_from_the_bucket(tmp_path, s3_env, data, capsys):
    """The train microjob is SIGKILLed after its first checkpoint reached the bucket; the retry runs on a new
    pod (empty work folder) and continues from that checkpoint instead of step 0."""
    from vla_core.experiments import cells
    from vla_core.storage import open_store

    bucket = s3_env.create_bucket("pipeline-resume")  # s3://pipeline-resume
    settings = cells.matrix_settings("tiny", steps=30)
    (item,) = cells.plan(settings, ["E0-mse"], [0], f"{bucket}/runs/r")
    _, _, uri = cells.cell_paths(settings, cells._unpack(item)[0], item["run"], str(tmp_path / "pod1"))
    store = open_store(uri)
    proc = _train_in_subprocess(item, data["dataset"], data["latents"], tmp_path / "pod1", tmp_path / "pod1.log")
    deadline = time.monotonic() + 240
    try:
        while not any(o.key.endswith("/_manifest.json") and o.key.startswith("checkpoints/step_")
                      for o in store.list("checkpoints/")):
            assert proc.poll() is None, f"training ended before a checkpoint was uploaded:\n{(tmp_path / 'pod1.log').read_text()}"
            assert time.monotonic() < deadline, "no checkpoint reached the bucket in 240 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not store.exists("done.json"), "the run finished before it was killed; raise steps"
    uploaded = sorted({o.key.split("/")[1] for o in store.list("checkpoints/") if o.key.endswith("_manifest.json")})

    done = cells.train_cell(item, data["dataset"], data["latents"], str(tmp_path / "pod2"), gpus=0)
    said = capsys.readouterr().out
    assert "resuming" in said and uploaded[-1] in said, said[-2000:]
    assert done["step"] == 30 and done["uri"] == uri and store.exists("done.json")
    steps = [json.loads(line)["step"] for line in store.get_bytes("train_log.jsonl").decode().splitlines()]
    assert steps == sorted(set(steps)), "a step was trained twice"


def test_label_job_names_the_run_and_cell_for_the_metrics(monkeypatch):
    """A pod's metrics carry the KFP run (the run folder's name) and the cell, unless the environment says so."""
    from vla_core import env_names, telemetry
    from vla_core.experiments import cells

    monkeypatch.delenv(env_names.RUN_ID, raising=False)
    monkeypatch.delenv(env_names.CELL, raising=False)
    item = {"experiment": "E2", "head": "flow", "seed": 1.0, "settings": {}, "run": "s3://bucket/runs/matrix-7/"}
    cells.label_job(item)
    labels = telemetry.job_labels("train")
    assert (labels["run"], labels["cell"]) == ("matrix-7", "E2-flow-s1")
    monkeypatch.setenv(env_names.RUN_ID, "given")
    cells.label_job(item)
    assert telemetry.job_labels("train")["run"] == "given"
