"""End-to-end tiny matrix on CPU: MetaWorld expert data -> latents -> E0-E3 training -> closed-loop evaluation
(with E2's rollout ablations) -> report; then a re-run that skips everything, and an evaluation resumed after
losing part of its episodes. Also the checkpoint BatchPolicy's world state against the latent cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from vla_core.data.keys import DatasetKeys
from vla_core.utils import WmvlaError, read_jsonl

os.environ.setdefault("MUJOCO_GL", "egl")

TASK = "drawer-close"
KEYS = DatasetKeys(wrist_image_key=None)


@pytest.fixture(scope="module")
def mw_data(tmp_path_factory):
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.envs.generate import GenerateConfig, run_generate
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    root = tmp_path_factory.mktemp("mw")
    run_generate(GenerateConfig(env="metaworld", out=root / "ds", tasks=TASK, episodes=3, workers=0, image_size=32))
    ds = LeRobotDataset.open(root / "ds", KEYS)
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), "cpu")
    cache = precompute_latents(ds, enc, root / "lat.npy", batch_size=64, log=lambda *a: None)
    return {"dataset": str(root / "ds"), "latents": str(cache.path)}


def _matrix_cfg(mw_data, out: Path, **kw):
    from vla_core.experiments.matrix import MatrixConfig

    base = dict(preset="tiny", out=out, dataset=mw_data["dataset"], latents=mw_data["latents"], no_wrist_camera=True,
                experiments=("E0", "E1", "E2", "E3"), heads=("mse",), seeds=(0,), steps=3, episodes=2, workers=0,
                max_steps=20, progress=False, device="cpu")
    base.update(kw)
    return MatrixConfig(**base)


def test_tiny_matrix_end_to_end_and_rerun(mw_data, tmp_path):
    from vla_core.experiments.matrix import run_matrix_cells

    out = tmp_path / "matrix"
    result = run_matrix_cells(_matrix_cfg(mw_data, out))
    # training runs in the naming scheme, each finished
    for e in ("E0", "E1", "E2", "E3"):
        run = out / e / "tiny_m2_delta_mse" / "seed0"
        assert (run / "done.json").exists(), e
        rows = read_jsonl(run / "train_log.jsonl")
        assert rows and {"step", "action_loss", "world_loss", "gate", "lr"} <= set(rows[-1]) | {"gate"}
    # one evaluation folder per condition: 4 own + 3 ablations of E2
    summaries = sorted(out.rglob("eval/*/summary.json"))
    assert len(summaries) == 7
    seen = set()
    for p in summaries:
        s = json.loads(p.read_text())
        c = s["config"]
        for k in ("experiment", "head", "seed", "rollout_memory", "checkpoint", "env", "suite"):
            assert k in c, (p, k)
        seen.add((c["experiment"], c["rollout_memory"]))
        eps = read_jsonl(p.parent / "episodes.jsonl")
        assert len(eps) == 2 and s["overall"]["n"] == 2
        assert {e["condition"] for e in eps} == {f"{c['experiment']}-mse-{c['rollout_memory']}"}
        assert p.parent.name.startswith("step_0000003__metaworld_") and c["rollout_memory"] in p.parent.name
    assert seen == {("E0", "none"), ("E1", "zero"), ("E2", "pred"), ("E2", "zero"), ("E2", "random"),
                    ("E2", "shuffle"), ("E3", "pred")}
    report = json.loads((out / "summary.json").read_text())
    assert (out / "report.md").exists() and len(report["conditions"]) == 7
    assert result["report"] == str(out / "report.md")

    # --- re-run: everything is skipped (no file rewritten) ---
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors",)}
    eval_e1 = next(p.parent for p in summaries if "E1" in p.parts)
    first_lines = (eval_e1 / "episodes.jsonl").read_text().splitlines()
    # --- and an interrupted evaluation: summary missing, one episode lost -> resumed, the other kept
    (eval_e1 / "summary.json").unlink()
    (eval_e1 / "episodes.jsonl").write_text(first_lines[0] + "\n")
    run_matrix_cells(_matrix_cfg(mw_data, out, report=False))
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    lines = (eval_e1 / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first_lines[0]
    assert json.loads((eval_e1 / "summary.json").read_text())["overall"]["n"] == 2


def test_checkpoint_policy_world_state_matches_the_cache(mw_data, tmp_path):
    """Replaying a dataset episode through the BatchPolicy gives the Prophet the cached history windows."""
    import dataclasses

    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.eval.checkpoint_policy import WorldCheckpointPolicy, load_checkpoint_policy
    from vla_core.train.config import OptimConfig, get_preset
    from vla_core.train.loop import train
    from vla_core.world.cache import LatentCache

    cfg = dataclasses.replace(get_preset("tiny"), dataset=mw_data["dataset"], latents=mw_data["latents"], keys=KEYS,
                              out_root=str(tmp_path), optim=OptimConfig(steps=2, batch_size=4, warmup_steps=1),
                              val_every=0)
    run = Path(train(cfg)["run_dir"])
    policy = load_checkpoint_policy(run, "pred", "cpu", print_prompt=False)
    assert isinstance(policy, WorldCheckpointPolicy)
    T = policy.policy.cfg.world_history
    seen = []
    real_hist = policy._world_history
    policy._world_history = lambda slots, obs: seen.append(real_hist(slots, obs)) or seen[-1]

    ds = LeRobotDataset.open(mw_data["dataset"], KEYS)
    cache = LatentCache.open(mw_data["latents"])
    ep = ds.episodes[1]
    frames = ds.frames("observation.images.image", np.arange(ep.start, ep.start + 8))
    states = ds.columns("observation.state")[ep.start: ep.start + 8]
    obs = [{"images": {"observation.images.image": f}, "state": s} for f, s in zip(frames, states)]
    task = ds.tasks_of([ep.start])[0]
    policy.reset(0, TASK, task)
    policy.act([0], [obs[0]], [task])  # t = 0: history clamped at the episode start
    for t in range(1, 6):
        policy.observe(0, obs[t])  # executed inside the chunk
    chunks = policy.act([0], [obs[6]], [task])  # t = 6
    assert chunks[0].shape == (policy.chunk_size, policy.action_dim)
    for t, hist in ((0, seen[0][0]), (6, seen[1][0])):
        idx = np.clip(np.arange(t - T + 1, t + 1), 0, None) + ep.start
        np.testing.assert_allclose(hist, cache.get(idx), rtol=2e-3, atol=2e-3)

    with pytest.raises(WmvlaError, match="impossible in closed loop"):
        load_checkpoint_policy(run, "oracle", "cpu")
    # an E0 checkpoint ignores the rollout memory (no memory module)
    e0 = Path(train(dataclasses.replace(cfg, experiment="E0"))["run_dir"])
    p0 = load_checkpoint_policy(e0, "pred", "cpu", print_prompt=False)
    assert p0.rollout_memory == "none" and not hasattr(p0, "observe")


def test_matrix_overrides_reach_every_cell():
    """Local model folders (no hub) and the world settings pass from `wmvla matrix` into each cell's config."""
    from vla_core.experiments.matrix import MatrixConfig, base_train_config, cell_config

    cfg = MatrixConfig(preset="libero-2b", out=Path("runs/x"), dataset="/data/libero",
                       backbone="/models/Qwen3-VL-2B-Instruct", world_encoder="/models/vjepa2-vitg-fpc64-256",
                       window=1, finetune="lora", steps=7)
    cell = cell_config(base_train_config(cfg), "E2", "flow", 3)
    assert cell.policy.backbone == "/models/Qwen3-VL-2B-Instruct" and cell.policy.finetune == "lora"
    assert cell.world.encoder == "/models/vjepa2-vitg-fpc64-256" and cell.world.window == 1
    assert (cell.dataset, cell.optim.steps, cell.experiment, cell.policy.head, cell.seed) == ("/data/libero", 7, "E2", "flow", 3)
    untouched = cell_config(base_train_config(MatrixConfig(preset="libero-2b")), "E0", "mse", 0)
    assert untouched.policy.backbone == "Qwen/Qwen3-VL-2B-Instruct" and untouched.world.window == 4
    assert untouched.vision_cache == ""
    cached = cell_config(base_train_config(dataclasses.replace(cfg, vision_cache="/cache/feats.npy")), "E0", "mse", 0)
    assert cached.vision_cache == "/cache/feats.npy"
    with pytest.raises(WmvlaError, match="frozen vision tower"):  # the default cell trains its tower
        base_train_config(MatrixConfig(preset="libero-2b", vision_cache="/cache/feats.npy"))
