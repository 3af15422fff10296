"""scripts/kind_smoke.sh, the real-backend smoke test for CI (kind + KFP standalone + the chart + an in-cluster
S3 server), cannot run here (no Docker, no Kubernetes API server). What can be checked here is: its steps (dry
run), the files it writes (the chart values render and validate, the S3 server's manifest is valid Kubernetes,
the pipeline compiled from those values passes the backend-rules check), its lint (shellcheck), the pinned KFP
release against the stated minimum, and the smoke arguments it submits, run for real through kfp.local on the
CPU-only compile against a real S3 server, with the results location taken from WMVLA_RESULTS_URI as the
chart's ConfigMap gives it."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kind_smoke.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("kind-smoke")
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--work", str(work), "--registry",
                        "registry.example.com/lab", "--tag", "abc123"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(work)})
    assert r.returncode == 0, r.stderr
    return work, r.stdout


def test_dry_run_lists_the_steps_in_order(dry_run):
    work, out = dry_run
    steps = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    expected = ["kind create cluster", "cluster-scoped-resources?ref=", "crd/applications.app.k8s.io",
                "env/platform-agnostic?ref=", "wait --for=condition=Available", "create secret generic wmvla-s3-config",
                "apply -f", "rollout status deployment/wmvla-s3", "helm install wmvla", "port-forward svc/wmvla-s3",
                "port-forward svc/ml-pipeline", "create_bucket", "pipeline compile --values", "pipeline submit",
                "results pull", "summary.json", "report.md"]
    at = 0
    for want in expected:
        found = next((i for i in range(at, len(steps)) if want in steps[i]), None)
        assert found is not None, f"step {want!r} missing or out of order in:\n" + "\n".join(steps)
        at = found + 1
    compile_step = next(s for s in steps if "pipeline compile" in s)
    assert "--cpu-only" in compile_step and f"{work}/values.yaml" in compile_step
    submit = next(s for s in steps if "pipeline submit" in s)
    for flag in ("--smoke", "--wait", f"--values {work}/values.yaml", "--namespace kubeflow", f"--package {work}/"):
        assert flag in submit, flag
    run_name = re.search(r"run_name=(\S+)", submit).group(1)
    assert f"results pull s3://wmvla-smoke/runs/{run_name} " in out
    # the S3 keys are in files of the work folder (mode 600), never in what the script prints
    values = yaml.safe_load((work / "values.yaml").read_text())
    secret = values["objectStore"]["credentials"]["secretAccessKey"]
    assert len(secret) >= 32 and secret not in out
    assert (work / "values.yaml").stat().st_mode & 0o077 == 0


def test_kfp_release_is_pinned_at_or_above_the_stated_minimum(dry_run):
    from pipelines.conformance import MIN_BACKEND

    _, out = dry_run
    versions = set(re.findall(r"\?ref=(\d+)\.(\d+)\.(\d+)", out))
    assert len(versions) == 1, versions
    (version,) = versions
    assert tuple(int(v) for v in version[:2]) >= MIN_BACKEND


def test_values_render_and_the_pipeline_compiled_from_them_conforms(dry_run, tmp_path):
    import kubernetes_validate

    from components.platform import Platform
    from pipelines.conformance import check
    from vla_core.cli import main

    work, _ = dry_run
    values = work / "values.yaml"
    helm = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    assert helm, "helm is not installed: bash scripts/install_tools.sh"
    r = subprocess.run([helm, "template", "wmvla", str(ROOT / "charts" / "wmvla"), "-n", "kubeflow", "-f",
                        str(values)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # values.schema.json accepts them
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "wmvla-object-store")
    assert config["data"]["WMVLA_RESULTS_URI"] == "s3://wmvla-smoke/runs"
    assert config["data"]["AWS_ENDPOINT_URL"] == "http://wmvla-s3.kubeflow.svc.cluster.local:8333"
    assert not any(d["kind"] == "PodMonitor" for d in docs)  # no prometheus-operator CRDs in kind

    platform = Platform.from_chart_values(yaml.safe_load(values.read_text()))
    assert (platform.registry, platform.tag) == ("registry.example.com/lab", "abc123")
    out = tmp_path / "smoke.yaml"
    assert main(["pipeline", "compile", "--values", str(values), "--cpu-only", "--out", str(out)]) == 0
    assert check(out) == []
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"].values()
    assert all("accelerator" not in e["container"].get("resources", {}) for e in executors)

    for doc in yaml.safe_load_all((work / "s3-server.yaml").read_text()):
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_script_passes_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck is not installed: scripts/setup.sh installs it (apt-get install shellcheck)"
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.slow  # ~1 min: a whole kfp.local run; the default run checks the script's steps and its arguments
def test_smoke_arguments_run_through_kfp_local(tmp_path, s3_env, monkeypatch):
    """What the smoke job submits, run here on the CPU-only compile: results_uri left to the install
    (WMVLA_RESULTS_URI, as the chart's ConfigMap sets it), then pulled from the bucket."""
    from components.platform import DEFAULT
    from pipelines.cli import SMOKE_ARGUMENTS, compile_pipeline, run_local
    from vla_core import env_names
    from vla_core.storage import pull_run

    results = s3_env.create_bucket("kind-smoke-local") + "/runs"
    monkeypatch.setenv(env_names.RESULTS_URI, results)
    package = compile_pipeline(DEFAULT.replace(cpu_only=True), tmp_path / "smoke.yaml")
    run_local({**SMOKE_ARGUMENTS, "run_name": "smoke", "workdir": str(tmp_path / "work")}, tmp_path / "kfp", package)
    pulled = pull_run(f"{results}/smoke", tmp_path / "pulled")
    assert pulled["complete"]
    summary = json.loads((tmp_path / "pulled" / "summary.json").read_text())
    assert set(summary["conditions"]) == {"E0-mse-none"} and summary["run_uri"] == f"{results}/smoke"
    # the report names the run by its URI and the KFP run, not by the pod's local copy
    report = (tmp_path / "pulled" / "report.md").read_text()
    assert report.startswith(f"# wmvla report: `{results}/smoke`") and "KFP run: `" in report
