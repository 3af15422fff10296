"""LIBERO adapter: safe import, assets, the evaluation protocol and the dataset's observation conventions.

Needs LIBERO installed (scripts/install_libero.sh, run by scripts/setup.sh). One env per suite is created
(~5-10 s each on a 2-core CPU); the libero_90 env and the hard/soft reset comparison beyond libero_goal
are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vla_core.envs.libero_env import (
    ASSETS_ENV_VAR,
    IMAGE_KEY,
    SETTLE_ACTION,
    WRIST_KEY,
    LiberoEnv,
    episode_seed,
    find_libero_assets,
    libero_task_names,
)
from vla_core.envs.registry import LIBERO_MAX_STEPS, EnvConfig, LiberoSettings, make_env, resolve_tasks
from vla_core.utils import WmvlaError

pytestmark = pytest.mark.libero

SUITE_SIZES = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LIBERO_CONFIG_PATH", "XDG_CACHE_HOME",
                                                           "WMVLA_LIBERO_CONFIG_DIR", ASSETS_ENV_VAR)}
    env["HOME"] = str(home)
    return env


# ------------------------------------------------------------------------------------- import, names


def test_import_never_prompts(tmp_path):
    """A fresh HOME (no ~/.libero) and no stdin: wmvla's entry points import LIBERO without its prompt,
    while importing LIBERO directly in the same situation does hit it (the hazard this guards against)."""
    code = textwrap.dedent("""
        from vla_core.envs.libero_env import libero_task_names
        import libero.libero as L
        print("TASKS", len(libero_task_names("libero_10")), L._assets_path_cache)
    """)
    out = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env=_clean_env(tmp_path / "home"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Do you want" not in out.stdout + out.stderr
    assert "TASKS 10 " in out.stdout and str(find_libero_assets()) in out.stdout
    assert (tmp_path / "home/.cache/wmvla/libero/config.yaml").is_file()
    assert not (tmp_path / "home/.libero/config.yaml").exists()

    raw = subprocess.run([sys.executable, "-c", "import libero.libero"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, env=_clean_env(tmp_path / "home2"), timeout=300)
    assert raw.returncode != 0 and "EOFError" in raw.stderr and "Do you want" in raw.stdout


def test_suites_task_names_and_bad_names():
    for suite, n in SUITE_SIZES.items():
        names = libero_task_names(suite)
        assert len(names) == n == len(set(names)), suite
    assert libero_task_names("libero_spatial")[0] == (
        "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate")

    with pytest.raises(WmvlaError, match="valid suites.*libero_spatial.*libero_90"):
        libero_task_names("libero_100")
    with pytest.raises(WmvlaError, match="valid suites"):
        LiberoEnv("libero_long", 0)
    with pytest.raises(WmvlaError, match=r"(?s)unknown LIBERO task 'open_the_door'.*0: pick_up_the_black_bowl"):
        LiberoEnv("libero_spatial", "open_the_door")
    with pytest.raises(WmvlaError, match=r"(?s)task index 10 out of range 0..9.*9: pick_up"):
        LiberoEnv("libero_spatial", 10)
    cfg = EnvConfig(env="libero", suite="libero_goal")
    goal = libero_task_names("libero_goal")
    assert resolve_tasks(cfg, f"3,{goal[0]}") == [goal[3], goal[0]]
    with pytest.raises(WmvlaError, match="valid tasks"):
        resolve_tasks(cfg, "open_the_door")


# ------------------------------------------------------------------------------------------- assets


def test_missing_assets_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv(ASSETS_ENV_VAR, raising=False)
    with pytest.raises(WmvlaError, match=r"(?s)not found.*EnvConfig.libero.assets_path: /nonexistent/x.*install_libero"):
        find_libero_assets("/nonexistent/x")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ASSETS_ENV_VAR, str(empty))
    with pytest.raises(WmvlaError, match=rf"(?s)\${ASSETS_ENV_VAR}: {empty} \(exists, but lacks scenes/, textures/\)"):
        find_libero_assets()
    with pytest.raises(WmvlaError, match="LIBERO assets not found"):
        LiberoEnv("libero_spatial", 0)
    # a valid setting wins over the installed wheels: point it at a copy of the tree (links)
    monkeypatch.delenv(ASSETS_ENV_VAR)
    real = find_libero_assets()
    mine = tmp_path / "my_assets"
    mine.mkdir()
    for child in real.iterdir():
        (mine / child.name).symlink_to(child)
    monkeypatch.setenv(ASSETS_ENV_VAR, str(mine))
    assert find_libero_assets() == mine.resolve()
    assert find_libero_assets(real) == real  # EnvConfig.libero.assets_path beats the env var


@pytest.mark.slow
def test_incomplete_asset_tree_names_the_missing_file(tmp_path):
    real = find_libero_assets()
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("scenes", "textures", "articulated_objects"):
        (partial / name).symlink_to(real / name)
    with pytest.raises(WmvlaError, match=r"needs the asset file .*stable_scanned_objects/akita_black_bowl"):
        LiberoEnv("libero_spatial", 0, assets_path=partial, image_size=32)


# ------------------------------------------------------------------------- protocol and conventions


def _sim_state_now(env: LiberoEnv) -> np.ndarray:
    return np.asarray(env.raw_env.get_sim_state()).copy()


def _check_conventions_at_exact_state(env: LiberoEnv, k: int) -> dict:
    """reset(k) with no settle steps: the observation describes exactly the sim state it was taken in."""
    env.settle_steps = 0
    obs = env.reset(k)
    sim = env.raw_env.sim
    # the init state is actually applied after the reset (LIBERO's reset samples its own placements)
    np.testing.assert_array_equal(_sim_state_now(env), env.init_states[k])
    # cameras: 256x256x3 uint8, the raw render rotated by 180 degrees
    assert set(obs["images"]) == {IMAGE_KEY, WRIST_KEY}
    for key, cam in ((IMAGE_KEY, "agentview"), (WRIST_KEY, "robot0_eye_in_hand")):
        img = obs["images"][key]
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        raw = sim.render(camera_name=cam, width=256, height=256)
        np.testing.assert_array_equal(img, raw[::-1, ::-1])
        assert not np.array_equal(img, raw) and not np.array_equal(img, raw[::-1])  # not symmetric
        assert img.std() > 10  # a real picture, not a blank frame
    # state: eef site position (3), axis-angle of the hand's orientation (3), finger joints (2)
    state = obs["state"]
    assert state.shape == (8,) and state.dtype == np.float32
    robot = env.raw_env.robots[0]
    np.testing.assert_allclose(state[:3], sim.data.site_xpos[robot.eef_site_id], atol=1e-6)
    w, x, y, z = sim.data.get_body_xquat(robot.robot_model.eef_name)
    expect = Rotation.from_quat([x, y, z, w]).as_matrix()
    np.testing.assert_allclose(Rotation.from_rotvec(state[3:6]).as_matrix(), expect, atol=1e-5)
    np.testing.assert_allclose(state[6:8], sim.data.qpos[robot._ref_gripper_joint_pos_indexes], atol=1e-6)
    assert state[6] > 0 > state[7]  # Panda fingers: left joint positive, right negative
    return obs


def _protocol(env: LiberoEnv, suite: str) -> None:
    assert env.max_steps == LIBERO_MAX_STEPS[suite]
    assert env.num_init_states == 50 and env.action_dim == 7 and env.state_dim == 8
    assert env.camera_keys == (IMAGE_KEY, WRIST_KEY)
    assert env.instruction == env.task_name.replace("_", " ") or suite in ("libero_10", "libero_90")
    obs0 = _check_conventions_at_exact_state(env, 0)
    _check_conventions_at_exact_state(env, 1)
    assert np.abs(env.init_states[0] - env.init_states[1]).max() > 1e-3  # distinct init states

    # the protocol: reset, init state, 10 settle steps; objects stay where the init state put them
    env.settle_steps = 10
    obs = env.reset(0)
    assert env.steps == 0
    assert {k: (v.shape, v.dtype) for k, v in obs["images"].items()} == {
        IMAGE_KEY: ((256, 256, 3), np.uint8), WRIST_KEY: ((256, 256, 3), np.uint8)}
    model = env.raw_env.sim.model
    qpos_now, qpos_init = env.raw_env.sim.data.qpos.copy(), env.init_states[0][1:1 + model.nq]
    free = [int(model.jnt_qposadr[j]) for j in range(model.njnt) if model.jnt_type[j] == 0]  # objects
    assert free
    xy = np.array([[a, a + 1] for a in free]).ravel()  # objects may drop a little onto their support
    assert np.abs(qpos_now[xy] - qpos_init[xy]).max() < 0.02
    assert np.abs(obs["state"][:3] - obs0["state"][:3]).max() < 0.02  # the arm settles, it does not move away

    rng = np.random.default_rng(0)
    for i in range(3):
        res = env.step(rng.uniform(-1, 1, 7))
        assert res.success is False and res.done is False and res.info["step"] == i + 1
        assert res.observation["images"][IMAGE_KEY].shape == (256, 256, 3)
    assert env.steps == 3


@pytest.fixture(scope="module")
def spatial_env():
    env = make_env(EnvConfig(env="libero", suite="libero_spatial"), libero_task_names("libero_spatial")[0])
    yield env
    env.close()


def test_protocol_and_conventions_libero_spatial(spatial_env):
    _protocol(spatial_env, "libero_spatial")
    # upright as in the dataset: the grey wall behind the robot on top, the wooden table at the bottom
    img = spatial_env.reset(0)["images"][IMAGE_KEY].astype(float)
    top, bottom = img[:32].reshape(-1, 3).mean(0), img[-64:].reshape(-1, 3).mean(0)
    assert bottom[0] - bottom[2] > 20 > abs(top[0] - top[2])


@pytest.mark.parametrize("suite", ["libero_object", "libero_goal", "libero_10",
                                   pytest.param("libero_90", marks=pytest.mark.slow)])
def test_protocol_and_conventions_per_suite(suite):
    env = make_env(EnvConfig(env="libero", suite=suite), libero_task_names(suite)[0])
    try:
        _protocol(env, suite)
    finally:
        env.close()


def test_skipped_renders_change_nothing(spatial_env):
    """reset() renders only the last settle step; stepping with render=False skips the cameras. Both give
    exactly what full rendering gives (robosuite's camera sampling schedule is untouched)."""
    env = spatial_env
    env.settle_steps = 10
    obs = env.reset(2)
    state_after = _sim_state_now(env)
    # reference: LIBERO's own calls with every camera frame rendered (reset, set_init_state, 10 steps)
    raw_env = env.raw_env
    raw_env.seed(episode_seed(env.seed, 2))
    raw_env.reset()
    raw_env.env.robots[0].gripper.current_action = np.zeros(2)  # what a fresh (hard-reset) gripper has
    raw_env.set_init_state(env.init_states[2])
    for _ in range(10):
        raw, _, _, _ = raw_env.step(SETTLE_ACTION)
    np.testing.assert_array_equal(_sim_state_now(env), state_after)
    ref = env._observation(raw)
    for key in env.camera_keys:
        np.testing.assert_array_equal(obs["images"][key], ref["images"][key])
    np.testing.assert_array_equal(obs["state"], ref["state"])

    env.settle_steps = 10
    actions = np.random.default_rng(1).uniform(-1, 1, (4, 7))
    env.reset(2)
    for a in actions[:3]:
        res = env.step(a, render=False)
        assert res.observation["images"] == {} and res.observation["state"].shape == (8,)
    skipped = env.step(actions[3]).observation
    env.reset(2)
    for a in actions:
        full = env.step(a).observation
    for key in env.camera_keys:
        np.testing.assert_array_equal(skipped["images"][key], full["images"][key])
    np.testing.assert_array_equal(skipped["state"], full["state"])


def test_two_envs_in_one_process_render_their_own_scene(spatial_env):
    """robosuite renders into whichever GL context is current; the adapter re-binds its own before
    rendering, so an env created later does not corrupt an older env's images."""
    env = spatial_env
    env.settle_steps = 10
    before = env.reset(4)["images"]
    other = LiberoEnv("libero_object", 0, image_size=64)
    try:
        other.reset(0)
        after = env.reset(4)["images"]
        for key in env.camera_keys:
            np.testing.assert_array_equal(before[key], after[key])
    finally:
        other.close()


def test_bad_input_and_episode_end(spatial_env):
    env = spatial_env
    env.settle_steps = 0
    for bad in (50, -1, 1.5, "3"):
        with pytest.raises(WmvlaError, match=r"init index .* out of range.* has 50 init states \(valid: 0..49\)"):
            env.reset(bad)
    env.reset(0)
    with pytest.raises(WmvlaError, match=r"shape \(7,\)"):
        env.step(np.zeros(4))
    with pytest.raises(WmvlaError, match="NaN"):
        env.step(np.array([0, 0, np.nan, 0, 0, 0, -1.0]))
    saved = env.max_steps
    try:
        env.max_steps = 2
        env.reset(0)
        assert env.step(SETTLE_ACTION).done is False
        last = env.step(SETTLE_ACTION)
        assert last.done and not last.success and last.info["timeout"] is True
        with pytest.raises(WmvlaError, match="finished episode"):
            env.step(SETTLE_ACTION)
    finally:
        env.max_steps = saved


def test_success_is_libero_goal_check(spatial_env):
    """Moving the bowl onto the plate (this task's goal: on akita_black_bowl_1 plate_1) ends the episode with
    success at the next step; before that, steps are not successes."""
    env = spatial_env
    env.settle_steps = 10
    env.reset(0)
    raw = env.raw_env.env
    assert raw.parsed_problem["goal_state"] == [["on", "akita_black_bowl_1", "plate_1"]]
    first = env.step(SETTLE_ACTION)
    assert not first.success and not first.done and not raw._check_success()
    sim = raw.sim
    joint = raw.objects_dict["akita_black_bowl_1"].joints[-1]
    plate = sim.data.body_xpos[sim.model.body_name2id(raw.objects_dict["plate_1"].root_body)].copy()
    q = sim.data.get_joint_qpos(joint).copy()
    q[:3] = plate + np.array([0.0, 0.0, 0.03])
    sim.data.set_joint_qpos(joint, q)
    sim.data.set_joint_qvel(joint, np.zeros(6))
    sim.forward()
    for _ in range(10):
        res = env.step(SETTLE_ACTION)
        if res.done:
            break
    assert res.success and res.done and res.info["timeout"] is False and raw._check_success()
    assert env.steps < 10


def test_seed_places_fixtures_reproducibly(spatial_env):
    """Init states fix the joints but not the fixtures (placed from np.random at reset): the seed does."""
    env = spatial_env
    env.settle_steps = 0
    cabinet = env.raw_env.sim.model.body_name2id("wooden_cabinet_1_main")
    saved = env.seed
    try:
        env.reset(0)
        a = env.raw_env.sim.model.body_pos[cabinet].copy()
        env.reset(1)
        env.reset(0)
        np.testing.assert_array_equal(env.raw_env.sim.model.body_pos[cabinet], a)
        env.seed = saved + 1
        env.reset(0)
        assert np.abs(env.raw_env.sim.model.body_pos[cabinet] - a).max() > 1e-4
    finally:
        env.seed = saved


# ------------------------------------------------------------------------------------ soft vs hard


def _episode(env: LiberoEnv, k: int, steps: int = 15):
    env.reset(k)
    rng = np.random.default_rng(k)
    for _ in range(steps):
        res = env.step(rng.uniform(-1, 1, 7))
    return _sim_state_now(env), res.observation


@pytest.mark.parametrize("suite", ["libero_goal", pytest.param("libero_spatial", marks=pytest.mark.slow),
                                   pytest.param("libero_object", marks=pytest.mark.slow),
                                   pytest.param("libero_10", marks=pytest.mark.slow)])
def test_soft_reset_equals_fresh_hard_reset(suite):
    """The default soft reset, after another episode ran in the same env, starts and runs exactly like
    LIBERO's hard reset in a fresh env: results do not depend on which episodes a worker ran before."""
    task = libero_task_names(suite)[1]
    soft = make_env(EnvConfig(env="libero", suite=suite, image_size=64), task)
    hard = make_env(EnvConfig(env="libero", suite=suite, image_size=64, libero=LiberoSettings(reset_mode="hard")),
                    task)
    try:
        _episode(soft, 0)
        s_state, s_obs = _episode(soft, 3)
        h_state, h_obs = _episode(hard, 3)
        np.testing.assert_allclose(s_state, h_state, rtol=0, atol=1e-9)
        for key in soft.camera_keys:
            assert np.abs(s_obs["images"][key].astype(int) - h_obs["images"][key]).max() <= 1
        np.testing.assert_allclose(s_obs["state"], h_obs["state"], atol=1e-6)
    finally:
        soft.close()
        hard.close()
