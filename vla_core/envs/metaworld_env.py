"""MetaWorld 3.x adapter: one v3 task, numbered initial conditions, rendered cameras, dataset conventions.

Initial conditions: `MT1(task, seed)` draws 50 (object, goal) configurations; init index k is the k-th of
them. `env.set_task(config)` then `env.reset()` rebuilds exactly that configuration (MetaWorld ignores
`reset(seed=...)`), so (seed, k) reproduces an episode's start bit for bit.

Rendering uses MuJoCo's own `mujoco.Renderer` (not gymnasium's wrapper) so that several cameras can be
rendered from one GL context, with cheap settings recorded in MetaWorldSettings: shadow map 1024, no
multisampling, shadows off. Data generation and evaluation both go through this class, so the images a
policy is trained on and the images it sees in closed loop come from the same code and settings.

The default agent-view camera "agentview" is a free camera chosen by us (looking at the table from the
robot's front-right at 40 degrees down, 1.05 m away): MetaWorld's own corner cameras are mounted upside
down (hence the 180 degree rotation applied to them) and show the objects only a few pixels large at
128 px; this view shows the gripper, the objects and the goal markers of all 50 tasks clearly.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from vla_core.envs.base import Observation, StepResult
from vla_core.envs.registry import (
    METAWORLD_CONFIGS_PER_SEED,
    METAWORLD_MAX_STEPS_LIMIT,
    EnvConfig,
    camera_keys,
    configure_gl,
)
from vla_core.utils import WmvlaError

# One instruction per v3 task, written for this project (MetaWorld ships no language). Each is unique,
# because the dataset maps instruction strings to task indices.
METAWORLD_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and dunk it into the hoop",
    "bin-picking-v3": "pick up the puck from the left bin and place it into the right bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button down from the top",
    "button-press-topdown-wall-v3": "press the button down from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial a quarter turn",
    "disassemble-v3": "pick the nut up and off the peg",
    "door-close-v3": "push the door closed",
    "door-lock-v3": "turn the door lock down to lock it",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "turn the door lock to unlock it",
    "hand-insert-v3": "move the gripper into the hole in the table",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open the faucet",
    "faucet-close-v3": "turn the faucet handle to close the faucet",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate forward into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "pick up the peg and insert it into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the socket sideways",
    "soccer-v3": "push the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and use it to push the bottle to the goal",
    "stick-pull-v3": "grasp the stick and use it to pull the bottle to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "move the gripper to the goal",
    "reach-wall-v3": "move the gripper over the wall to the goal",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
METAWORLD_FPS = 80  # one env step = frame_skip 5 x timestep 2.5 ms = 12.5 ms of sim time
TASKS = tuple(METAWORLD_INSTRUCTIONS)  # MetaWorld's own order (metaworld.env_dict.ALL_V3_ENVIRONMENTS)

METAWORLD_SUITES: dict[str, tuple[str, ...]] = {
    "mt50": TASKS,
    "mt10": ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
             "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"),
    # five tasks the scripted expert always solves, quick to generate and evaluate (the demo benchmark)
    "core5": ("reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "button-press-topdown-v3"),
}

# Default episode limits. Measured: the scripted expert over 20 configurations of seed 1000 needs at most
# 100 steps on 34 tasks (-> 150), at most 200 on 11 (-> 300) and more on 5 (-> 400). A learned policy is
# slower than the expert, hence the 1.5-2x margin. Override with EnvConfig.max_steps (<= 500).
_LONG_TASKS_300 = ("basketball-v3", "box-close-v3", "door-lock-v3", "door-open-v3", "handle-pull-side-v3",
                   "handle-pull-v3", "pick-out-of-hole-v3", "peg-unplug-side-v3", "soccer-v3",
                   "shelf-place-v3", "sweep-v3")
_LONG_TASKS_400 = ("bin-picking-v3", "disassemble-v3", "peg-insert-side-v3", "stick-pull-v3", "push-back-v3")
METAWORLD_DEFAULT_MAX_STEPS = {
    t: 400 if t in _LONG_TASKS_400 else 300 if t in _LONG_TASKS_300 else 150 for t in TASKS}

# Corner cameras are mounted upside down in MetaWorld's XML: rotate their images 180 degrees
# (a vertical flip alone would mirror the scene).
_ROTATED_CAMERAS = ("corner", "corner2", "corner3", "corner4")
MODEL_CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")

_OBJ = ["pos_x", "pos_y", "pos_z", "quat_w", "quat_x", "quat_y", "quat_z"]
_CURRENT = ["hand_x", "hand_y", "hand_z", "gripper_opening"] + [f"obj1_{n}" for n in _OBJ] + [
    f"obj2_{n}" for n in _OBJ]
RAW_OBS_NAMES = _CURRENT + [f"prev_{n}" for n in _CURRENT] + ["goal_x", "goal_y", "goal_z"]  # 39


def state_names(mode: str) -> list[str]:
    """Names of observation.state's dims for a MetaWorldSettings.state mode."""
    if mode == "full":
        return list(RAW_OBS_NAMES)
    if mode == "no_goal":
        return list(RAW_OBS_NAMES[:36])
    if mode == "proprio":
        return list(RAW_OBS_NAMES[:4])
    raise WmvlaError(f"metaworld state mode must be 'full', 'no_goal' or 'proprio', got {mode!r}")


def state_from_raw(raw_obs: np.ndarray, mode: str) -> np.ndarray:
    n = len(state_names(mode))
    return np.asarray(raw_obs[:n], dtype=np.float32)


def metaworld_max_steps(task: str, override: int | None = None) -> int:
    steps = METAWORLD_DEFAULT_MAX_STEPS[task] if override is None else int(override)
    if not 1 <= steps <= METAWORLD_MAX_STEPS_LIMIT:
        raise WmvlaError(f"metaworld max_steps must be in 1..{METAWORLD_MAX_STEPS_LIMIT} "
                         f"(MetaWorld's max_path_length), got {steps}")
    return steps


def make_expert(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """MetaWorld's scripted policy for `task`: raw 39-d observation -> action [4] (float32)."""
    if task not in METAWORLD_INSTRUCTIONS:
        raise WmvlaError(f"unknown metaworld task {task!r}; valid: {list(TASKS)}")
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[task]()

    def act(raw_obs: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # "Constant(s) may be too high": the env clips actions to [-1, 1] anyway (so do we)
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(policy.get_action(np.asarray(raw_obs, dtype=np.float64)), dtype=np.float32)

    return act


class MetaWorldEnv:
    """RolloutEnv for one MetaWorld v3 task (see the module docstring)."""

    action_dim = 4

    def __init__(self, cfg: EnvConfig, task: str, end_on_success: bool = True):
        """`end_on_success=False` (data generation only) lets an episode run on after its first success."""
        if cfg.env != "metaworld":
            raise WmvlaError(f"MetaWorldEnv needs EnvConfig(env='metaworld'), got env={cfg.env!r}")
        if task not in METAWORLD_INSTRUCTIONS:
            raise WmvlaError(f"unknown metaworld task {task!r}; valid: {list(TASKS)}")
        s = cfg.metaworld
        for name in [s.camera] + ([s.wrist_camera] if cfg.use_wrist_camera else []):
            if name != "agentview" and name not in MODEL_CAMERAS:
                raise WmvlaError(f"unknown metaworld camera {name!r}; valid: {['agentview', *MODEL_CAMERAS]}")
        configure_gl(cfg.render_backend)  # before the first mujoco import of this process
        import metaworld
        import mujoco

        self._mujoco = mujoco
        self.cfg = cfg
        self.task_name = task
        self.instruction = METAWORLD_INSTRUCTIONS[task]
        self.max_steps = metaworld_max_steps(task, cfg.max_steps)
        self.num_init_states = METAWORLD_CONFIGS_PER_SEED
        self.seed = cfg.seed
        self.state_mode = s.state
        self.state_dim = len(state_names(s.state))
        self.camera_keys = camera_keys(cfg)
        self.image_size = cfg.resolved_image_size

        benchmark = metaworld.MT1(task, seed=cfg.seed)
        self._configs = benchmark.train_tasks
        if len(self._configs) != METAWORLD_CONFIGS_PER_SEED:
            raise WmvlaError(f"metaworld MT1 returned {len(self._configs)} configurations, expected 50")
        self._env = benchmark.train_classes[task]()  # no gymnasium renderer: we render with mujoco.Renderer
        self.end_on_success = end_on_success
        self.fps = round(1.0 / self._env.dt)  # one env step = frame_skip * timestep = 12.5 ms -> 80 Hz
        model = self._env.model
        # Offscreen buffer settings are read when the GL context is created: set them first.
        model.vis.quality.shadowsize = s.shadow_map_size
        model.vis.quality.offsamples = s.offscreen_samples
        size = self.image_size
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        self._renderer = mujoco.Renderer(model, height=size, width=size)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = bool(s.shadows)
        self._cameras = [(self.camera_keys[0], self._camera(s.camera))]
        if cfg.use_wrist_camera:
            self._cameras.append((self.camera_keys[1], self._camera(s.wrist_camera)))
        self._expert: Callable[[np.ndarray], np.ndarray] | None = None
        self._raw_obs: np.ndarray | None = None
        self._t = 0
        self._done = True
        self.init_index: int | None = None

    def _camera(self, name: str) -> tuple[Any, bool]:
        """(camera argument for Renderer.update_scene, rotate 180 degrees?)"""
        if name != "agentview":
            return name, name in _ROTATED_CAMERAS
        s = self.cfg.metaworld
        cam = self._mujoco.MjvCamera()
        cam.type = self._mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:] = s.camera_lookat
        cam.distance = s.camera_distance
        cam.azimuth = s.camera_azimuth
        cam.elevation = s.camera_elevation
        return cam, False

    # ------------------------------------------------------------------------------------ interface

    def render(self) -> dict[str, np.ndarray]:
        images = {}
        for key, (camera, rotate) in self._cameras:
            self._renderer.update_scene(self._env.data, camera=camera)
            img = self._renderer.render()
            images[key] = np.ascontiguousarray(img[::-1, ::-1] if rotate else img)
        return images

    def _observation(self) -> Observation:
        assert self._raw_obs is not None
        return {
            "images": self.render(),
            "state": state_from_raw(self._raw_obs, self.state_mode),
            "extras": {"metaworld_obs": self._raw_obs.copy()},
        }

    def reset(self, init_index: int) -> Observation:
        if not isinstance(init_index, (int, np.integer)) or not 0 <= init_index < self.num_init_states:
            raise WmvlaError(f"{self.task_name}: init_index must be in 0..{self.num_init_states - 1} "
                             f"(MetaWorld draws {self.num_init_states} configurations per seed), got {init_index!r}")
        self._env.set_task(self._configs[int(init_index)])
        raw, _ = self._env.reset()
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self.init_index = int(init_index)
        self._t = 0
        self._done = False
        return self._observation()

    def step(self, action: np.ndarray) -> StepResult:
        if self._done:
            raise WmvlaError(f"{self.task_name}: step() after the episode ended; call reset(init_index) first")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_dim,) or not np.all(np.isfinite(action)):
            raise WmvlaError(f"{self.task_name}: action must be a finite float array of shape ({self.action_dim},), "
                             f"got shape {action.shape}")
        # MetaWorld clips the xyz part itself but passes the gripper effort to the actuators unclipped.
        action = np.clip(action, -1.0, 1.0)
        raw, _reward, _terminated, _truncated, info = self._env.step(action)
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._t += 1
        success = bool(info["success"])
        self._done = (success and self.end_on_success) or self._t >= self.max_steps
        return StepResult(self._observation(), success, self._done, {"step": self._t})

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state."""
        if self._raw_obs is None:
            raise WmvlaError("expert_action() before reset()")
        if self._expert is None:
            self._expert = make_expert(self.task_name)
        return self._expert(self._raw_obs)

    def close(self) -> None:
        # Free the GL context explicitly: at interpreter exit EGL is torn down first and the
        # garbage-collected renderer then prints EGL errors.
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None
