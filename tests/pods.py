"""Run a process as a pipeline pod's would run: as the images' user and group (components.platform.IMAGE_UID),
with the groups the pod has (the fill Job: its fsGroup; pipeline pods: none) and a container's umask.

`setpriv` (util-linux) switches the user. The one privilege kept is CAP_DAC_READ_SEARCH (ambient): this
machine's interpreter lives under root's 0700 home, which the user could not otherwise reach; it lets the
process read and traverse any folder but not write: every write still needs the permissions a pod would
need, which is what these tests check (EACCES on the model cache, the work folder, the results folder)."""

from __future__ import annotations

import importlib.util
import os
import shutil

from components.platform import IMAGE_UID


def as_image_user(cmd: list[str], groups: tuple[int, ...] = ()) -> list[str]:
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    group_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return [setpriv, f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", group_arg, "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search", "--", *cmd]


def can_switch_user() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("setpriv"))


# ------------------------------------------------------------------------------------------ pod environments

import base64  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # debian:bookworm-slim's PATH
IMAGE_VENV = "/opt/venv"  # the images' venv (images/Dockerfile)


def image_env(kind: str, venv: str, home: str) -> dict[str, str]:
    """The ENV an image of `kind` starts its container with (images/Dockerfile, its final stage's chain), with the
    image's venv and home folder standing for this machine's venv and a folder of the images' user."""
    from test_images import chain, stages

    _, all_stages = stages((ROOT / "images" / "Dockerfile").read_text())
    env = {"PATH": DEBIAN_PATH}
    for name in reversed(chain(all_stages, kind)):
        for word, rest in all_stages[name]["ins"]:
            if word != "ENV":
                continue
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value.replace("$PATH", env.get("PATH", "")).replace(IMAGE_VENV, venv)
    env["HOME"] = home
    return env


def chart_objects(docs: list[dict]) -> tuple[dict, dict, set]:
    """{config map: data}, {secret: decoded data}, {claim names} of a rendered chart."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
               for d in docs if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    return maps, secrets, claims


def task_env(spec: dict, executor: str, docs: list[dict], base: dict[str, str], mounts: dict[str, str]) -> dict:
    """What the container of `executor` gets on a cluster where the chart was rendered as `docs`: the image's ENV
    (`base`), then the compiled platform section's config maps and secrets (a missing required one is what the
    kubelet refuses to start: CreateContainerConfigError), then the task's own env. `mounts` maps each mount path
    the task declares (PVC, emptyDir) to the folder standing for it here; a value naming a mount path is mapped."""
    maps, secrets, claims = chart_objects(docs)
    platform = spec["platform"]["deploymentSpec"]["executors"].get(executor, {})
    env = dict(base)
    for entry in platform.get("configMapAsEnv", []):
        data = maps.get(entry["configMapName"])
        for pair in entry["keyToEnv"]:
            if data is not None and pair["configMapKey"] in data:
                env[pair["envVar"]] = data[pair["configMapKey"]]
            elif not entry.get("optional"):
                raise AssertionError(f"{executor}: ConfigMap {entry['configMapName']} key {pair['configMapKey']} is "
                                     "not in the chart's objects: the pod would not start (CreateContainerConfigError)")
    for entry in platform.get("secretAsEnv", []):
        data = secrets.get(entry["secretName"])
        for pair in entry["keyToEnv"]:
            if data is not None and pair["secretKey"] in data:
                env[pair["envVar"]] = data[pair["secretKey"]]
            elif not entry.get("optional"):
                raise AssertionError(f"{executor}: Secret {entry['secretName']} key {pair['secretKey']} is not in the "
                                     "chart's objects: the pod would not start (CreateContainerConfigError)")
    for pvc in platform.get("pvcMount", []):
        assert pvc["constant"] in claims, f"{executor}: claim {pvc['constant']} is not rendered by the chart"
        assert pvc["mountPath"] in mounts, f"{executor}: nothing stands for its volume at {pvc['mountPath']}"
    for item in spec["pipeline"]["deploymentSpec"]["executors"][executor]["container"].get("env", []):
        env[item["name"]] = mounts.get(item["value"], item["value"])
    return env


def compiled(platform) -> dict:
    """The pipeline compiled for `platform`: {"pipeline": its spec, "platform": its kubernetes platform section}."""
    import tempfile

    import yaml

    from pipelines.cli import compile_pipeline

    with tempfile.TemporaryDirectory() as d:
        docs = list(yaml.safe_load_all(compile_pipeline(platform, Path(d) / "p.yaml").read_text()))
    return {"pipeline": docs[0], "platform": docs[1]["platforms"]["kubernetes"]}


def microjob_of(spec: dict, executor: str) -> str:
    env = spec["pipeline"]["deploymentSpec"]["executors"][executor]["container"].get("env", [])
    return next(e["value"] for e in env if e["name"] == "WMVLA_MICROJOB")


# -------------------------------------------------------------------- the orchestrator, run as the images' user

# Records the top-level modules each task process imported (tests/test_pod_rehearsal.py maps them to
# distributions): instrumentation, the one thing the rehearsal adds to a pod's environment.
SITECUSTOMIZE = '''import atexit, json, os, sys
def _wmvla_dump_imports():
    where = os.environ.get("WMVLA_REHEARSAL_IMPORTS")
    if where:
        name = f"{os.environ.get('WMVLA_MICROJOB', 'unknown')}-{os.getpid()}.json"
        with open(os.path.join(where, name), "w") as f:
            json.dump(sorted({m.split(".")[0] for m in list(sys.modules)}), f)
atexit.register(_wmvla_dump_imports)
'''


def orchestrate(envs_file: str, arguments_file: str, pipeline_root: str) -> None:
    """kfp.local's orchestration, each task started with its pod's environment only (kfp.local would give it
    this process's environment plus the task's env)."""
    import subprocess

    from kfp.local import subprocess_task_handler

    envs = json.loads(Path(envs_file).read_text())

    def as_its_pod(full_command, env_vars=None):
        """kfp.local's run_local_subprocess (stream the task's output, return its exit code), with env = the pod's."""
        microjob = (env_vars or {}).get("WMVLA_MICROJOB")
        if microjob not in envs:
            raise RuntimeError(f"task with WMVLA_MICROJOB={microjob!r}: no pod environment was prepared for it")
        with subprocess.Popen(full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=envs[microjob]) as process:
            for line in iter(process.stdout.readline, ""):
                print(line, end="")
            return process.wait()

    subprocess_task_handler.run_local_subprocess = as_its_pod
    from pipelines.cli import run_local

    run_local(json.loads(Path(arguments_file).read_text()), pipeline_root)


if __name__ == "__main__":
    orchestrate(*sys.argv[1:4])


# ---------------------------------------------------------------------------------- what an image installs


def installed_by(kind: str) -> set[str]:
    """Canonical names of every distribution the image of `kind` installs through pip: the core dependencies and
    its extras (as images/Dockerfile installs them), with their requirements, recursively (as installed here:
    the same pins, images/constraints.txt), plus the venv's own pip and setuptools."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from test_images import installed_extras, stages

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    _, all_stages = stages((ROOT / "images" / "Dockerfile").read_text())
    reqs = list(project["dependencies"])
    for extra in installed_extras(all_stages, kind):
        reqs += project["optional-dependencies"][extra]
    seen: dict[str, set[str]] = {"wmvla": set(), "pip": set(), "setuptools": set()}
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen and set(req.extras) <= seen[name]:
            continue
        seen.setdefault(name, set()).update(req.extras)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue  # not for this platform (e.g. a Windows-only dependency)
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in seen[name] | {""}):
                todo.append(sub)
    return set(seen)


def owners_of(modules: set[str]) -> dict[str, set[str]]:
    """{top-level module: the distributions that provide it} (several for a namespace package such as google;
    empty when none does); the standard library and private / generated names (a component's ephemeral module,
    __main__, the instrumentation) are left out."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    provided = md.packages_distributions()
    out = {}
    for module in modules:
        if module in sys.stdlib_module_names or module.startswith("_") or module in ("ephemeral_component",
                                                                                     "sitecustomize"):
            continue
        if module in ("vla_core", "components", "pipelines"):
            out[module] = {"wmvla"}
        elif module in provided:
            out[module] = {canonicalize_name(d) for d in provided[module]}
        elif _has_spec(module):
            out[module] = set()  # importable here, yet from no distribution: nothing installs it in an image
        # else made at run time, not imported from a file (Cython's cython_runtime)
    return out


def _has_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # already in sys.modules without a spec: made at run time (cython_runtime)
        return False


# Imports that a library makes only when the module happens to be installed, falling back otherwise: not a
# dependency of the importing image. Each with where it comes from.
OPTIONAL_IMPORTS = {
    "cloudpickle": "pyarrow (core) `try: import cloudpickle as pickle / except ImportError: import pickle`",
}
