"""vla_core.telemetry against real servers on loopback: Debian's prometheus-pushgateway and prometheus
(installed by scripts/setup.sh). Prometheus scrapes the Pushgateway every second with honor_labels: true,
as the chart's Prometheus does.

- a tiny training run pushes; Prometheus's HTTP API then finds its step count and loss;
- two jobs of one process push to separate groups (run / cell / microjob / shard), each with only its series;
- an unreachable Pushgateway gives exactly one warning, and the training finishes;
- every query of the Grafana dashboard parses and runs on this Prometheus.

Every wait polls with a deadline (the machine may be loaded); nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest

from vla_core import env_names, telemetry
from vla_core.keeper import Kept
from vla_core.telemetry import exposure
from vla_core.utils import read_jsonl

# clean_metrics_env: the same autouse fixture as test_telemetry.py's (imported, so pytest applies it here too)
from test_telemetry import (clean_metrics_env, dashboard_exprs, free_port, telemetry_warnings,  # noqa: F401
                            tiny_train_cfg)

DEADLINE_S = 40.0


def wait_until(fn, what: str, deadline_s: float = DEADLINE_S, every_s: float = 0.1):
    """Poll `fn` until it returns something truthy; fail with `what` after the deadline."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            got = fn()
            if got:
                return got
        except OSError as e:  # not up yet
            last = e
        time.sleep(every_s)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what} (last error: {last})")


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def start_server(args: list[str], url: str, log: Path) -> Kept:
    """Started under a keeper (vla_core.keeper): it ends with this pytest process, even one killed with -9."""
    binary = shutil.which(args[0])
    if binary is None:
        pytest.fail(f"{args[0]} is not installed: scripts/setup.sh installs Debian's prometheus and "
                    "prometheus-pushgateway (apt-get install prometheus prometheus-pushgateway)")
    with open(log, "wb") as out:
        proc = Kept([binary, *args[1:]], log=out)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"{args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        return http_get(f"{url}/-/ready", timeout=2) is not None

    try:
        wait_until(ready, f"{args[0]} at {url}")
    except BaseException:
        proc.stop()
        raise
    return proc


def stop_server(proc: Kept) -> None:
    proc.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Pushgateway and a Prometheus that scrapes it every second; both on free loopback ports."""
    root = tmp_path_factory.mktemp("metrics_servers")
    pg_port, prom_port = free_port(), free_port()
    pg_url = f"http://127.0.0.1:{pg_port}"
    pg = start_server(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{pg_port}",
                       f"--persistence.file={root / 'pushgateway.db'}"], pg_url, root / "pushgateway.log")
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: pushgateway\n    honor_labels: true\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{pg_port}']\n")
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        prom = start_server(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], prom_url, root / "prometheus.log")
    except BaseException:
        stop_server(pg)
        raise
    yield {"pushgateway": pg_url, "prometheus": prom_url}
    stop_server(prom)
    stop_server(pg)



def prom_query(prom_url: str, expr: str) -> list[dict]:
    try:
        body = json.loads(http_get(f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    except urllib.error.HTTPError as e:  # 400: the expression does not parse (not retried by wait_until)
        raise AssertionError(f"Prometheus refused {expr!r}: {e.read().decode()[:500]}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_training_pushes_and_prometheus_finds_step_and_loss(servers, data, tmp_path, monkeypatch):
    from vla_core.train.loop import train

    monkeypatch.setenv(env_names.PUSHGATEWAY_URL, servers["pushgateway"])
    monkeypatch.setenv(env_names.RUN_ID, "push-train-test")
    monkeypatch.setattr(telemetry, "PUSH_INTERVAL_S", 0.2)  # the periodic pushes, not only the final one
    pushes_before = exposure.push_counts["attempts"]
    cfg = tiny_train_cfg(data, tmp_path, steps=6, log_every=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = train(cfg)
    assert summary["finished"] and not telemetry_warnings(record)
    assert exposure.push_counts["attempts"] > pushes_before
    last = read_jsonl(Path(summary["run_dir"]) / "train_log.jsonl")[-1]
    cell = telemetry.cell_name(cfg.experiment, cfg.policy.head, cfg.seed)
    sel = f'{{run="push-train-test", cell="{cell}", microjob="train"}}'

    def step_is_final():
        result = prom_query(servers["prometheus"], f"wmvla_train_step{sel}")
        return result if result and float(result[0]["value"][1]) == 6 else None

    (step,) = wait_until(step_is_final, "Prometheus to scrape the pushed final step")
    assert step["metric"]["job"] == exposure.PUSH_JOB and step["metric"]["shard"] == "0"  # honor_labels kept ours
    (loss,) = prom_query(servers["prometheus"], f"wmvla_train_loss{sel}")
    assert float(loss["value"][1]) == last["loss"]  # Prometheus returns the float64 exactly
    (planned,) = prom_query(servers["prometheus"], f"wmvla_train_steps_planned{sel}")
    assert float(planned["value"][1]) == 6


def test_two_jobs_of_one_process_push_separate_groups(servers, monkeypatch):
    monkeypatch.setenv(env_names.PUSHGATEWAY_URL, servers["pushgateway"])
    monkeypatch.setenv(env_names.RUN_ID, "two-jobs-test")
    train_job = telemetry.start_job("train", cell="E0-mse-s0")
    eval_job = telemetry.start_job("eval", cell="E0-mse-s0")
    train_job.train_record({"step": 5, "loss": 0.25})
    eval_job.eval_episode("ckpt-zero", True)
    eval_job.close()
    train_job.close()
    groups = json.loads(http_get(f"{servers['pushgateway']}/api/v1/metrics"))["data"]
    mine = {g["labels"]["microjob"]: g for g in groups if g["labels"].get("run") == "two-jobs-test"}
    assert set(mine) == {"train", "eval"}
    assert mine["train"]["labels"] == {"job": "wmvla", "run": "two-jobs-test", "cell": "E0-mse-s0",
                                       "microjob": "train", "shard": "0"}
    assert "wmvla_train_step" in mine["train"] and "wmvla_eval_episodes_total" not in mine["train"]
    assert "wmvla_eval_episodes_total" in mine["eval"] and "wmvla_train_step" not in mine["eval"]
    sel = '{run="two-jobs-test", condition="zero"}'
    result = wait_until(lambda: prom_query(servers["prometheus"], f"wmvla_eval_successes_total{sel}"),
                        "Prometheus to scrape the eval group")
    assert float(result[0]["value"][1]) == 1


def test_unreachable_pushgateway_warns_once_and_training_finishes(data, tmp_path, monkeypatch):
    from vla_core.train.loop import train

    port = free_port()  # nothing listens there: every push is refused
    monkeypatch.setenv(env_names.PUSHGATEWAY_URL, f"http://wmvla:s3cret@127.0.0.1:{port}")
    monkeypatch.setattr(telemetry, "PUSH_INTERVAL_S", 0.05)
    failures_before = exposure.push_counts["failures"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = train(tiny_train_cfg(data, tmp_path, steps=4, log_every=2))
    assert summary["finished"] and summary["step"] == 4
    assert exposure.push_counts["failures"] - failures_before >= 2  # periodic pushes and the final one
    found = telemetry_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert f"127.0.0.1:{port}" in message and "s3cret" not in message and "carries on" in message


def test_every_dashboard_query_runs_on_prometheus(servers):
    """The dashboard's expressions (with Grafana's variables filled in) parse and evaluate on Prometheus 2.42."""
    fill = {"$run": ".*", "$cell": ".*", "$__rate_interval": "1m"}
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):  # Grafana's own function; its selector must still be valid PromQL
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        for k, v in fill.items():
            expr = expr.replace(k, v)
        prom_query(servers["prometheus"], expr)  # asserts status "success" (a parse error is a 400)


def test_a_finished_run_leaves_the_pushgateway(servers, monkeypatch):
    """When a run's report is written its groups are deleted (else a finished run's last values are scraped as
    current forever); another run's groups stay. An unreachable gateway warns and never fails the step."""
    monkeypatch.setenv(env_names.PUSHGATEWAY_URL, servers["pushgateway"])

    def groups(run):
        listed = json.loads(http_get(f"{servers['pushgateway']}/api/v1/metrics"))["data"]
        return sorted(g["labels"]["microjob"] for g in listed if g["labels"].get("run") == run)

    for run, microjobs in (("ended-run", ("train", "eval")), ("other-run", ("train",))):
        monkeypatch.setenv(env_names.RUN_ID, run)
        for microjob in microjobs:
            job = telemetry.start_job(microjob, cell="E2-flow-s0")
            job.train_record({"step": 1, "loss": 0.5})
            job.close()
    assert groups("ended-run") == ["eval", "train"]
    assert telemetry.end_run("ended-run") == 2
    assert groups("ended-run") == [] and groups("other-run") == ["train"]

    monkeypatch.setenv(env_names.PUSHGATEWAY_URL, f"http://user:hunter2@127.0.0.1:{free_port()}")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert telemetry.end_run("other-run") == 0
    (warning,) = telemetry_warnings(record)
    assert "deleting run 'other-run'" in str(warning.message) and "hunter2" not in str(warning.message)
