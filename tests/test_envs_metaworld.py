"""MetaWorld adapter and env registry: conventions, reproducible init states, bad input."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np
import pytest

from vla_core.envs.registry import EnvConfig, MetaWorldSettings, describe_env, list_tasks, make_env, resolve_tasks
from vla_core.utils import WmvlaError

IMG = "observation.images.image"


@pytest.fixture(scope="module")
def pick_place():
    env = make_env(EnvConfig(), "pick-place-v3")
    yield env
    env.close()


def test_instruction_table_covers_metaworld_tasks_exactly_and_uniquely():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    from vla_core.envs.metaworld_env import METAWORLD_DEFAULT_MAX_STEPS, METAWORLD_INSTRUCTIONS, METAWORLD_SUITES

    assert list(METAWORLD_INSTRUCTIONS) == list(ALL_V3_ENVIRONMENTS)
    assert len(set(METAWORLD_INSTRUCTIONS.values())) == 50  # task string -> task_index must be unique
    assert set(ENV_POLICY_MAP) >= set(METAWORLD_INSTRUCTIONS)
    for suite, tasks in METAWORLD_SUITES.items():
        assert set(tasks) <= set(ALL_V3_ENVIRONMENTS), suite
    assert all(1 <= v <= 500 for v in METAWORLD_DEFAULT_MAX_STEPS.values())


def test_observation_conventions(pick_place):
    env = pick_place
    obs = env.reset(0)
    assert env.camera_keys == (IMG,)
    assert set(obs["images"]) == {IMG}
    img = obs["images"][IMG]
    assert img.dtype == np.uint8 and img.shape == (128, 128, 3)
    assert img.std() > 10  # a real scene, not a blank buffer
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (39,) == (env.state_dim,)
    raw = obs["extras"]["metaworld_obs"]
    np.testing.assert_allclose(obs["state"], raw.astype(np.float32))
    assert np.any(raw[36:39] != 0)  # MT1 exposes the goal (the "full" state includes it)
    assert env.action_dim == 4 and env.num_init_states == 50
    assert env.instruction == "pick up the puck and place it at the goal"
    assert env.max_steps == 150


def test_reset_is_reproducible_and_init_indices_differ(pick_place):
    env = pick_place
    a = env.reset(7)
    env.step(np.array([1.0, 0.0, 0.0, 1.0]))
    b = env.reset(7)
    np.testing.assert_array_equal(a["state"], b["state"])
    np.testing.assert_array_equal(a["images"][IMG], b["images"][IMG])
    c = env.reset(8)
    assert not np.allclose(a["state"][4:7], c["state"][4:7])  # another object position


def test_other_seed_gives_other_configurations_and_a_fresh_env_reproduces():
    cfg0, cfg1000 = EnvConfig(seed=0), EnvConfig(seed=1000)
    e0, e1 = make_env(cfg0, "reach-v3"), make_env(cfg1000, "reach-v3")
    try:
        starts0 = np.stack([e0.reset(k)["state"] for k in range(50)])
        starts1 = np.stack([e1.reset(k)["state"] for k in range(50)])
        # training (seed 0) and evaluation (seed 1000) configurations share no (object, goal) pair
        d = np.abs(starts0[:, None, 4:] - starts1[None, :, 4:]).max(-1)
        assert d.min() > 1e-6
    finally:
        e0.close(), e1.close()
    e2 = make_env(cfg1000, "reach-v3")
    try:
        np.testing.assert_array_equal(e2.reset(3)["state"], starts1[3])
    finally:
        e2.close()


def test_expert_solves_and_episode_ends_on_success(pick_place):
    env = pick_place
    env.reset(1)
    for t in range(env.max_steps):
        res = env.step(env.expert_action())
        if res.done:
            break
    assert res.success and res.done and res.info["step"] == t + 1 < env.max_steps
    with pytest.raises(WmvlaError, match="after the episode ended"):
        env.step(np.zeros(4))


def test_episode_ends_at_max_steps():
    env = make_env(EnvConfig(max_steps=3), "push-v3")
    try:
        env.reset(0)
        dones = [env.step(np.zeros(4)).done for _ in range(3)]
        assert dones == [False, False, True]
    finally:
        env.close()


def test_state_modes_and_wrist_camera():
    cfg = EnvConfig(wrist_camera=True, image_size=64, metaworld=MetaWorldSettings(state="proprio"))
    env = make_env(cfg, "drawer-open-v3")
    try:
        obs = env.reset(0)
        assert set(obs["images"]) == {IMG, "observation.images.image2"}
        assert obs["images"]["observation.images.image2"].shape == (64, 64, 3)
        assert not np.array_equal(obs["images"][IMG], obs["images"]["observation.images.image2"])
        np.testing.assert_allclose(obs["state"], obs["extras"]["metaworld_obs"][:4].astype(np.float32))
        assert env.state_dim == 4
    finally:
        env.close()
    env = make_env(EnvConfig(metaworld=MetaWorldSettings(state="no_goal")), "reach-v3")
    try:
        assert env.reset(0)["state"].shape == (36,)
    finally:
        env.close()


def test_corner_camera_is_rotated_180_degrees():
    """corner cameras are mounted upside down in MetaWorld: the adapter rotates them (not just flips)."""
    import mujoco

    env = make_env(EnvConfig(metaworld=MetaWorldSettings(camera="corner4")), "button-press-topdown-v3")
    try:
        img = env.reset(0)["images"][IMG]
        raw_renderer = mujoco.Renderer(env._env.model, 128, 128)
        raw_renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False  # the adapter's setting
        raw_renderer.update_scene(env._env.data, camera="corner4")
        raw = raw_renderer.render().copy()
        raw_renderer.close()
        np.testing.assert_array_equal(img, raw[::-1, ::-1])
        assert not np.array_equal(img, raw)
    finally:
        env.close()


def test_bad_input_messages(pick_place):
    with pytest.raises(WmvlaError, match=r"init_index must be in 0\.\.49"):
        pick_place.reset(50)
    with pytest.raises(WmvlaError, match="shape"):
        pick_place.reset(0)
        pick_place.step(np.zeros(3))
    with pytest.raises(WmvlaError, match="finite"):
        pick_place.step(np.array([np.nan, 0, 0, 0]))
    with pytest.raises(WmvlaError, match=r"valid tasks .*reach-v3"):
        resolve_tasks(EnvConfig(), "reach,not-a-task")
    with pytest.raises(WmvlaError, match=r"index out of range"):
        resolve_tasks(EnvConfig(), "50")
    with pytest.raises(WmvlaError, match=r"valid suites: \['mt50', 'mt10', 'core5'\]"):
        list_tasks(EnvConfig(suite="mt51"))
    with pytest.raises(WmvlaError, match=r"libero_spatial"):
        list_tasks(EnvConfig(env="libero", suite="libero_nope"))
    with pytest.raises(WmvlaError, match=r"valid tasks"):
        make_env(EnvConfig(suite="core5"), "door-open-v3")
    with pytest.raises(WmvlaError, match=r"max_steps must be in 1\.\.500"):
        make_env(EnvConfig(max_steps=501), "reach-v3")
    with pytest.raises(WmvlaError, match="unknown metaworld camera"):
        make_env(EnvConfig(metaworld=MetaWorldSettings(camera="nope")), "reach-v3")


def test_task_resolution_names_indices_suffix():
    cfg = EnvConfig(suite="core5")
    assert resolve_tasks(cfg, None) == list(list_tasks(cfg))
    assert resolve_tasks(cfg, "reach,4,pick-place-v3") == ["reach-v3", "button-press-topdown-v3", "pick-place-v3"]
    with pytest.raises(WmvlaError, match="duplicates"):
        resolve_tasks(cfg, "reach,0")


def test_describe_env_records_result_relevant_settings():
    d = describe_env(EnvConfig(suite="core5"), ["reach-v3", "push-v3"])
    assert d["max_steps_per_task"] == {"reach-v3": 150, "push-v3": 150}
    assert d["seed"] == 1000 and d["image_size"] == 128 and d["render_backend"] == "egl"
    assert d["metaworld"]["shadow_map_size"] == 1024 and d["metaworld"]["shadows"] is False
    assert d["versions"]["metaworld"] == "3.1.1"
    assert "libero" not in d
