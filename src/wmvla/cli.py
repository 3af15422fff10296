"""`wmvla` command line. Each subcommand is a typed dataclass config parsed by tyro plus one function.

Commands are registered here by module path and imported lazily, so `wmvla --help` stays fast and a
command's heavy dependencies (torch, mujoco) load only when it runs. Every command has `--help` listing
all options with defaults.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module", "ConfigClass", "function", "one-line help")
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("wmvla.experiments.demo", "DemoConfig", "run_demo",
             "offline benchmark: MetaWorld data -> latents -> E0-E3 training -> closed-loop eval -> report"),
    "data inspect": ("wmvla.data.inspect", "InspectConfig", "run_inspect",
                     "summarise a LeRobot dataset and check the configured keys"),
    "data generate": ("wmvla.envs.generate", "GenerateConfig", "run_generate",
                      "write a LeRobot v3.0 dataset from scripted experts (metaworld)"),
    "latents": ("wmvla.world.cache", "LatentsConfig", "run_latents",
                "precompute world-encoder latents for a dataset (resumable)"),
    "prophet train": ("wmvla.world.prophet_train", "ProphetTrainConfig", "run_prophet_train",
                      "train the Prophet alone on a latent cache and report per-k metrics"),
    "train": ("wmvla.train.loop", "TrainConfig", "run_train",
              "train a VLA policy (E0/E1/E2/E3); --preset tiny|demo|metaworld-gpu|libero-2b sets the defaults"),
    "eval": ("wmvla.eval.cli", "EvalConfig", "run_eval",
             "closed-loop evaluation of a checkpoint or a scripted policy"),
    "matrix": ("wmvla.experiments.matrix", "MatrixConfig", "run_matrix",
               "train and evaluate the E0-E3 x head x seed matrix, then report"),
    "report": ("wmvla.experiments.report", "ReportConfig", "run_report",
               "markdown + plots + verdict from a matrix run folder"),
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
    for i, arg in enumerate(rest):
        if arg == "--preset" or arg.startswith("--preset="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else None)
            if value not in presets:
                raise SystemExit(f"wmvla {name}: --preset expects one of {sorted(presets)}, got {value!r}")
            return presets[value](), rest[:i] + rest[i + (1 if "=" in arg else 2):]
    return None, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = _resolve(argv)
    module_name, config_name, func_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    import tyro

    from wmvla.utils import WmvlaError

    config_cls = getattr(module, config_name)
    default, rest = _preset_default(module, name, rest)
    cfg = tyro.cli(config_cls, args=rest, prog=f"wmvla {name}", description=help_, default=default)
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
