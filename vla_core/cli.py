"""`wmvla` command line. Each subcommand is a typed dataclass config parsed by tyro plus one function.

Commands are registered here by module path and imported lazily, so `wmvla --help` stays fast and a
command's heavy dependencies (torch, mujoco) load only when it runs. Every command has `--help` listing
all options with defaults, and three generic options handled here before tyro:

    --preset NAME              a named complete config (commands whose module defines PRESETS)
    --config FILE.json|.yaml   a config file (e.g. a run's config.json) as the defaults; flags still override
    --print-config json|yaml   print the resolved config and exit without running
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module", "ConfigClass", "function", "one-line help")
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("pipelines.demo", "DemoConfig", "run_demo",
             "offline benchmark through the Kubeflow pipeline (kfp.local): MetaWorld data -> latents -> E0/E2 x "
             "MSE/flow -> closed-loop eval -> report, in an S3 store"),
    "data inspect": ("vla_core.data.inspect", "InspectConfig", "run_inspect",
                     "summarise a LeRobot dataset and check the configured keys"),
    "data generate": ("vla_core.envs.generate", "GenerateConfig", "run_generate",
                      "write a LeRobot v3.0 dataset from scripted experts (metaworld)"),
    "latents": ("vla_core.world.cache", "LatentsConfig", "run_latents",
                "precompute world-encoder latents for a dataset (resumable)"),
    "prophet train": ("vla_core.world.prophet_train", "ProphetTrainConfig", "run_prophet_train",
                      "train the Prophet alone on a latent cache and report per-k metrics"),
    "vision-cache": ("vla_core.train.vision_cache", "VisionCacheConfig", "run_vision_cache",
                     "precompute a frozen vision tower's outputs for a training run (same flags as train; resumable)"),
    "train": ("vla_core.train.loop", "TrainConfig", "run_train",
              "train a VLA policy (E0/E1/E2/E3); --preset tiny|demo|metaworld-gpu|libero-2b sets the defaults"),
    "eval": ("vla_core.eval.cli", "EvalConfig", "run_eval",
             "closed-loop evaluation of a checkpoint or a scripted policy"),
    "matrix": ("vla_core.experiments.matrix", "MatrixConfig", "run_matrix",
               "train and evaluate the E0-E3 x head x seed matrix, then report"),
    "report": ("vla_core.experiments.report", "ReportConfig", "run_report",
               "markdown + plots + verdict from a matrix run folder"),
    "preflight": ("vla_core.experiments.preflight", "PreflightConfig", "run_preflight",
                  "the pipeline's first step from a shell: results writable, dataset reachable, model cache filled"),
    # the Kubeflow pipeline (pipelines/, needs the `pipeline` extra; imported only when run)
    "pipeline compile": ("pipelines.cli", "CompileConfig", "run_compile",
                         "compile the matrix pipeline to pipelines/matrix.yaml (--check: fail if stale)"),
    "pipeline check": ("pipelines.cli", "CheckConfig", "run_check",
                       "check compiled pipelines against the KFP backend's rules (types, loops, pod fields, versions)"),
    "pipeline run": ("pipelines.cli", "RunConfig", "run_run",
                     "run the compiled matrix pipeline on this machine through kfp.local (--local)"),
    "pipeline submit": ("pipelines.cli", "SubmitConfig", "run_submit",
                        "submit pipelines/matrix.yaml to a Kubeflow Pipelines endpoint"),
    "results push": ("vla_core.storage.cli", "ResultsPushConfig", "run_push",
                     "publish a results folder to s3://bucket/prefix/<run> (manifest written last)"),
    "results list": ("vla_core.storage.cli", "ResultsListConfig", "run_list",
                     "list published runs: date, cells, verdict; incomplete runs flagged"),
    "results pull": ("vla_core.storage.cli", "ResultsPullConfig", "run_pull",
                     "download a published run, verified against its manifest (resumable)"),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: wmvla COMMAND [options]   (wmvla COMMAND --help for all options)", "", "commands:"]
    for name, (_, _, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {help_}")
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, list[str]]:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    groups = sorted({k.split()[0] for k in COMMANDS if " " in k})
    if argv and argv[0] in groups:
        subs = [k.split()[1] for k in COMMANDS if k.startswith(argv[0] + " ")]
        raise SystemExit(f"wmvla {argv[0]}: expected one of {subs}, got {argv[1:2] or 'nothing'}")
    raise SystemExit(_usage() if not argv or argv[0] in ("-h", "--help") else
                     f"wmvla: unknown command {argv[0]!r}\n\n{_usage()}")


def _preset_default(module, name: str, rest: list[str]):
    """`--preset NAME` for commands whose module defines PRESETS (name -> config factory): that config
    becomes tyro's defaults, so later flags override single fields. Returns (default or None, rest)."""
    presets = getattr(module, "PRESETS", None)
    if not presets:
        return None, rest
    if rest and rest[-1] == "--preset":
        raise SystemExit(f"wmvla {name}: --preset expects one of {sorted(presets)}, got None")
    value, rest = _pop_option(rest, "--preset")
    if value is None:
        return None, rest
    if value not in presets:
        raise SystemExit(f"wmvla {name}: --preset expects one of {sorted(presets)}, got {value!r}")
    return presets[value](), rest


def _pop_option(rest: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Removes `--flag VALUE` / `--flag=VALUE` from rest; returns (VALUE or None, rest)."""
    for i, arg in enumerate(rest):
        if arg == flag or arg.startswith(flag + "="):
            if "=" in arg:
                return arg.split("=", 1)[1], rest[:i] + rest[i + 1:]
            if i + 1 >= len(rest):
                raise SystemExit(f"{flag} expects a value")
            return rest[i + 1], rest[:i] + rest[i + 2:]
    return None, rest


def _config_file_default(config_cls, path: str):
    """A JSON or YAML file with the config's fields (nested dataclasses as mappings) -> a config instance."""
    from pathlib import Path

    from vla_core.utils import WmvlaError, from_dict

    p = Path(path)
    if not p.is_file():
        raise WmvlaError(f"--config {path}: no such file; expected a .json or .yaml file with the fields of "
                         f"{config_cls.__name__} (e.g. a run's config.json, or --print-config yaml output)")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        import json

        data = json.loads(text)
    if not isinstance(data, dict):
        raise WmvlaError(f"--config {path}: expected a mapping of {config_cls.__name__} fields, found {type(data).__name__}")
    try:
        return from_dict(config_cls, data)
    except (TypeError, ValueError, KeyError) as e:
        raise WmvlaError(f"--config {path}: does not match {config_cls.__name__}: {e}") from e


def format_config(cfg, fmt: str) -> str:
    """The resolved config as JSON or YAML text (the same plain types `to_jsonable` stores in runs)."""
    import json

    from vla_core.utils import to_jsonable

    data = to_jsonable(cfg)
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    raise SystemExit(f"--print-config expects json or yaml, got {fmt!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = _resolve(argv)
    module_name, config_name, func_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    import tyro

    from vla_core.utils import WmvlaError

    config_cls = getattr(module, config_name)
    print_fmt, rest = _pop_option(rest, "--print-config")
    config_file, rest = _pop_option(rest, "--config")
    try:
        default, rest = _preset_default(module, name, rest)
        if config_file is not None:
            if default is not None:
                raise WmvlaError("--preset and --config both set the defaults; use one of them")
            default = _config_file_default(config_cls, config_file)
    except WmvlaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = tyro.cli(config_cls, args=rest, prog=f"wmvla {name}", description=help_, default=default)
    if print_fmt is not None:
        print(format_config(cfg, print_fmt), end="" if print_fmt == "yaml" else "\n")
        return 0
    try:
        result = getattr(module, func_name)(cfg)
    except WmvlaError as e:
        # Bad input: a clear message, no traceback. WMVLA_DEBUG=1 shows the traceback.
        if os.environ.get("WMVLA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
