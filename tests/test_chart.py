"""charts/wmvla: helm lint, helm template with the default values and the two example values files, every
rendered object validated offline (kubernetes-validate --strict for Kubernetes 1.29 and 1.33; the
PodMonitor against prometheus-operator's own CRD models), the schema refusing bad values, no secret in a
ConfigMap, and every name the pipeline uses equal to components/platform.py's (defaults, and a custom
values file mapped with Platform.from_chart_values).

Nothing here talks to a cluster: there is no Kubernetes API server on these machines (docs/chart.md).
helm comes from scripts/install_tools.sh (run by scripts/setup.sh).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.platform import IMAGE_UID, WORKDIR, Platform
from pods import as_image_user
from vla_core.experiments.preflight import MODEL_CACHE_MARKER
from vla_core import env_names

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "wmvla"
EXAMPLES = {"aws-s3-irsa": CHART / "examples" / "aws-s3-irsa.yaml",
            "onprem-seaweedfs": CHART / "examples" / "onprem-seaweedfs.yaml"}
CASES = ["default", *EXAMPLES]
K8S_VERSIONS = ["1.29", "1.33"]
NAMESPACE = "wmvla-test"
# Objects validated against something other than Kubernetes' own schemas (kubernetes-validate has none
# for custom resources): the PodMonitor goes through prometheus-operator's CRD models instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
# a cluster with prometheus-operator: the PodMonitor (enabled: auto) renders only where its API is served
WITH_CRD = ["--api-versions", "monitoring.coreos.com/v1/PodMonitor"]


@functools.cache
def helm() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    if not found:
        pytest.fail("helm not found next to the venv's python or on PATH: run `bash scripts/install_tools.sh`")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


def case_args(case: str) -> list[str]:
    return [] if case == "default" else ["-f", str(EXAMPLES[case])]


@functools.cache
def _render(args: tuple[str, ...]) -> tuple[str, str, int]:
    r = run_helm("template", "wmvla", str(CHART), "-n", NAMESPACE, *args)
    return r.stdout, r.stderr, r.returncode


def render(*args: str) -> list[dict]:
    out, err, rc = _render(tuple(args))
    assert rc == 0, f"helm template {' '.join(args)} failed:\n{err}"
    return [d for d in yaml.safe_load_all(out) if d]


def render_fails(*args: str) -> str:
    _, err, rc = _render(tuple(args))
    assert rc != 0, f"helm template {' '.join(args)} should have been refused"
    return err


def case_values(case: str) -> dict:
    return {} if case == "default" else yaml.safe_load(EXAMPLES[case].read_text())


def one(docs: list[dict], kind: str, pred=lambda d: True) -> dict:
    found = [d for d in docs if d["kind"] == kind and pred(d)]
    assert len(found) == 1, f"expected one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


# what makes every named object of a case render, keeping the case's names (existing secret / claim /
# priority class become created ones), so the names can be read off the rendered objects
CREATE_ALL = ["--set", "objectStore.credentials.source=create",
              "--set", "objectStore.credentials.accessKeyId=AKIAEXAMPLESENTINEL",
              "--set", "objectStore.credentials.secretAccessKey=sentinel-store-secret-0123456789",
              "--set", "huggingface.token.value=hf_sentinel_token_0123456789",
              "--set", "modelCache.create=true", "--set", "priorityClass.create=true",
              "--set", "serviceAccount.create=true",
              # the pods' PodMonitor (it spells the part-of and microjob labels) needs its API and no Pushgateway
              *WITH_CRD, "--set", "metrics.pushgateway.enabled=false", "--set", "metrics.pushgatewayUrl="]


def create_all(case: str) -> list[str]:
    """CREATE_ALL, plus a created HF token secret unless the case has none (source: none stays none)."""
    hf_source = (case_values(case).get("huggingface") or {}).get("token", {}).get("source", "existingSecret")
    return CREATE_ALL + (["--set", "huggingface.token.source=create"] if hf_source != "none" else [])
SENTINELS = ["AKIAEXAMPLESENTINEL", "sentinel-store-secret-0123456789", "hf_sentinel_token_0123456789"]


def names_from_render(docs: list[dict]) -> dict:
    """The Platform fields as the rendered objects spell them (what a pod of the pipeline will meet)."""
    names = {}
    sa = one(docs, "ServiceAccount")
    names["service_account"] = sa["metadata"]["name"]
    binding = one(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    store_cm = one(docs, "ConfigMap", lambda d: env_names.RESULTS_URI in d.get("data", {}))
    names["store_config"] = store_cm["metadata"]["name"]
    metrics_cm = one(docs, "ConfigMap", lambda d: env_names.METRICS_PORT in d.get("data", {}))
    names["metrics_config"] = metrics_cm["metadata"]["name"]
    names["metrics_port"] = int(metrics_cm["data"][env_names.METRICS_PORT])
    store_secret = one(docs, "Secret", lambda d: env_names.AWS_ACCESS_KEY_ID in d.get("data", {}))
    names["store_secret"] = store_secret["metadata"]["name"]
    assert set(store_secret["data"]) == {env_names.AWS_ACCESS_KEY_ID, env_names.AWS_SECRET_ACCESS_KEY}
    pvc = one(docs, "PersistentVolumeClaim")
    names["model_cache_pvc"] = pvc["metadata"]["name"]
    job = one(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    assert "serviceAccountName" not in pod  # the fill Job needs no account: the namespace's default, no token
    (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert vol["persistentVolumeClaim"]["claimName"] == names["model_cache_pvc"]
    (container,) = pod["containers"]
    names["image_cpu_ref"] = container["image"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == vol["name"]]
    names["model_cache_mount"] = mount["mountPath"]
    env = {e["name"]: e for e in container["env"]}
    assert env[env_names.HF_HOME]["value"] == mount["mountPath"]
    hf_ref = env.get(env_names.HF_TOKEN, {}).get("valueFrom", {}).get("secretKeyRef")
    names["hf_secret"] = hf_ref["name"] if hf_ref else ""
    if hf_ref:
        assert hf_ref["key"] == env_names.HF_TOKEN
        hf = one(docs, "Secret", lambda d: env_names.HF_TOKEN in d.get("data", {}))
        assert hf["metadata"]["name"] == hf_ref["name"] and set(hf["data"]) == {env_names.HF_TOKEN}
    (gpu_term,) = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    names["gpu_node_label"] = gpu_term["preference"]["matchExpressions"][0]["key"]
    names["eval_priority_class"] = one(docs, "PriorityClass")["metadata"]["name"]
    monitor = one(docs, "PodMonitor", lambda d: "pushgateway" not in d["metadata"]["name"])
    ((label, value),) = monitor["spec"]["selector"]["matchLabels"].items()
    names["part_of_label"], names["part_of_value"] = label, value
    (names["microjob_label"],) = monitor["spec"]["podTargetLabels"]
    address = [r for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
               if r.get("targetLabel") == "__address__"]
    assert address[0]["replacement"] == f"$1:{names['metrics_port']}"
    return names


def names_of(platform: Platform) -> dict:
    return {"service_account": platform.service_account, "store_config": platform.store_config,
            "metrics_config": platform.metrics_config, "metrics_port": platform.metrics_port,
            "store_secret": platform.store_secret, "model_cache_pvc": platform.model_cache_pvc,
            "image_cpu_ref": platform.image("cpu"), "model_cache_mount": platform.model_cache_mount,
            "hf_secret": platform.hf_secret, "gpu_node_label": platform.gpu_node_label,
            "eval_priority_class": platform.eval_priority_class, "part_of_label": platform.part_of_label,
            "part_of_value": platform.part_of_value, "microjob_label": platform.microjob_label}


# ---------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("case", CASES)
def test_helm_lint(case):
    r = run_helm("lint", "--strict", str(CHART), "-n", NAMESPACE, *case_args(case))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


@pytest.mark.parametrize("case", CASES)
def test_notes_render(case):
    # helm template skips NOTES.txt; a client-side dry-run install renders it without a cluster
    r = run_helm("install", "wmvla", str(CHART), "-n", NAMESPACE, "--dry-run=client", *case_args(case))
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    values = Platform.from_chart_values(case_values(case))
    assert f"service account      {values.service_account}" in notes
    assert "wmvla pipeline compile --values" in notes


# --------------------------------------------------------------------------------- offline validation


@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_valid_for_kubernetes(case):
    import kubernetes_validate

    docs = render(*case_args(case), *WITH_CRD)
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"}
    errors = []
    for version in K8S_VERSIONS:
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                continue  # test_podmonitor_valid_for_its_crd
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_unknown_fields():
    """The check above is worth something: a misspelled field in a rendered object fails it."""
    import kubernetes_validate

    job = one(render(), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.29", strict=True)


def _unknown_fields(given, parsed, path="") -> list[str]:
    """Keys of `given` that the model dropped (pydantic ignores unknown fields; the CRD would prune them)."""
    if isinstance(given, dict):
        out = []
        for key, value in given.items():
            if not isinstance(parsed, dict) or key not in parsed:
                out.append(f"{path}/{key}")
            else:
                out += _unknown_fields(value, parsed[key], f"{path}/{key}")
        return out
    if isinstance(given, list):
        return [f for i, (a, b) in enumerate(zip(given, parsed)) for f in _unknown_fields(a, b, f"{path}/{i}")]
    return []


@functools.cache
def _podmonitor_model():
    # prometheus-operator's PodMonitor CRD (v0.80) as generated pydantic models: field names and types
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor

    return PodMonitor


def podmonitor_problems(doc: dict) -> list[str]:
    import pydantic

    try:
        parsed = _podmonitor_model().model_validate(doc)
    except pydantic.ValidationError as e:
        return [str(e)]
    return [f"unknown field {f}" for f in
            _unknown_fields(doc, parsed.model_dump(by_alias=True, exclude_unset=True, mode="json"))]


@pytest.mark.parametrize("case", CASES)
def test_podmonitor_valid_for_its_crd(case):
    monitors = [d for d in render(*case_args(case), *WITH_CRD) if d["kind"] == "PodMonitor"]
    if case == "onprem-seaweedfs":  # pods push to the lab's Pushgateway: nothing of this chart's to scrape
        assert monitors == []
        monitors = [d for d in render(*case_args(case), *create_all(case)) if d["kind"] == "PodMonitor"]
    assert monitors
    for doc in monitors:
        assert podmonitor_problems(doc) == [], doc["metadata"]["name"]
    # and the check catches a misspelled field and a wrong type
    bad = json.loads(json.dumps(monitors[0]))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "5s"
    assert podmonitor_problems(bad) == ["unknown field /spec/podMetricsEndpoints/0/intervall"]
    bad["spec"]["podMetricsEndpoints"][0]["honorLabels"] = "maybe"
    assert "honorLabels" in podmonitor_problems(bad)[0]


# --------------------------------------------------------------------------------------------- names


def test_values_defaults_are_platform_defaults():
    """Every shared name in values.yaml (images, GPU pool included) is Platform()'s default."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert Platform.from_chart_values(values) == Platform()
    # the image tag is the package version the chart's appVersion names
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == values["images"]["tag"] == Platform().tag


@pytest.mark.parametrize("case", CASES)
def test_rendered_names_match_platform(case):
    """The names rendered objects carry equal the Platform the pipeline is compiled with: Platform() for
    the default values, Platform.from_chart_values(file) for a custom file."""
    platform = Platform.from_chart_values(case_values(case))
    if case == "default":
        assert platform == Platform()
    rendered = names_from_render(render(*case_args(case), *create_all(case)))
    expected = names_of(platform)
    # the render forces a created store secret; under workload identity the pipeline gets none
    if case_values(case).get("objectStore", {}).get("credentials", {}).get("source") == "workloadIdentity":
        assert platform.store_secret == ""
        expected["store_secret"] = case_values(case)["objectStore"]["credentials"].get("secretName",
                                                                                        Platform().store_secret)
    assert rendered == expected


def test_custom_values_change_the_names():
    """The on-prem example differs from the defaults in most names, so the test above compares something."""
    custom = Platform.from_chart_values(case_values("onprem-seaweedfs"))
    differing = {k for k, v in names_of(custom).items() if v != names_of(Platform())[k]}
    assert differing >= {"service_account", "store_config", "metrics_config", "metrics_port", "store_secret",
                         "model_cache_pvc", "image_cpu_ref", "model_cache_mount", "hf_secret",
                         "eval_priority_class", "part_of_value", "microjob_label"}
    assert custom.hf_secret == ""  # huggingface.token.source: none


def test_config_map_keys_are_the_env_names():
    docs = render()
    store = one(docs, "ConfigMap", lambda d: d["metadata"]["name"] == Platform().store_config)
    assert store["data"] == {env_names.AWS_REGION: "us-east-1", env_names.RESULTS_URI: "s3://wmvla-results/wmvla/results"}
    metrics = one(docs, "ConfigMap", lambda d: d["metadata"]["name"] == Platform().metrics_config)
    assert metrics["data"] == {env_names.PUSHGATEWAY_URL: "", env_names.METRICS_PORT: str(Platform().metrics_port)}
    onprem = render(*case_args("onprem-seaweedfs"))
    store = one(onprem, "ConfigMap", lambda d: env_names.RESULTS_URI in d["data"])
    assert store["data"][env_names.AWS_ENDPOINT_URL] == "http://seaweedfs-s3.storage.svc.cluster.local:8333"
    assert store["data"][env_names.RESULTS_URI] == "s3://vla/results"
    # the chart's own Pushgateway: its Service's in-cluster URL goes to the pods
    aws = render(*case_args("aws-s3-irsa"))
    metrics = one(aws, "ConfigMap", lambda d: env_names.PUSHGATEWAY_URL in d["data"])
    service = one(aws, "Service")
    port = service["spec"]["ports"][0]["port"]
    assert metrics["data"][env_names.PUSHGATEWAY_URL] == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}"


def test_workload_identity_renders_no_static_keys():
    docs = render(*case_args("aws-s3-irsa"))
    assert not [d for d in docs if d["kind"] == "Secret"]
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


# ------------------------------------------------------------------------------------------ secrets


@pytest.mark.parametrize("case", CASES)
def test_no_secret_value_in_a_config_map(case):
    docs = render(*case_args(case), *create_all(case))
    secrets = [d for d in docs if d["kind"] == "Secret"]
    decoded = "".join(base64.b64decode(v).decode() for s in secrets for v in s["data"].values())
    assert all(s in decoded for s in SENTINELS[:2])  # the values did reach their Secrets
    assert (SENTINELS[2] in decoded) == (case != "onprem-seaweedfs")  # that one has no HF token
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        leaked = [s for s in SENTINELS if s in text or base64.b64encode(s.encode()).decode() in text]
        assert not leaked, f"{doc['kind']}/{doc['metadata']['name']} contains a secret value"
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        assert not set(cm.get("data", {})) & {env_names.AWS_ACCESS_KEY_ID, env_names.AWS_SECRET_ACCESS_KEY,
                                              env_names.HF_TOKEN}


# ------------------------------------------------------------------------------------------- schema

BAD_VALUES = [
    ("images:\n  tag: 0.1\n", "at '/images/tag': got number, want string"),
    ("metrics:\n  port: nine-four-hundred\n", "at '/metrics/port': got string, want integer"),
    ("metrics:\n  port: 70000\n", "at '/metrics/port': maximum"),
    ("objectStore:\n  credentials:\n    source: create\n", "at '/objectStore/credentials/accessKeyId': minLength"),
    ("objectStore:\n  credentials:\n    source: iam\n", "at '/objectStore/credentials/source'"),
    ("objectStore:\n  resultsBucket: ''\n", "at '/objectStore/resultsBucket'"),
    ("objectStore:\n  resultsBucket: My_Bucket\n", "at '/objectStore/resultsBucket'"),
    ("objectStore:\n  bucket: results\n", "at '/objectStore': additional properties 'bucket' not allowed"),
    ("modelCache:\n  hubIds: [not a hub id]\n", "at '/modelCache/hubIds/0'"),
    ("modelCache:\n  size: lots\n", "at '/modelCache/size'"),
    ("serviceAccount:\n  name: Wmvla_Pipeline\n", "at '/serviceAccount/name'"),
    ("rbac:\n  kfpSecretNames: []\n", "at '/rbac/kfpSecretNames': minItems"),
    ("huggingface:\n  token:\n    source: create\n", "at '/huggingface/token/value': minLength"),
    ("serviceAccount: null\n", "serviceAccount"),
    # a cross-field rule worded by the chart itself (templates/_helpers.tpl wmvla.validate)
    ("objectStore:\n  credentials:\n    source: workloadIdentity\n",
     "objectStore.credentials.source=workloadIdentity needs the AWS role on the service account"),
    # what would install but break a run: each refused with the fix in the message
    ("serviceAccount:\n  annotations:\n    iam.gke.io/gcp-service-account: a@b.iam.gserviceaccount.com\n",
     "GKE workload identity gives Google credentials, but wmvla's object store is S3"),
    ("modelCache:\n  accessModes: [ReadWriteMany]\n", "Name a class that offers it: modelCache.storageClassName="),
    ("podSecurityContext:\n  runAsUser: 2000\n", "podSecurityContext.runAsUser=2000: the images run as 10001:10001"),
    ("podSecurityContext:\n  fsGroup: 1000\n", "set podSecurityContext.fsGroup=10001"),
    ("modelCache:\n  mountPath: /tmp/wmvla/\n", "modelCache.mountPath=/tmp/wmvla/ is the pods' work folder"),
    ("modelCache:\n  mountPath: /opt/venv\n", "modelCache.mountPath=/opt/venv is the images' Python"),
    ("podSecurityContext:\n  runAsGroup: 0\n", "podSecurityContext.runAsGroup=0: the images run as 10001:10001"),
    ("metrics:\n  podMonitor:\n    enabled: true\n",
     "metrics.podMonitor.enabled=true but the cluster does not serve monitoring.coreos.com/v1 PodMonitor"),
    ("metrics:\n  podMonitor:\n    enabled: sometimes\n", "at '/metrics/podMonitor/enabled'"),
    ("gpuPool:\n  tolerationEffect: NoScheduling\n", "at '/gpuPool/tolerationEffect'"),
    ("gpuPool:\n  gpusPerCell: 0\n", "at '/gpuPool/gpusPerCell': minimum"),
    ("gpuPool:\n  gpusPerCell: 17\n", "at '/gpuPool/gpusPerCell': maximum"),
    ("gpuPool:\n  gpusPerCell: \"2\"\n", "at '/gpuPool/gpusPerCell': got string, want integer"),
    ("gpuPool:\n  gpusPerCell: 1.5\n", "at '/gpuPool/gpusPerCell': got number, want integer"),
    ("rbac:\n  kfpConfigMapNames: []\n", "at '/rbac/kfpConfigMapNames': minItems"),
    ("modelCache:\n  datasetIds: [not a dataset]\n", "at '/modelCache/datasetIds/0'"),
]


@pytest.mark.parametrize("text,message", BAD_VALUES, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_VALUES)])
def test_bad_values_refused(tmp_path, text, message):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(text)
    err = render_fails("-f", str(bad))
    assert message in err, err


def test_from_chart_values_refuses_wrong_types():
    with pytest.raises(ValueError, match=r"images\.tag should be a str, found float 0\.1 \(quote it"):
        Platform.from_chart_values({"images": {"tag": 0.1}})
    with pytest.raises(ValueError, match=r"metrics\.port should be a int, found str"):
        Platform.from_chart_values({"metrics": {"port": "9400"}})
    with pytest.raises(ValueError, match=r"objectStore should be a mapping, found str"):
        Platform.from_chart_values({"objectStore": "s3://x"})
    with pytest.raises(TypeError, match="expected a mapping"):
        Platform.from_chart_values(["not", "a", "mapping"])
    with pytest.raises(ValueError, match=r"gpuPool\.gpusPerCell should be a int, found str"):
        Platform.from_chart_values({"gpuPool": {"gpusPerCell": "2"}})
    with pytest.raises(ValueError, match=r"gpus_per_cell 0: expected a whole number >= 1.*gpuPool\.gpusPerCell"):
        Platform.from_chart_values({"gpuPool": {"gpusPerCell": 0}})


def test_gpus_per_cell_from_the_values(tmp_path):
    """gpuPool.gpusPerCell is what the compiled pipeline's train pods are sized for (and its gpus_per_cell
    default); the chart accepts it and renders nothing from it (it is a compile-time setting of the pipeline)."""
    values = tmp_path / "four-gpus.yaml"
    values.write_text("gpuPool:\n  gpusPerCell: 4\n")
    assert Platform.from_chart_values(yaml.safe_load(values.read_text())).gpus_per_cell == 4
    assert Platform.from_chart_values({"gpuPool": {"nodeValue": "NVIDIA-H100"}}).gpus_per_cell == 1
    assert render("-f", str(values)) == render()


# ------------------------------------------------------------------------ model cache, dashboard


def test_model_cache_job_name_follows_its_inputs():
    def job(*args):
        return one(render(*args), "Job")

    a = job()
    assert job()["metadata"]["name"] == a["metadata"]["name"]  # unchanged values: same Job, no-op upgrade
    b = job("--set", "modelCache.hubIds={Qwen/Qwen3-VL-2B-Instruct}")
    assert b["metadata"]["name"] != a["metadata"]["name"]  # a changed list runs a new Job
    assert b["spec"]["template"]["spec"]["containers"][0]["command"][3:] == ["model:Qwen/Qwen3-VL-2B-Instruct"]
    c = job("--set", "modelCache.datasetIds={HuggingFaceVLA/libero}")
    assert c["metadata"]["name"] != a["metadata"]["name"]
    assert c["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "dataset:HuggingFaceVLA/libero"
    assert "annotations" not in a["metadata"]
    hook = job("--set", "modelCache.fill.asHook=true")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert not [d for d in render("--set", "modelCache.fill.enabled=false") if d["kind"] == "Job"]


def fill_script() -> str:
    command = one(render(), "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    return command[2]


def run_fill(hf_home: Path, *args: str, extra_groups=(IMAGE_UID,), extra_env=None) -> subprocess.CompletedProcess:
    """The fill Job's script as rendered, as its pod runs it: the images' user and group, the pod's fsGroup as
    a supplemental group, a container's umask, offline (no hub here), nothing of this process's environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "HF_HOME": str(hf_home),
           "HF_HUB_OFFLINE": "1", "FILL_MAX_WORKERS": "2", **(extra_env or {})}
    return subprocess.run(as_image_user([sys.executable, "-c", fill_script(), *args], tuple(extra_groups)),
                          capture_output=True, text=True, env=env, timeout=120, umask=0o022)


def fresh_volume(root: Path) -> Path:
    """A new volume's root as the kubelet leaves it with the pod's fsGroup: root-owned, group fsGroup, 2775."""
    root.mkdir()
    os.chown(root, 0, IMAGE_UID)
    root.chmod(0o2775)
    return root


def seed_snapshot(hf_home: Path, kind: str, repo: str, files: dict[str, str]) -> None:
    """What a finished download leaves in the hub cache (refs/main -> snapshots/<commit>/...), written as the
    fill Job's user: the offline script then finds it as snapshot_download finds a complete download."""
    code = ("import os, sys, json; from pathlib import Path; os.umask(0o002); "
            "d = Path(sys.argv[1]) / 'hub' / (sys.argv[2] + 's--' + sys.argv[3].replace('/', '--')); "
            "(d / 'refs').mkdir(parents=True, exist_ok=True); (d / 'refs' / 'main').write_text('0' * 40); "
            "[((d / 'snapshots' / ('0' * 40) / k).parent.mkdir(parents=True, exist_ok=True), "
            "(d / 'snapshots' / ('0' * 40) / k).write_text(v)) for k, v in json.loads(sys.argv[4]).items()]")
    subprocess.run(as_image_user([sys.executable, "-c", code, str(hf_home), kind, repo, json.dumps(files)],
                                 (IMAGE_UID,)), check=True, timeout=60)


def test_model_cache_script_reports_every_missing_id(pod_tmp):
    """Offline with an empty cache it names each hub id it could not fetch, exits non-zero (the Job retries) and
    leaves no marker (a marker of an earlier fill is removed first: the cache is incomplete until it ends)."""
    hf = fresh_volume(pod_tmp / "hf")
    (hf / MODEL_CACHE_MARKER).write_text('{"models": ["acme/old"]}')
    os.chown(hf / MODEL_CACHE_MARKER, IMAGE_UID, IMAGE_UID)
    r = run_fill(hf, "model:acme/not-cached@v1", "dataset:acme/also-missing")
    assert r.returncode == 1, r.stderr
    assert "model-cache: could not fetch model acme/not-cached@v1" in r.stderr
    assert "2 of 2 hub ids failed: acme/not-cached@v1, acme/also-missing" in r.stderr
    assert not (hf / MODEL_CACHE_MARKER).exists()


def test_model_cache_script_refuses_a_volume_its_user_cannot_write(pod_tmp):
    hf = pod_tmp / "hf"
    hf.mkdir()  # root's, 0755: an NFS export nobody chowned
    r = run_fill(hf, "model:acme/tiny", extra_groups=())
    assert r.returncode == 1
    assert f"cannot write to HF_HOME={hf} as uid {IMAGE_UID}" in r.stderr and "chown 10001:10001" in r.stderr


def test_fill_job_leaves_a_cache_the_pipeline_pods_can_use(pod_tmp):
    """After a complete fill: the marker lists what was fetched (written last), and a pipeline pod (the same
    user, no fsGroup) can add files beside the models: hub datasets are downloaded there at run time."""
    hf = fresh_volume(pod_tmp / "hf")
    seed_snapshot(hf, "model", "acme/tiny-vlm", {"config.json": "{}"})
    seed_snapshot(hf, "dataset", "acme/tiny-data", {"meta/info.json": "{}"})
    r = run_fill(hf, "model:acme/tiny-vlm", "dataset:acme/tiny-data")
    assert r.returncode == 0, r.stderr
    marker = json.loads((hf / MODEL_CACHE_MARKER).read_text())
    assert marker["models"] == ["acme/tiny-vlm"] and marker["datasets"] == ["acme/tiny-data"]
    assert (hf / MODEL_CACHE_MARKER).stat().st_uid == IMAGE_UID
    pod = subprocess.run(as_image_user([sys.executable, "-c", "import sys, pathlib; p = pathlib.Path(sys.argv[1]) / "
                                        "'hub' / 'datasets--acme--new' / 'x'; p.parent.mkdir(parents=True); "
                                        "p.write_text('ok')", str(hf)]),
                         capture_output=True, text=True, timeout=60, umask=0o022)
    assert pod.returncode == 0, pod.stderr


def test_fill_job_runs_as_the_images_user_without_sidecar_or_token():
    job = one(render(), "Job")
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert pod["spec"]["automountServiceAccountToken"] is False
    ctx = pod["spec"]["securityContext"]
    assert ctx["runAsUser"] == ctx["runAsGroup"] == ctx["fsGroup"] == IMAGE_UID
    # the images' USER is the same user (tests/test_images.py checks every image ends with it)
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in (ROOT / "images" / "Dockerfile").read_text()
    assert MODEL_CACHE_MARKER in fill_script()
    # the mount paths the chart keeps the model cache off are the pods' (components.platform.WORKDIR)
    assert f'"{WORKDIR}" "the pods\' work folder' in (CHART / "templates" / "_helpers.tpl").read_text()
    # a Job name is a pod label value: <= 63 characters with the longest release name helm allows (53)
    long = one(render_named("r" * 53), "Job")
    assert len(long["metadata"]["name"]) <= 63


def render_named(release: str, *args: str) -> list[dict]:
    r = run_helm("template", release, str(CHART), "-n", NAMESPACE, *args)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


# namespaced kinds a Kubeflow profile's owner (the namespace's admin) may create; nothing cluster-scoped, no CRD
PROFILE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job",
                 "Deployment", "Service"}


@pytest.mark.parametrize("case", CASES)
def test_installs_in_a_profile_namespace_without_cluster_admin_or_prometheus_operator(case):
    docs = render(*case_args(case))  # no --api-versions: a cluster without prometheus-operator
    assert {d["kind"] for d in docs} <= PROFILE_KINDS
    role = one(docs, "Role")
    for rule in role["rules"]:
        if "pods" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "watch"}, "a task pod never needs to patch pods"
        if {"configmaps", "secrets"} & set(rule["resources"]):
            assert rule.get("resourceNames") and rule["verbs"] == ["get"], rule
    pvc = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for claim in pvc:  # binds on a default (ReadWriteOnce) class, or names its class
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] or claim["spec"].get("storageClassName")


def test_pod_monitor_follows_the_crd_and_never_doubles_a_pushgateway():
    def monitors(*args):
        return sorted(d["metadata"]["name"] for d in render(*args) if d["kind"] == "PodMonitor")

    assert monitors() == []  # auto, no CRD
    assert monitors(*WITH_CRD) == ["wmvla-pipeline"]
    assert monitors(*WITH_CRD, "--set", "metrics.podMonitor.enabled=false") == []
    # pods pushing: the pods are not scraped too (each series would count twice), the chart's gateway is
    assert monitors(*WITH_CRD, "--set", "metrics.pushgateway.enabled=true") == ["wmvla-pushgateway"]
    assert monitors(*WITH_CRD, "--set", "metrics.pushgatewayUrl=http://pg.monitoring:9091") == []
    gateway = one(render("--set", "metrics.pushgateway.enabled=true"), "Deployment")
    assert gateway["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def test_notes_never_write_secret_values_to_a_file():
    r = run_helm("install", "wmvla", str(CHART), "-n", NAMESPACE, "--dry-run=client")
    notes = r.stdout.split("NOTES:", 1)[1]
    assert "get values" not in notes.replace("never dump `helm get values` to a file", "")
    assert "--all" not in notes


def test_model_cache_job_security():
    pod = one(render(), "Job")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]


def test_dashboard_config_map():
    docs = render()
    dash = one(docs, "ConfigMap", lambda d: "wmvla.json" in d.get("data", {}))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "wmvla.json").read_text())
    assert json.loads(dash["data"]["wmvla.json"]) == shipped
    assert not [d for d in render("--set", "grafanaDashboard.enabled=false") if "wmvla.json" in d.get("data", {})]
