"""`wmvla pipeline compile | check | run | submit`: the matrix pipeline compiled, checked, run locally, or sent to a
cluster.

    wmvla pipeline compile                                  # -> pipelines/matrix.yaml (committed)
    wmvla pipeline compile --registry registry.example.com/wmvla --tag 1a2b3c --out matrix.yaml
    wmvla pipeline compile --values my-values.yaml          # match the chart install (pool label, names, pull secrets)
    wmvla pipeline compile --gpus-per-cell 4 --out m4.yaml  # train pods sized for 4 GPUs (CPU, memory, /dev/shm)
    wmvla pipeline compile --check                          # exit 1 if pipelines/matrix.yaml is stale
    wmvla pipeline check matrix.yaml                        # the KFP backend's rules (pipelines/conformance.py)
    wmvla pipeline run --local dataset=metaworld preset=demo device=cpu eval_env= eval_suite= episodes=1 \
        results_uri=/tmp/results run_name=try1
    wmvla pipeline submit --endpoint https://kfp.example.com --values my-values.yaml --namespace my-profile \
        dataset=s3://data/libero results_uri=s3://wmvla/runs
    wmvla pipeline submit --endpoint URL --smoke            # the CI smoke run (tiny, MetaWorld, one cell)

Pipeline arguments are KEY=VALUE (the parameters of the compiled pipeline; VALUE is read as YAML, so
`seeds=[0,1,2]`, `steps=2000`, `cells=[E0-mse,E2-mse]`) and are checked against the parameter types of the
compiled file before anything runs. `--list-params` prints them with defaults. Every local run and every
submission runs the compiled YAML (the file users upload) after the backend-rules check, which it refuses.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from vla_core.utils import WmvlaError

ROOT = Path(__file__).resolve().parent
COMPILED = ROOT / "matrix.yaml"
Args = Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="KEY=VALUE")]


# The CI smoke run (.github/workflows/images-and-pipeline.yml on push, scripts/kind_smoke.sh): the tiny policy
# for MetaWorld (preset "demo": the tiny Qwen3-VL and tiny world encoder built in code, one camera; preset "tiny"
# expects LIBERO's two cameras), generated MetaWorld data, one cell, one seed, one evaluation shard; minutes on
# CPU. Run through kfp.local on the CPU-only compile by tests/test_kind_smoke.py.
SMOKE_ARGUMENTS = dict(dataset="metaworld", preset="demo", cells=["E0-mse"], seeds=[0], steps=4, batch_size=8,
                       eval_env="", eval_suite="", episodes=1, workers=1, eval_shards=1,
                       ablations=[], metaworld_tasks="button-press-topdown", metaworld_episodes=2, image_size=64,
                       device="cpu")

_PY_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "LIST": list,
             "STRUCT": dict}


def package_parameters(package: str | Path = COMPILED) -> dict[str, tuple[str, object]]:
    """name -> (parameter type, default) of a compiled pipeline's parameters (its root inputDefinitions)."""
    from pipelines.conformance import load_ir

    spec, _ = load_ir(package)
    params = (spec["root"].get("inputDefinitions") or {}).get("parameters") or {}
    out = {}
    for name, p in params.items():
        kind, default = p.get("parameterType", "STRING"), p.get("defaultValue")
        if kind == "NUMBER_INTEGER" and isinstance(default, float) and default.is_integer():
            default = int(default)  # the IR's YAML writes integer defaults as doubles (0.0)
        out[name] = (kind, default)
    return out


def pipeline_parameters(package: str | Path = COMPILED) -> dict:
    """name -> default of the compiled pipeline's parameters."""
    return {name: default for name, (_, default) in package_parameters(package).items()}


def parse_arguments(args: tuple[str, ...], package: str | Path = COMPILED) -> dict:
    """KEY=VALUE -> typed arguments of the compiled pipeline; a value of the wrong type is refused here (the
    backend would refuse the run, or a task would fail on it after the GPU pods started)."""
    import yaml

    known = package_parameters(package)
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise WmvlaError(f"pipeline argument {arg!r}: expected KEY=VALUE, e.g. steps=2000")
        if key not in known:
            raise WmvlaError(f"pipeline argument {key!r}: unknown; the pipeline's parameters: {sorted(known)}")
        kind = known[key][0]
        parsed = yaml.safe_load(value) if value else ""
        if kind == "STRING" and not isinstance(parsed, str):
            parsed = value  # a string parameter keeps what was typed (run_name=2024, tasks=1,2, gpus_per_cell=2)
        if kind == "LIST" and not isinstance(parsed, list):
            parsed = [parsed]
        if kind == "NUMBER_DOUBLE" and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        want = _PY_TYPES.get(kind)
        if want is not None and (not isinstance(parsed, want) or (want is int and isinstance(parsed, bool))):
            raise WmvlaError(f"pipeline argument {key}={value!r}: expected {kind.lower().replace('number_', '')}, "
                             f"found {type(parsed).__name__}")
        out[key] = parsed
    return out


# ------------------------------------------------------------------------------------------ compile


@dataclass
class CompileConfig:
    """Compile the matrix pipeline to YAML (upload it in the KFP UI, or `kfp run create -f`)."""

    out: Path = COMPILED
    registry: str | None = None
    """image registry (default: components.platform.Platform's, or the values file's)"""
    tag: str | None = None
    """image tag (default: the package version; CI: the commit SHA)"""
    values: Path | None = None
    """the Helm values file the chart was installed with: names, node pool label (Platform.from_chart_values)"""
    gpus_per_cell: int | None = None
    """GPUs per train pod the pipeline is sized for (default 1, or the values file's gpuPool.gpusPerCell): the train
    pods' CPU, memory and /dev/shm are the one-GPU sizes times this, it is the gpus_per_cell parameter's default,
    and a run asking for more is refused by the plan step (the backend cannot size a pod from a parameter)"""
    check: bool = False
    """do not write: exit 1 if `out` differs from a fresh compile (CI / tests keep matrix.yaml current)"""
    cpu_only: bool = False
    """a cluster without a GPU pool (CI on kind: scripts/kind_smoke.sh): no GPU limits, selectors or tolerations,
    small CPU / memory requests (components.platform.CPU_ONLY_RESOURCES), the eval image in place of the train
    image"""


def platform_for(cfg: CompileConfig):
    from components.platform import DEFAULT, Platform

    platform = DEFAULT
    if cfg.values is not None:
        if not hasattr(Platform, "from_chart_values"):
            raise WmvlaError("--values needs Platform.from_chart_values (components/platform.py), which this "
                             "version lacks; pass --registry / --tag instead")
        import yaml

        if not Path(cfg.values).is_file():
            raise WmvlaError(f"--values {cfg.values}: no such file; expected the chart's values YAML")
        try:
            platform = Platform.from_chart_values(yaml.safe_load(Path(cfg.values).read_text()) or {})
        except ValueError as e:  # a wrong type or value in the file: the message names the key
            raise WmvlaError(f"--values {cfg.values}: {e}") from None
    changes = {k: v for k, v in (("registry", cfg.registry), ("tag", cfg.tag), ("gpus_per_cell", cfg.gpus_per_cell))
               if v is not None}
    if cfg.cpu_only:
        changes["cpu_only"] = True
    try:
        return platform.replace(**changes) if changes else platform
    except ValueError as e:  # --gpus-per-cell 0
        raise WmvlaError(str(e)) from None


def compile_pipeline(platform, out: Path) -> Path:
    """Compile `pipelines.matrix.build(platform)` to `out` (atomically), refusing what the KFP backend would."""
    from kfp import compiler

    from pipelines.conformance import require_conformant
    from pipelines.matrix import build

    out.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temp file beside `out`, then rename: a reader never sees half a pipeline
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".yaml", delete=False) as tmp:
        pass
    try:
        compiler.Compiler().compile(build(platform), tmp.name)
        require_conformant(Path(tmp.name), what="pipelines/matrix.py compiled")
        os.replace(tmp.name, out)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return out


def run_compile(cfg: CompileConfig) -> int:
    platform = platform_for(cfg)
    if not cfg.check:
        compile_pipeline(platform, Path(cfg.out))
        print(f"pipeline: compiled {cfg.out} (images {platform.image('cpu')}, ...; GPU pool "
              f"{platform.gpu_node_label}={platform.gpu_node_value}, train pods sized for {platform.gpus_per_cell} "
              f"GPU(s) per cell)")
        return 0
    with tempfile.TemporaryDirectory() as d:
        fresh = compile_pipeline(platform, Path(d) / "matrix.yaml").read_text()
    current = Path(cfg.out).read_text() if Path(cfg.out).is_file() else None
    if current != fresh:
        print(f"pipeline: {cfg.out} is stale (it differs from compiling pipelines/matrix.py); run "
              f"`wmvla pipeline compile` and commit it", file=sys.stderr)
        return 1
    print(f"pipeline: {cfg.out} is up to date")
    return 0


# ---------------------------------------------------------------------------------------------- run


@dataclass
class CheckConfig:
    """Check compiled pipelines against the open-source KFP backend's rules (pipelines/conformance.py)."""

    packages: Annotated[tuple[Path, ...], tyro.conf.Positional, tyro.conf.arg(metavar="FILE.yaml")] = (COMPILED,)


def run_check(cfg: CheckConfig) -> int:
    from pipelines.conformance import main

    return main([str(p) for p in cfg.packages])


@dataclass
class RunConfig:
    """Run the compiled matrix pipeline on this machine through kfp.local (each task a subprocess of this Python)."""

    args: Args = ()
    """pipeline arguments KEY=VALUE"""
    local: bool = True
    """run locally (the only mode of `run`; a cluster run is `wmvla pipeline submit`)"""
    package: Path = COMPILED
    """the compiled pipeline to run: the file a cluster gets (`wmvla pipeline compile` writes it)"""
    pipeline_root: Path = Path("kfp-local")
    """where kfp.local keeps task outputs (artifacts: small files; the heavy data is in results_uri)"""
    list_params: bool = False
    """print the pipeline's parameters with their defaults and exit"""


def run_local(arguments: dict, pipeline_root: str | Path, package: str | Path = COMPILED) -> None:
    """The compiled pipeline (the YAML a cluster runs, loaded with kfp.components.load_component_from_file)
    executed by kfp.local's subprocess runner with this interpreter (the installed project is importable;
    nothing is pip-installed). It is checked against the KFP backend's rules first and refused where the backend
    would refuse it: kfp.local alone hands Python values between tasks and would run it. Platform settings
    (images, pools, secrets) are ignored locally."""
    import warnings

    from kfp import components, local

    from pipelines.conformance import require_conformant

    require_conformant(package, what=str(package))
    pipeline = components.load_component_from_file(str(package))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    # kfp.local runs two loop iterations at once; each task's torch would otherwise take every core, and
    # two OpenMP pools spinning on the same cores slow both down many times over. The tasks inherit this.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    with warnings.catch_warnings():  # resource / accelerator settings do not apply to local runs
        warnings.simplefilter("ignore")
        pipeline(**arguments)


def _print_params(package: Path) -> None:
    for name, (kind, default) in package_parameters(package).items():
        print(f"  {name}={default!r}  ({kind})")


def run_run(cfg: RunConfig) -> int:
    if cfg.list_params:
        _print_params(cfg.package)
        return 0
    if not cfg.local:
        raise WmvlaError("`wmvla pipeline run` runs locally (--local); submit to a cluster with "
                         "`wmvla pipeline submit --endpoint URL`")
    run_local(parse_arguments(cfg.args, cfg.package), cfg.pipeline_root, cfg.package)
    return 0


# ------------------------------------------------------------------------------------------- submit


@dataclass
class SubmitConfig:
    """Submit the compiled pipeline to a Kubeflow Pipelines endpoint (kfp.Client), as the chart's install runs it:
    its service account, in its namespace."""

    args: Args = ()
    """pipeline arguments KEY=VALUE"""
    endpoint: str = ""
    """KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"""
    package: Path = COMPILED
    """compiled pipeline to submit (`wmvla pipeline compile` writes it)"""
    values: Path | None = None
    """the Helm values file the chart was installed with: the run's service account (serviceAccount.name)"""
    service_account: str | None = None
    """the run's service account (default: the values file's, else the chart's default wmvla-pipeline)"""
    namespace: str | None = None
    """namespace the chart is installed in = where the run's pods run: a Kubeflow profile namespace on
    multi-user installs; default $KFP_NAMESPACE; none on standalone KFP (runs go to KFP's own namespace)"""
    experiment: str = "wmvla"
    run_name: str | None = None
    """KFP run name (default: the package name + time); also the results folder (made a path segment) unless
    run_name=... is given as a pipeline argument"""
    smoke: bool = False
    """the smoke run (SMOKE_ARGUMENTS: the tiny MetaWorld policy, one cell, one shard); KEY=VALUE still override"""
    token_env: str = "KFP_TOKEN"
    """environment variable holding a bearer token (if the endpoint needs one); never a flag"""
    wait: bool = False
    """wait for the run to finish"""
    timeout_s: int = 3 * 3600
    """with --wait: give up after this many seconds"""


def service_account_for(cfg: SubmitConfig) -> str:
    """--service-account, else the values file's serviceAccount.name, else the chart's default."""
    return cfg.service_account or platform_for(CompileConfig(values=cfg.values)).service_account


def submission(cfg: SubmitConfig) -> tuple[dict, str, str | None]:
    """(arguments, service account, namespace) of a submission, everything checked before the API is called:
    the package by the backend's rules, the arguments by its parameter types."""
    from pipelines.conformance import require_conformant

    if not cfg.endpoint:
        raise WmvlaError("--endpoint URL is required (the KFP API, e.g. https://kubeflow.example.com/pipeline)")
    if not Path(cfg.package).is_file():
        raise WmvlaError(f"--package {cfg.package}: no such file; run `wmvla pipeline compile` first")
    require_conformant(cfg.package, what=str(cfg.package))
    arguments = {**(SMOKE_ARGUMENTS if cfg.smoke else {}), **parse_arguments(cfg.args, cfg.package)}
    return arguments, service_account_for(cfg), cfg.namespace or os.environ.get("KFP_NAMESPACE") or None


def run_submit(cfg: SubmitConfig) -> int:
    import kfp

    arguments, account, namespace = submission(cfg)
    client = kfp.Client(host=cfg.endpoint, existing_token=os.environ.get(cfg.token_env) or None, namespace=namespace)
    run = client.create_run_from_pipeline_package(
        str(cfg.package), arguments=arguments, run_name=cfg.run_name, experiment_name=cfg.experiment,
        namespace=namespace, service_account=account)
    print(f"pipeline: submitted run {run.run_id} to {cfg.endpoint} (experiment {cfg.experiment}, service account "
          f"{account}, namespace {namespace or 'the KFP default'})")
    if cfg.wait:
        result = run.wait_for_run_completion(timeout=cfg.timeout_s)
        state = str(getattr(result, "state", None)).upper()
        print(f"pipeline: run {run.run_id} finished: {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0
