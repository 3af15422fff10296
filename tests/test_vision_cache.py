"""Issue 21: the frozen vision tower's outputs read from a cache instead of computed (CPU, tiny model).

- cached features give the live tower's loss and every trainable parameter's gradient, and the tower's
  modules do not run (spies); a rollout (`predict_action`) still runs the tower live;
- the cache built by `precompute_vision_features` holds the tower's outputs for every frame x camera, is
  written atomically (spec last), resumes after an interruption, and is refused when unfinished, for another
  policy config (image size, backbone weights: the differing fields are named) and for a trained tower;
- `wmvla train --vision-cache` trains with it end to end (no image decoded, no tower block run), logs the same
  losses as the live tower, and resumes; `wmvla vision-cache` builds the cache that run accepts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_core.data.lerobot import LeRobotDataset
from vla_core.policy.modeling import VLAPolicy
from vla_core.policy.tiny import random_batch, random_observation, tiny_norm_stats, tiny_policy_config
from vla_core.policy.vision_cache import (
    VisionFeatureCache,
    build_frozen_backbone,
    precompute_vision_features,
    spec_for,
    tower_features,
)
from vla_core.train.config import TrainConfig, get_preset, resolve_for_data
from vla_core.train.loop import train
from vla_core.utils import WmvlaError, read_jsonl
from vla_core.world.cache import _Interrupted, meta_path, progress_path

QUIET = dict(log=lambda *a: None)


def grads(policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in policy.trainable_parameters() if p.grad is not None}


def tower_spies(policy) -> list:
    """Forward hooks on every module of the tower that computes (patch embedding, blocks, mergers)."""
    calls = []
    visual = policy.backbone.vision_tower
    for name, module in visual.named_modules():
        if name and "." not in name or name.startswith("blocks."):
            module.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("finetune", ["frozen_vision", "lora"])
def test_cached_features_give_the_live_loss_and_gradients_without_running_the_tower(finetune):
    cfg = tiny_policy_config(finetune=finetune, memory="pred", head="flow")
    policy = VLAPolicy(cfg, tiny_norm_stats(cfg))
    inputs = policy.prepare(random_batch(cfg, batch_size=3, seed=1))
    calls = tower_spies(policy)
    results = []
    b, n_cams = inputs["images"].shape[:2]
    feats = tower_features(policy.backbone, inputs["images"].flatten(0, 1), autocast=False)
    assert feats.shape == (b * n_cams, 1 + len(policy.backbone.vision_tower.deepstack_visual_indexes),
                           policy.backbone.tokens_per_image, policy.backbone.hidden_size)
    for cached in (None, feats.unflatten(0, (b, n_cams))):
        policy.zero_grad(set_to_none=True)
        calls.clear()
        batch = inputs if cached is None else {**inputs, "vision_features": cached}
        out = policy(batch, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        results.append((float(out["loss"].detach()), grads(policy), list(calls)))
    (live_loss, live_grads, live_calls), (loss, cached_grads, cached_calls) = results
    assert live_calls and any(c.startswith("blocks.") for c in live_calls)  # the spies see the live tower
    assert cached_calls == []  # ... and nothing of it with the cache
    assert loss == pytest.approx(live_loss, rel=1e-6)
    assert live_grads.keys() == cached_grads.keys() and live_grads
    for n in live_grads:
        torch.testing.assert_close(cached_grads[n], live_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    calls.clear()
    policy.predict_action(random_observation(cfg), world_history=np.zeros((cfg.world_history, cfg.world_dim)))
    assert any(c.startswith("blocks.") for c in calls)  # rollouts run the tower live


def test_a_trained_tower_refuses_cached_features():
    with pytest.raises(WmvlaError, match=r"needs a frozen vision tower.*finetune='full'.*frozen_vision"):
        TrainConfig(vision_cache="x.npy", policy=tiny_policy_config(finetune="full"))
    cfg = tiny_policy_config(finetune="full", memory="none")
    policy = VLAPolicy(cfg, tiny_norm_stats(cfg))
    inputs = policy.prepare(random_batch(cfg, batch_size=1))
    feats = tower_features(policy.backbone, inputs["images"].flatten(0, 1), autocast=False)
    with pytest.raises(WmvlaError, match="the vision tower trains"):
        policy({**inputs, "vision_features": feats.unflatten(0, inputs["images"].shape[:2])})


# ------------------------------------------------------------------------------------------ the cache


def run_cfg(data, tmp_path, **changes) -> TrainConfig:
    cfg = get_preset("tiny")
    policy = dataclasses.replace(cfg.policy, finetune="frozen_vision")
    return dataclasses.replace(cfg, dataset=data["dataset"], latents=data["latents"], out_root=str(tmp_path),
                               policy=policy, **changes)


def policy_cfg(data, cfg: TrainConfig):
    """The policy config a training run of `cfg` resolves (cameras from the keys)."""
    ds = LeRobotDataset.open(cfg.dataset, cfg.keys)
    return ds, resolve_for_data(cfg, ds.features, None)[0].policy


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """A cache built with an interruption and a resume, for the tiny preset with a frozen tower."""
    root = tmp_path_factory.mktemp("vcache")
    ds, pcfg = policy_cfg(data, run_cfg(data, root))
    backbone = build_frozen_backbone(pcfg)
    out = root / "feats.npy"
    with pytest.raises(_Interrupted):
        precompute_vision_features(ds, backbone, pcfg, out, batch_size=5, _interrupt_after_episodes=3, **QUIET)
    assert progress_path(out).exists() and not meta_path(out).exists()
    with pytest.raises(WmvlaError, match=r"incomplete: its build stopped after 3 of 8 episodes"):
        VisionFeatureCache.open(out)
    cache = precompute_vision_features(ds, backbone, pcfg, out, batch_size=5, **QUIET)
    return {"ds": ds, "pcfg": pcfg, "backbone": backbone, "cache": cache, "path": out}


def test_cache_rows_are_the_towers_outputs_for_every_frame_and_camera(built):
    ds, pcfg, backbone, cache = built["ds"], built["pcfg"], built["backbone"], built["cache"]
    assert meta_path(cache.path).exists() and not progress_path(cache.path).exists()
    assert cache.num_rows == ds.num_frames and cache.spec.dtype == "float32"
    assert cache.spec.camera_keys == tuple(pcfg.camera_keys) and len(pcfg.camera_keys) == 2
    assert cache.array.nbytes == cache.num_rows * cache.spec.entry_bytes  # the size `wmvla vision-cache` announces
    from vla_core.policy.processing import resize_images

    rows = np.array([0, ds.episodes[2].start + 1, ds.episodes[4].start, ds.num_frames - 1])  # both sides of the resume
    got = cache.get(rows)
    for c, key in enumerate(pcfg.camera_keys):
        want = tower_features(backbone, resize_images(np.asarray(ds.frames(key, rows)), pcfg.image_size), False)
        torch.testing.assert_close(got[:, c], want, rtol=1e-5, atol=1e-6)


def test_bf16_cache_stores_the_bf16_bits_exactly(built, tmp_path):
    ds, pcfg = built["ds"], dataclasses.replace(built["pcfg"], autocast_bf16=True, frozen_dtype="float32")
    backbone = build_frozen_backbone(pcfg)
    cache = precompute_vision_features(ds, backbone, pcfg, tmp_path / "bf16.npy", batch_size=64, **QUIET)
    assert cache.array.dtype == np.uint16 and cache.spec.dtype == "bfloat16"
    got = cache.get([3, 4])
    from vla_core.policy.processing import resize_images

    key = pcfg.camera_keys[1]
    want = tower_features(backbone, resize_images(np.asarray(ds.frames(key, [3, 4])), pcfg.image_size), True)
    assert got.dtype == torch.bfloat16 and torch.equal(got[:, 1], want.to(torch.bfloat16))
    with pytest.raises(WmvlaError, match=r"dtype: expected 'float32', found 'bfloat16'"):
        VisionFeatureCache.open(cache.path, expect=built["cache"].spec)


def test_cache_for_another_config_or_dataset_is_refused_naming_the_fields(built, data):
    path, pcfg = built["path"], built["pcfg"]
    with pytest.raises(WmvlaError, match=r"image_size: expected 64, found 32(.|\n)*tokens_per_image(.|\n)*"
                                          r"wmvla vision-cache"):
        other = dataclasses.replace(pcfg, image_size=64)
        VisionFeatureCache.open(path, expect=spec_for(other, build_frozen_backbone(other)))
    with pytest.raises(WmvlaError, match=r"vision_weights_sha256: expected '[0-9a-f]+', found") as err:
        other = dataclasses.replace(pcfg, init_seed=pcfg.init_seed + 1)
        VisionFeatureCache.open(path, expect=spec_for(other, build_frozen_backbone(other)))
    assert "image_size" not in str(err.value)  # only what differs is named
    npy = Path(path)
    meta = meta_path(npy).read_text()
    meta_path(npy).unlink()
    try:
        with pytest.raises(WmvlaError, match=r"has no spec file .* its build did not complete.*wmvla vision-cache"):
            VisionFeatureCache.open(npy)
    finally:
        meta_path(npy).write_text(meta)


def test_train_with_the_cache_logs_the_live_losses_and_resumes(built, data, tmp_path, monkeypatch, capsys):
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    block_calls = []
    block_forward = modeling_qwen3_vl.Qwen3VLVisionBlock.forward

    def spy(self, *a, **kw):
        block_calls.append(1)
        return block_forward(self, *a, **kw)

    monkeypatch.setattr(modeling_qwen3_vl.Qwen3VLVisionBlock, "forward", spy)
    decoded = []
    frames = LeRobotDataset.frames

    def frames_spy(self, key, *a, **kw):
        decoded.append(key)
        return frames(self, key, *a, **kw)

    monkeypatch.setattr(LeRobotDataset, "frames", frames_spy)  # the tiny preset loads in-process (0 workers)
    common = dict(stop_after=None, log_every=1, val_every=6, ckpt_every=3)
    live = train(run_cfg(data, tmp_path / "live", **common))
    assert block_calls and decoded  # the spies see the live tower and the image decoding
    block_calls.clear()
    decoded.clear()
    cached_cfg = run_cfg(data, tmp_path / "cached", vision_cache=str(built["path"]), **common)
    first = train(dataclasses.replace(cached_cfg, stop_after=3))
    assert first["finished"] is False
    second = train(cached_cfg)
    assert second["finished"]
    assert block_calls == [] and decoded == []  # training and validation read the cache, decode no image
    assert "vision tower outputs read from" in capsys.readouterr().out

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_jsonl(Path(run["run_dir"]) / "train_log.jsonl")]

    got, want = losses(second), losses(live)
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4)
    with pytest.raises(WmvlaError, match="vision_weights_sha256"):  # another seed: other tower weights
        train(dataclasses.replace(cached_cfg, seed=1, out_root=str(tmp_path / "seed1")))


def test_cli_builds_the_cache_a_training_run_of_the_same_flags_accepts(built, data, tmp_path, capsys):
    from vla_core.cli import main

    flags = ["--preset", "tiny", "--dataset", data["dataset"], "--policy.finetune", "frozen_vision"]
    assert main(["vision-cache", "--preset", "tiny", "--dataset", data["dataset"], "--policy.finetune", "full"]) != 0
    assert "needs a frozen vision tower" in capsys.readouterr().err
    assert main(["vision-cache", *flags, "--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = next(tmp_path.rglob("train_vision_features_tiny_s32_*.float32.npy"))
    assert f"--vision-cache {path}" in out
    cache = VisionFeatureCache.open(path, expect=built["cache"].spec, dataset=built["ds"])  # the run's spec
    assert torch.equal(cache.get(np.arange(cache.num_rows)), built["cache"].get(np.arange(cache.num_rows)))
    assert main(["vision-cache", *flags, "--cache-root", str(tmp_path)]) == 0  # complete: nothing to do
    assert "already complete" in capsys.readouterr().out
