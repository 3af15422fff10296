"""`wmvla pipeline compile | run | submit`: the matrix pipeline compiled, run locally, or sent to a cluster.

    wmvla pipeline compile                                  # -> pipelines/matrix.yaml (committed)
    wmvla pipeline compile --registry registry.example.com/wmvla --tag 1a2b3c --out matrix.yaml
    wmvla pipeline compile --values my-values.yaml          # match the chart install (pool label, names)
    wmvla pipeline compile --check                          # exit 1 if pipelines/matrix.yaml is stale
    wmvla pipeline run --local dataset=metaworld preset=tiny results_uri=/tmp/results run_name=try1
    wmvla pipeline submit --endpoint https://kfp.example.com dataset=s3://data/libero results_uri=s3://wmvla/runs

Pipeline arguments are KEY=VALUE (the parameters of pipelines/matrix.py; VALUE is read as YAML, so
`seeds=[0,1,2]`, `steps=2000`, `cells=[E0-mse,E2-mse]`). `--list-params` prints them with defaults.
"""

from __future__ import annotations

import inspect
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


def pipeline_parameters() -> dict:
    """name -> default of the pipeline's parameters (read from pipelines/matrix.py's signature)."""
    from pipelines.matrix import matrix

    return {n: p.default for n, p in inspect.signature(matrix.pipeline_func).parameters.items()}


def parse_arguments(args: tuple[str, ...]) -> dict:
    import yaml

    known = pipeline_parameters()
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise WmvlaError(f"pipeline argument {arg!r}: expected KEY=VALUE, e.g. steps=2000")
        if key not in known:
            raise WmvlaError(f"pipeline argument {key!r}: unknown; the pipeline's parameters: {sorted(known)}")
        parsed = yaml.safe_load(value) if value else ""
        default = known[key]
        if isinstance(default, str) and not isinstance(parsed, str):
            parsed = value  # a string parameter keeps what was typed (run_name=2024, tasks=1,2)
        if isinstance(default, list) and not isinstance(parsed, list):
            parsed = [parsed]
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
    check: bool = False
    """do not write: exit 1 if `out` differs from a fresh compile (CI / tests keep matrix.yaml current)"""


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
        platform = Platform.from_chart_values(yaml.safe_load(Path(cfg.values).read_text()) or {})
    changes = {k: v for k, v in (("registry", cfg.registry), ("tag", cfg.tag)) if v is not None}
    return platform.replace(**changes) if changes else platform


def compile_pipeline(platform, out: Path) -> Path:
    from kfp import compiler

    from pipelines.matrix import build

    out.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temp file beside `out`, then rename: a reader never sees half a pipeline
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".yaml", delete=False) as tmp:
        pass
    try:
        compiler.Compiler().compile(build(platform), tmp.name)
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
              f"{platform.gpu_node_label}={platform.gpu_node_value})")
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
class RunConfig:
    """Run the matrix pipeline on this machine through kfp.local (each task a subprocess of this Python)."""

    args: Args = ()
    """pipeline arguments KEY=VALUE"""
    local: bool = True
    """run locally (the only mode of `run`; a cluster run is `wmvla pipeline submit`)"""
    pipeline_root: Path = Path("kfp-local")
    """where kfp.local keeps task outputs (artifacts: small files; the heavy data is in results_uri)"""
    list_params: bool = False
    """print the pipeline's parameters with their defaults and exit"""


def run_local(arguments: dict, pipeline_root: str | Path) -> None:
    """The compiled graph executed by kfp.local's subprocess runner with this interpreter (the installed
    project is importable; nothing is pip-installed). Platform settings are ignored locally."""
    import warnings

    from kfp import local

    from pipelines.matrix import matrix

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    # kfp.local runs two loop iterations at once; each task's torch would otherwise take every core, and
    # two OpenMP pools spinning on the same cores slow both down many times over. The tasks inherit this.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    with warnings.catch_warnings():  # resource / accelerator settings do not apply to local runs
        warnings.simplefilter("ignore")
        matrix(**arguments)


def _print_params() -> None:
    for name, default in pipeline_parameters().items():
        print(f"  {name}={default!r}")


def run_run(cfg: RunConfig) -> int:
    if cfg.list_params:
        _print_params()
        return 0
    if not cfg.local:
        raise WmvlaError("`wmvla pipeline run` runs locally (--local); submit to a cluster with "
                         "`wmvla pipeline submit --endpoint URL`")
    run_local(parse_arguments(cfg.args), cfg.pipeline_root)
    return 0


# ------------------------------------------------------------------------------------------- submit


@dataclass
class SubmitConfig:
    """Submit pipelines/matrix.yaml to a Kubeflow Pipelines endpoint (kfp.Client)."""

    args: Args = ()
    """pipeline arguments KEY=VALUE"""
    endpoint: str = ""
    """KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"""
    package: Path = COMPILED
    """compiled pipeline to submit (`wmvla pipeline compile` writes it)"""
    experiment: str = "wmvla"
    run_name: str | None = None
    """KFP run name (default: the package name + time); also the results folder unless run_name=... is given"""
    namespace: str | None = None
    """Kubeflow profile namespace (multi-user installs)"""
    token_env: str = "KFP_TOKEN"
    """environment variable holding a bearer token (if the endpoint needs one); never a flag"""
    wait: bool = False
    """wait for the run to finish"""


def run_submit(cfg: SubmitConfig) -> int:
    import kfp

    from components.platform import DEFAULT

    if not cfg.endpoint:
        raise WmvlaError("--endpoint URL is required (the KFP API, e.g. https://kubeflow.example.com/pipeline)")
    if not Path(cfg.package).is_file():
        raise WmvlaError(f"--package {cfg.package}: no such file; run `wmvla pipeline compile` first")
    arguments = parse_arguments(cfg.args)
    client = kfp.Client(host=cfg.endpoint, existing_token=os.environ.get(cfg.token_env) or None,
                        namespace=cfg.namespace)
    run = client.create_run_from_pipeline_package(
        str(cfg.package), arguments=arguments, run_name=cfg.run_name, experiment_name=cfg.experiment,
        namespace=cfg.namespace, service_account=DEFAULT.service_account)
    print(f"pipeline: submitted run {run.run_id} to {cfg.endpoint} (experiment {cfg.experiment})")
    if cfg.wait:
        result = run.wait_for_run_completion()
        state = getattr(result, "state", None)
        print(f"pipeline: run {run.run_id} finished: {state}")
        return 0 if str(state).upper() in ("SUCCEEDED", "None") else 1
    return 0
