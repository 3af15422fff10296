"""vla_core.telemetry without external servers: labels, bounded label values, the metrics the jobs report
(training, evaluation, latents, storage bytes), the HTTP endpoint scraped while a real training runs,
warn-once on failures, and the dashboard querying only metrics the code exports.

The Pushgateway / Prometheus round trips are in tests/test_telemetry_servers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import threading
import urllib.request
import warnings
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vla_core import env_names, telemetry
from vla_core.telemetry import metrics as tm
from vla_core.train.config import get_preset
from vla_core.train.loop import train
from vla_core.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "wmvla" / "dashboards" / "wmvla.json"
METRIC_ENV = (env_names.METRICS_PORT, env_names.METRICS_ADDR, env_names.PUSHGATEWAY_URL, env_names.RUN_ID,
              env_names.CELL, env_names.MICROJOB, env_names.SHARD)


@pytest.fixture(autouse=True)
def clean_metrics_env(monkeypatch):
    """No WMVLA_* metrics variable leaks in from the caller's shell; warnings counted per test."""
    for name in METRIC_ENV:
        monkeypatch.delenv(name, raising=False)
    telemetry.reset_warnings()
    yield
    telemetry.shutdown()  # jobs a failing test left open, and the HTTP endpoint


def tiny_train_cfg(data, out_root, steps: int, log_every: int = 1):
    cfg = get_preset("tiny")
    return dataclasses.replace(cfg, dataset=data["dataset"], latents=data["latents"], out_root=str(out_root),
                               optim=dataclasses.replace(cfg.optim, steps=steps), log_every=log_every,
                               val_every=0, ckpt_every=10_000, mean_baseline_check="off")


def value(name: str, **labels) -> float | None:
    return tm.REGISTRY.get_sample_value(name, labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def telemetry_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, telemetry.TelemetryWarning)]


# -------------------------------------------------------------------------------------------- labels


def test_labels_come_from_the_environment_first(monkeypatch):
    assert telemetry.job_labels("train", cell="E2-mse-s0") == {"run": "local", "cell": "E2-mse-s0",
                                                               "microjob": "train", "shard": "0"}
    assert telemetry.job_labels("latents")["cell"] == "all"
    monkeypatch.setenv(env_names.RUN_ID, "run-7")
    monkeypatch.setenv(env_names.CELL, "E0-flow")
    monkeypatch.setenv(env_names.MICROJOB, "train-cell")
    monkeypatch.setenv(env_names.SHARD, "3")
    assert telemetry.job_labels("train", cell="E2-mse-s0", shard=1) == {"run": "run-7", "cell": "E0-flow",
                                                                        "microjob": "train-cell", "shard": "3"}
    monkeypatch.setenv(env_names.RUN_ID, "x" * 500)  # a label value is never unbounded in length
    assert len(telemetry.job_labels("train")["run"]) == telemetry.MAX_LABEL_CHARS
    assert telemetry.cell_name("E2", "flow", 1) == "E2-flow-s1" and telemetry.cell_name(None, "mse") is None


def test_condition_label_is_bounded():
    cases = {"ckpt-pred": "pred", "E2-mse-shuffle": "shuffle", "E1-flow-zero": "zero", "ckpt-none": "none",
             "E3-mse-oracle": "oracle", "ckpt-random": "random", "scripted-random": "scripted",
             "scripted-expert": "scripted", "expert": "other", "my free text 123": "other", "default": "other"}
    assert {c: telemetry.condition_label(c) for c in cases} == cases
    assert set(cases.values()) <= set(telemetry.CONDITIONS)


# ------------------------------------------------------------------------------------------- updates


def test_job_metrics_and_storage_bytes_carry_the_job_labels():
    job = telemetry.start_job("train", cell="E2-mse-s0")
    labels = dict(job.labels)
    # counters are cumulative per process: an earlier test's job with the same labels may have counted bytes
    bytes_before = value("wmvla_storage_bytes_total", **labels, direction="up") or 0
    job.train_planned(100)
    job.train_record({"step": 10, "loss": 0.5, "action_loss": 0.4, "world_loss": 0.1, "gate": 0.02, "lr": 1e-4,
                      "grad_norm": 1.5, "samples_per_s": 64.0, "epoch": 0.1}, gpu_memory_bytes=2**30)
    telemetry.count_bytes("up", 1000)
    telemetry.count_bytes("up", 24)
    job.close()
    assert value("wmvla_train_step", **labels) == 10 and value("wmvla_train_steps_planned", **labels) == 100
    assert value("wmvla_train_loss", **labels) == 0.5 and value("wmvla_train_gate", **labels) == 0.02
    assert value("wmvla_train_learning_rate", **labels) == 1e-4
    assert value("wmvla_train_gpu_memory_bytes", **labels) == 2**30
    assert value("wmvla_storage_bytes_total", **labels, direction="up") - bytes_before == 1024
    # with no job open, bytes are counted under the environment's labels with microjob "storage"
    telemetry.count_bytes("down", 5)
    assert value("wmvla_storage_bytes_total", **telemetry.job_labels("storage"), direction="down") >= 5
    with pytest.raises(ValueError, match="direction must be one of"):
        telemetry.count_bytes("sideways", 1)
    assert telemetry.count_storage_bytes is telemetry.count_bytes


def test_inactive_job_reports_nothing(monkeypatch):
    monkeypatch.setenv(env_names.RUN_ID, "inactive-rank")
    job = telemetry.start_job("train", active=False)
    job.train_record({"step": 3, "loss": 1.0})
    job.close()
    assert value("wmvla_train_step", **telemetry.job_labels("train")) is None


def test_a_failing_update_warns_once_and_never_raises(monkeypatch):
    monkeypatch.setenv(env_names.RUN_ID, "bad-values")
    job = telemetry.start_job("train")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        job.train_record({"step": 1, "loss": "not a number"})
        job.train_record({"step": 2, "loss": "still not"})
        job.train_validation({})  # missing keys: another failure of the same kind, no second warning
        job.close()
    found = telemetry_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "train_record failed" in str(found[0].message) and "carries on" in str(found[0].message)


def test_eval_engine_reports_episodes_successes_steps_and_latency(monkeypatch, tmp_path):
    """A real MetaWorld rollout in process (the expert, two conditions): per-condition episode and success
    counters, env steps, policy-call latency, under the cell derived from the run's config. The folder
    already holds one recorded episode (a resumed run): it is counted once, not re-run."""
    from vla_core.envs.registry import EnvConfig
    from vla_core.eval.engine import EngineConfig, EpisodeSpec, run_rollouts
    from vla_core.eval.scripted import ExpertPolicy
    from vla_core.utils import append_jsonl

    monkeypatch.setenv(env_names.RUN_ID, "eval-engine-test")
    cfg = EnvConfig(suite="core5", image_size=32, max_steps=60)
    episodes = [EpisodeSpec("reach-v3", 0, c) for c in ("E2-mse-pred", "E2-mse-shuffle")]
    recorded = {"env": cfg.env, "suite": cfg.resolved_suite, "task": "reach-v3", "init_index": 1, "seed": cfg.seed,
                "condition": "E2-mse-pred", "success": False, "steps": 60, "wall_s": 1.0, "error": None,
                "instruction": "", "policy_calls": 12, "video": None}
    append_jsonl(tmp_path / "episodes.jsonl", recorded)
    run_config = {"experiment": "E2", "head": "mse", "seed": 0, "condition": "x"}
    records = run_rollouts(cfg, ExpertPolicy(cfg), episodes + [EpisodeSpec("reach-v3", 1, "E2-mse-pred")], tmp_path,
                           EngineConfig(workers=0, progress=False), run_config=run_config, shard=2)
    assert records[-1] == recorded
    labels = {"run": "eval-engine-test", "cell": "E2-mse-s0", "microjob": "eval", "shard": "2"}
    for condition in ("pred", "shuffle"):
        mine = [r for r in records if r["condition"].endswith(condition)]
        assert value("wmvla_eval_episodes_total", **labels, condition=condition) == len(mine)
        assert value("wmvla_eval_successes_total", **labels, condition=condition) == sum(r["success"] for r in mine)
    assert value("wmvla_eval_successes_total", **labels, condition="pred") == 1  # the expert solves reach
    new = records[:2]  # steps and policy calls: of the episodes this run executed
    assert value("wmvla_eval_env_steps_total", **labels) == sum(r["steps"] for r in new)
    assert value("wmvla_eval_policy_latency_seconds_count", **labels) == sum(r["policy_calls"] for r in new)
    assert value("wmvla_eval_policy_latency_seconds_sum", **labels) > 0


def test_latents_precompute_reports_frames_done(data, monkeypatch, tmp_path):
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    monkeypatch.setenv(env_names.RUN_ID, "latents-test")
    ds = LeRobotDataset.open(data["dataset"])
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), "cpu")
    precompute_latents(ds, enc, tmp_path / "lat.npy", batch_size=16, log=lambda *a: None)
    labels = telemetry.job_labels("latents")
    assert value("wmvla_latents_frames_done", **labels) == value("wmvla_latents_frames_planned", **labels) == ds.num_frames
    assert value("wmvla_latents_clips_per_second", **labels) > 0


# ------------------------------------------------------------------------------------------ HTTP endpoint


def test_http_endpoint_is_scraped_while_training_runs(data, tmp_path, monkeypatch):
    """WMVLA_METRICS_PORT: a scraper thread reads /metrics while `train()` runs in this thread; it must see a
    step strictly between 0 and the last one (mid-run), and the final values after the run."""
    port = free_port()
    monkeypatch.setenv(env_names.METRICS_PORT, str(port))
    monkeypatch.setenv(env_names.METRICS_ADDR, "127.0.0.1")
    monkeypatch.setenv(env_names.RUN_ID, "http-scrape-test")
    steps = 16
    seen: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def scrape_step() -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "wmvla_train_step" and s.labels.get("run") == "http-scrape-test":
                    return s.value
        return None

    def scraper():
        while not stop.is_set():
            try:
                v = scrape_step()
                if v is not None:
                    seen.append(v)
            except OSError as e:  # not listening yet (the job starts the endpoint)
                errors.append(str(e))
            stop.wait(0.02)

    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    cfg = tiny_train_cfg(data, tmp_path / "runs", steps)
    try:
        summary = train(cfg)
    finally:
        stop.set()
        t.join(timeout=10)
    assert summary["finished"] and summary["step"] == steps
    mid_run = [v for v in seen if 0 < v < steps]
    assert mid_run, f"no scrape saw the run in progress: {sorted(set(seen))} (errors: {errors[-3:]})"
    assert scrape_step() == steps  # the final values stay on the endpoint after the job
    last = read_jsonl(Path(summary["run_dir"]) / "train_log.jsonl")[-1]
    cell = telemetry.cell_name(cfg.experiment, cfg.policy.head, cfg.seed)
    assert value("wmvla_train_loss", run="http-scrape-test", cell=cell, microjob="train", shard="0") == last["loss"]


def test_bad_port_warns_once_and_the_job_carries_on(monkeypatch):
    monkeypatch.setenv(env_names.METRICS_PORT, "not-a-port")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            job = telemetry.start_job("train")
            job.train_record({"step": 1, "loss": 0.1})
            job.close()
    found = telemetry_warnings(record)
    assert len(found) == 1 and env_names.METRICS_PORT in str(found[0].message)


# ---------------------------------------------------------------------------------------------- dashboard


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_dashboard_queries_only_metrics_the_code_exports():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    queried = {n for e in exprs for n in re.findall(r"\bwmvla_[a-z0-9_]*[a-z0-9]\b", e)}
    exported = telemetry.exported_names()
    assert queried - exported == set(), f"the dashboard queries metrics nothing exports: {queried - exported}"
    # the metrics the issue asks a dashboard for are all on it
    for name in ("wmvla_train_loss", "wmvla_train_gate", "wmvla_eval_successes_total", "wmvla_eval_episodes_total",
                 "wmvla_train_samples_per_second", "wmvla_eval_env_steps_per_second",
                 "wmvla_latents_clips_per_second", "wmvla_eval_policy_latency_seconds_bucket"):
        assert name in queried, name
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_exported_metric_is_documented():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in telemetry.exported_names()
                if not n.endswith(("_sum", "_count"))}
    missing = sorted(n for n in families if f"`{n}`" not in doc)
    assert not missing, f"docs/metrics.md does not list: {missing}"
