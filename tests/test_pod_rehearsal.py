"""A pod rehearsal: the matrix pipeline run through kfp.local as its pods would run on a cluster where the chart
was installed, and what every command run in an image imports checked against what that image installs.

- Install: the chart rendered with a values file pointing at the session's real S3 server (tests/conftest.py);
  the pipeline compiled from the same values (Platform.from_chart_values), as `wmvla pipeline compile --values`.
- Each task's environment is built from nothing: its image's ENV (images/Dockerfile), then what the compiled
  platform section gives the task from the rendered ConfigMaps and Secrets (a required key the chart does not
  render fails the test, as the kubelet would refuse the pod), then the task's own env. Nothing of the host's
  environment reaches a task (kfp.local would pass its own process's environment on).
- Every process (kfp.local's orchestration and the tasks) runs as the images' user and group 10001 without
  supplemental groups, with a container's umask (tests/pods.py: setpriv).
- HF_HOME is a folder left as the chart's fill Job leaves the model-cache volume: a new volume's root
  (root:10001, 2775 with the Job's fsGroup), filled by the Job's rendered script run as the Job runs it
  (its user, its fsGroup; offline: no hub is reachable here, so the hub id it fetches is cached beforehand).
  The work folder (the emptyDir at components.platform.WORKDIR) is a folder of the images' user.
- OMP_NUM_THREADS=1: two tasks share this machine's 2 cores (kfp.local runs two loop iterations at once), as
  tests/test_pipeline_local.py's run does; a pod has its own CPU request instead.
- Parameters: the tiny settings of tests/test_pipeline_local.py (dataset: MetaWorld experts; preset demo) with one
  cell, E2-flow (it reads the latents; the zero-memory ablation too), and the results URI the chart's ConfigMap
  gives.
- Instrumentation, the one addition to a task's environment: PYTHONPATH with a sitecustomize that records the
  top-level modules each task process imported, checked against the distributions the task's image installs
  (its extras in images/Dockerfile and their requirements); the fill Job's script likewise against the cpu image.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from components.platform import IMAGE_UID, MICROJOBS, WORKDIR, Platform
from pods import (
    DEBIAN_PATH,
    OPTIONAL_IMPORTS,
    SITECUSTOMIZE,
    as_image_user,
    compiled,
    image_env,
    installed_by,
    microjob_of,
    owners_of,
    task_env,
)
from test_chart import CHART, NAMESPACE, fresh_volume, run_fill, run_helm, seed_snapshot
from vla_core import env_names

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    os.chown(path, IMAGE_UID, IMAGE_UID)
    return path


def import_problems(imports: Path, kind_of: dict[str, str]) -> list[str]:
    """Modules a process imported that its image does not install (from each recorded process's list)."""
    problems = []
    cache: dict[str, set[str]] = {}
    for log in sorted(imports.glob("*.json")):
        job = log.stem.rsplit("-", 1)[0]
        kind = kind_of[job]
        allowed = cache.setdefault(kind, installed_by(kind))
        for module, owners in sorted(owners_of(set(json.loads(log.read_text()))).items()):
            if not owners & allowed and module not in OPTIONAL_IMPORTS:
                problems.append(f"{job} ({kind} image) imported {module} (from {sorted(owners) or 'no distribution'}),"
                                f" which the {kind} image does not install")
    return sorted(set(problems))


def test_pipeline_runs_as_its_pods(pod_tmp, s3_env):
    from vla_core.storage import pull_run

    s3_env.create_bucket("rehearsal")
    env = s3_env.env()
    values = {
        "objectStore": {"endpoint": env[env_names.AWS_ENDPOINT_URL], "region": env[env_names.AWS_REGION],
                        "resultsBucket": "rehearsal", "resultsPrefix": "runs",
                        "credentials": {"source": "create", "accessKeyId": env[env_names.AWS_ACCESS_KEY_ID],
                                        "secretAccessKey": env[env_names.AWS_SECRET_ACCESS_KEY]}},
        "huggingface": {"token": {"source": "create", "value": "hf_rehearsal_not_a_token"}},
        "modelCache": {"hubIds": ["acme/tiny-vlm"]},
        # each task serves /metrics on this port (a pod has its own network; here tasks share one: the second
        # of two concurrent tasks warns and carries on, as a metrics failure never fails a job)
        "metrics": {"port": free_port()},
    }
    values_file = pod_tmp / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    r = run_helm("template", "wmvla", str(CHART), "-n", NAMESPACE, "-f", str(values_file))
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    platform = Platform.from_chart_values(values)
    spec = compiled(platform)

    # the model-cache volume after the fill Job, and the instrumentation
    instrument, imports = user_folder(pod_tmp / "instrument"), user_folder(pod_tmp / "imports")
    (instrument / "sitecustomize.py").write_text(SITECUSTOMIZE)
    record = {"PYTHONPATH": str(instrument), "WMVLA_REHEARSAL_IMPORTS": str(imports), "OMP_NUM_THREADS": "1"}
    hf = fresh_volume(pod_tmp / "models")
    seed_snapshot(hf, "model", "acme/tiny-vlm", {"config.json": "{}"})
    fill = run_fill(hf, "model:acme/tiny-vlm", extra_env={**record, "WMVLA_MICROJOB": "fill"})
    assert fill.returncode == 0, fill.stderr

    home, work = user_folder(pod_tmp / "home"), user_folder(pod_tmp / "work")
    mounts = {platform.model_cache_mount: str(hf), WORKDIR: str(work)}
    envs, kind_of = {}, {"fill": "cpu"}
    for executor in spec["pipeline"]["deploymentSpec"]["executors"]:
        microjob = microjob_of(spec, executor)
        kind_of[microjob] = MICROJOBS[microjob].image
        base = image_env(kind_of[microjob], sys.prefix, str(home))
        envs[microjob] = {**task_env(spec, executor, docs, base, mounts), "HOSTNAME": f"wmvla-{microjob}", **record}
    # what the chart gave them, not what this process has
    assert envs["train"][env_names.HF_HOME] == str(hf) and envs["train"][env_names.HF_TOKEN] == "hf_rehearsal_not_a_token"
    assert env_names.HF_HOME not in envs["plan"] and "VIRTUAL_ENV" in envs["plan"]
    results_uri = envs["plan"][env_names.RESULTS_URI]
    assert results_uri == "s3://rehearsal/runs"

    arguments = dict(dataset="metaworld", results_uri=results_uri, run_name="rehearsal", preset="demo",
                     cells=["E2-flow"], seeds=[0], steps=4, batch_size=8, eval_env="", eval_suite="",
                     episodes=1, workers=1, ablations=["zero"], metaworld_tasks="button-press-topdown",
                     metaworld_episodes=2, workdir=str(work))
    (pod_tmp / "envs.json").write_text(json.dumps(envs))
    (pod_tmp / "arguments.json").write_text(json.dumps(arguments))
    kfp_root = user_folder(pod_tmp / "kfp")
    run = subprocess.run(as_image_user([sys.executable, str(ROOT / "tests" / "pods.py"), str(pod_tmp / "envs.json"),
                                        str(pod_tmp / "arguments.json"), str(kfp_root)]),
                         cwd=ROOT, env={"PATH": DEBIAN_PATH, "HOME": str(home)}, capture_output=True, text=True,
                         timeout=1500, umask=0o022)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "preflight: ok: results s3://rehearsal/runs: writable" in run.stdout
    assert f"preflight: ok: HF_HOME={hf}: writable by uid {IMAGE_UID}" in run.stdout

    pulled = pull_run(f"{results_uri}/rehearsal", pod_tmp / "pulled")
    assert pulled["complete"]
    summary = json.loads((pod_tmp / "pulled" / "summary.json").read_text())
    assert set(summary["conditions"]) == {"E2-flow-pred", "E2-flow-zero"}
    # every file a task left in the work folder belongs to the images' user
    assert {p.stat().st_uid for p in work.rglob("*")} == {IMAGE_UID}

    # what each process imported is installed by its image
    recorded = {p.stem.rsplit("-", 1)[0] for p in imports.glob("*.json")}
    assert recorded >= {"fill", "preflight", "plan", "dataset", "latents", "train", "plan-shards", "evaluate", "merge",
                        "report"}, recorded
    problems = import_problems(imports, kind_of)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- static: what each command imports for sure

import ast  # noqa: E402
import importlib.util  # noqa: E402

OUR = ("vla_core", "components", "pipelines")


def _is_optional(handlers: list[ast.ExceptHandler]) -> bool:
    names = {n.id for h in handlers for n in ast.walk(h.type) if isinstance(n, ast.Name)} if handlers else set()
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})


def imports_run(tree: ast.AST, everything: bool) -> set[str]:
    """Modules imported when this code runs: `everything` (a function's body: all of it), else a module's import
    (not the bodies of its functions, nor `if TYPE_CHECKING:` blocks, nor try/except ImportError fallbacks)."""
    out = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not everything:
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Try) and _is_optional(node.handlers):
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module in OUR or node.module.startswith(tuple(f"{p}." for p in OUR)):
                out.update(f"{node.module}.{a.name}" for a in node.names)  # `from vla_core import data`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def third_party_imported(source: str, function: str | None) -> set[str]:
    """Top-level names of the modules that running `function` of `source` (or the script `source`) imports for
    sure: its own imports and, through the project's modules (and their packages), their module-level imports."""
    tree = ast.parse(source)
    start = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function) if function else tree
    todo, seen, out = list(imports_run(start, everything=True)), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.split(".")[0]
        if top not in OUR:
            out.add(top)
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run their __init__ first
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # an attribute of a module (`from vla_core.experiments.matrix import eval_plan`)
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # `from vla_core import env_names` also names attributes: those are not modules
        todo += imports_run(ast.parse(Path(spec.origin).read_text()), everything=False)
    return out


def commands_in_images() -> list[tuple[str, str, str, str | None]]:
    """(what, image kind, program source, function): every program the pipeline's tasks run (the component module
    KFP writes into the container and the function it calls) and the chart's fill Job script."""
    from pods import compiled
    from test_chart import fill_script

    spec = compiled(Platform())
    out = []
    for executor, body in spec["pipeline"]["deploymentSpec"]["executors"].items():
        container = body["container"]
        microjob = next(e["value"] for e in container["env"] if e["name"] == "WMVLA_MICROJOB")
        function = container["args"][container["args"].index("--function_to_execute") + 1]
        out.append((executor, MICROJOBS[microjob].image, container["command"][3], function))
    out.append(("chart model-cache fill Job", "cpu", fill_script(), None))  # its image: images.cpu (the default)
    return out


def test_every_command_imports_only_what_its_image_installs():
    problems, checked = [], 0
    commands = commands_in_images()
    assert len(commands) >= 10  # every executor of the pipeline and the fill Job
    for what, kind, source, function in commands:
        allowed = installed_by(kind)
        for module, owners in sorted(owners_of(third_party_imported(source, function)).items()):
            checked += 1
            if not owners & allowed and module not in OPTIONAL_IMPORTS:
                problems.append(f"{what} ({kind} image) imports {module} ({sorted(owners) or 'no distribution'}), "
                                f"which the {kind} image does not install: add it to that image's extras")
    assert checked >= len(commands)  # each imports kfp (the executor) or huggingface_hub (the fill Job) at least
    assert not problems, "\n".join(problems)


def test_import_checks_catch_what_an_image_lacks(tmp_path):
    """Both checks are worth something: transformers (train extra) in a cpu-image task, huggingface_hub in an
    image without the hub extra, are reported; the standard library, runtime-made and optional modules are not."""
    (tmp_path / "plan-12.json").write_text(json.dumps(["transformers", "cython_runtime", "cloudpickle", "json", "yaml"]))
    assert import_problems(tmp_path, {"plan": "cpu"}) == [
        "plan (cpu image) imported transformers (from ['transformers']), which the cpu image does not install"]
    fill = next(source for what, _, source, _ in commands_in_images() if what.startswith("chart"))
    assert "huggingface_hub" in third_party_imported(fill, None)
    assert "huggingface-hub" in installed_by("cpu")
    # followed through the project's modules: vla_core.storage's modules import numpy / yaml ... when imported
    through = third_party_imported("def f():\n    from vla_core.experiments import preflight\n", "f")
    assert through and "vla_core" not in through


# ------------------------------------------------------------------ the compiled platform for a profile namespace


def test_compiled_pods_suit_a_profile_namespace():
    """Every task pod: no Istio sidecar, its work folder on a bounded emptyDir; the pre-flight first (every other
    root task waits for it), on CPU with the model cache mounted; the GPU toleration's effect from the values."""
    from components.platform import ISTIO_INJECT_LABEL

    spec = compiled(Platform())
    executors = spec["platform"]["deploymentSpec"]["executors"]
    assert len(executors) == len(spec["pipeline"]["deploymentSpec"]["executors"])
    for name, ex in executors.items():
        assert ex["podMetadata"]["labels"][ISTIO_INJECT_LABEL] == "false", name
        (work,) = [m for m in ex["emptyDirMounts"] if m["mountPath"] == WORKDIR]
        assert work["sizeLimit"] == MICROJOBS[microjob_of(spec, name)].resources.scratch
    tasks = spec["pipeline"]["root"]["dag"]["tasks"]
    assert "dependentTasks" not in tasks["preflight"]
    roots = [t for t, body in tasks.items() if t != "preflight" and not set(body.get("dependentTasks", [])) - {"preflight"}]
    assert roots and all("preflight" in tasks[t]["dependentTasks"] for t in roots), roots
    pre = executors["exec-preflight"]
    assert pre["pvcMount"][0]["mountPath"] == Platform().model_cache_mount and "nodeSelector" not in pre
    assert "accelerator" not in spec["pipeline"]["deploymentSpec"]["executors"]["exec-preflight"]["container"].get(
        "resources", {})
    assert executors["exec-train-cell"]["tolerations"][0]["effect"] == "NoSchedule"
    every = compiled(Platform.from_chart_values({"gpuPool": {"tolerationEffect": ""}}))
    assert "effect" not in every["platform"]["deploymentSpec"]["executors"]["exec-train-cell"]["tolerations"][0]
