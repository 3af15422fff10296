"""`wmvla prophet train`: held-out split, learning on real dynamics, outputs, determinism."""

import json

import numpy as np
import pytest
import torch

from vla_core.data.fixtures import make_libero_like
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import Episode, LeRobotDataset
from vla_core.utils import WmvlaError
from vla_core.world.cache import precompute_latents
from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder
from vla_core.world.prophet_train import ProphetTrainConfig, load_prophet, split_episodes, train_prophet

from test_world_prophet import _rotation_episodes



def test_split_is_seeded_and_disjoint():
    tr, ho = split_episodes(20, 0.1, seed=3)
    assert len(ho) == 2 and len(tr) == 18 and not set(tr) & set(ho)
    assert np.array_equal(ho, split_episodes(20, 0.1, seed=3)[1])
    assert not np.array_equal(ho, split_episodes(20, 0.1, seed=4)[1])
    assert len(split_episodes(2, 0.1, 0)[1]) == 1
    with pytest.raises(WmvlaError):
        split_episodes(1, 0.1, 0)


def test_training_loop_beats_copy_the_present_on_held_out_dynamics():
    rng = np.random.default_rng(0)
    z, starts, lengths = _rotation_episodes(rng, 60, 16)
    episodes = [Episode(i, int(s), int(n), "t") for i, (s, n) in enumerate(zip(starts, lengths))]
    cfg = ProphetTrainConfig(cache="unused", history=3, horizon=3, width=48, depth=2, heads=4, steps=120,
                             batch_size=64, lr=3e-3, warmup_steps=10, eval_every=0, holdout_fraction=0.2, device="cpu")
    prophet, result, history = train_prophet(cfg, z.astype(np.float16), episodes, log=lambda *a: None)
    m = result["heldout"]
    assert set(result["heldout_episodes"]).isdisjoint(result["train_episodes"]) and len(result["heldout_episodes"]) == 12
    for k in range(3):
        assert m["mse"][k] < 0.3 * m["baseline_mse"][k], m
        assert m["cos_abs"][k] > m["baseline_cos_abs"][k], m
    assert history[0]["loss"] > history[-2]["loss"]


def test_cli_prophet_train_writes_metrics_and_a_loadable_prophet(tmp_path):
    from vla_core.cli import main

    ds = LeRobotDataset.open(make_libero_like(tmp_path / "ds", layout="v3_png", episodes=5, image_size=32,
                                              min_length=6, max_length=12), DatasetKeys())
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), device="cpu")
    cache = precompute_latents(ds, enc, tmp_path / "lat.fp16.npy", log=lambda *a: None)
    args = ["prophet", "train", str(cache.path), "--dataset", str(ds.root), "--steps", "20", "--width", "32",
            "--history", "3", "--horizon", "2", "--batch-size", "16", "--holdout-fraction", "0.4", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma == mb  # seeded
    assert len(ma["heldout"]["cos_abs"]) == 2 and ma["num_heldout_episodes"] == 2
    prophet, meta = load_prophet(tmp_path / "a")
    assert meta["world_spec"]["window"] == 2 and prophet.cfg.history == 3
    assert torch.allclose(prophet.latent_mean, torch.zeros(64)) is False  # normalisation travels with the weights
    assert main(args + ["--out", str(tmp_path / "a")]) == 2  # never overwritten silently
    assert main(["prophet", "train", str(cache.path), "--steps", "1"]) == 2  # --dataset is required
