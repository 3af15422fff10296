"""Latent cache: precompute == online rollout, resumable, atomic, and refuses every kind of mismatch."""

import dataclasses
import json

import numpy as np
import pytest

from vla_core.data.fixtures import make_libero_like
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.utils import WmvlaError
from vla_core.world.cache import LatentCache, meta_path, precompute_latents, progress_path
from vla_core.world.encoder import OnlineWorldEncoder, WorldEncoderSpec, build_world_encoder, clip_positions


CAM = "observation.images.image"
QUIET = dict(log=lambda *a: None)


def _open(path):
    return LeRobotDataset.open(path, DatasetKeys())


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _open(make_libero_like(tmp_path_factory.mktemp("ds") / "libero_like", layout="v3_png", episodes=5,
                                  image_size=32, min_length=6, max_length=14, seed=0))


@pytest.fixture(scope="module")
def enc():
    return build_world_encoder(WorldEncoderSpec(encoder="tiny", window=4, image_size=32, camera_key=CAM), device="cpu")


@pytest.fixture(scope="module")
def reference(ds, enc, tmp_path_factory):
    """A complete cache computed in one go (batches span episode boundaries)."""
    out = tmp_path_factory.mktemp("ref") / "lat.fp16.npy"
    return precompute_latents(ds, enc, out, batch_size=7, **QUIET)


def test_cache_rows_are_clips_clamped_inside_each_episode(ds, enc, reference):
    assert reference.latents.shape == (ds.num_frames, 64) and reference.latents.dtype == np.float16
    meta = json.loads(meta_path(reference.path).read_text())
    assert meta["complete"] and meta["spec"]["window"] == 4 and meta["spec"]["camera_key"] == CAM
    assert meta["dataset"] == ds.fingerprint() and meta["num_rows"] == ds.num_frames
    assert not progress_path(reference.path).exists()
    # every row = the encoder on frames max(start, t-3)..t of its own episode
    clips = []
    for ep in ds.episodes:
        frames = ds.frames(CAM, np.arange(ep.start, ep.start + ep.length))
        clips += [frames[clip_positions(t, 4)] for t in range(ep.length)]
    want = enc.encode_clips(np.stack(clips))
    assert np.allclose(reference.get(np.arange(ds.num_frames)), want, atol=2e-3, rtol=2e-3)
    # the first row of an episode is its first frame repeated, so it differs from the previous episode's end
    s = ds.episodes[1].start
    assert np.allclose(reference.get([s])[0], enc.encode_clips(ds.frames(CAM, [s] * 4)[None])[0], atol=2e-3)
    assert np.allclose(reference.mean, reference.get(np.arange(ds.num_frames)).mean(0), atol=1e-3)


def test_online_rollout_latents_equal_cached_latents(ds, reference):
    """Evaluation builds its encoder from the cache's spec and feeds frames one step at a time."""
    online = OnlineWorldEncoder(reference.spec, num_slots=2, device="cpu")
    assert online.spec == reference.spec
    for slot, ep in enumerate(ds.episodes[:2]):
        online.reset(slot)
        frames = ds.frames(online.camera_key, np.arange(ep.start, ep.start + ep.length))
        got = np.stack([online.push(slot, f) for f in frames])
        cached = reference.get(np.arange(ep.start, ep.start + ep.length))
        np.testing.assert_allclose(got.astype(np.float16).astype(np.float32), cached, atol=1e-3, rtol=1e-3)
    # the spec records the dataset's frame size: rollout frames of another size are refused, not resized
    assert reference.spec.frame_shape == (32, 32)
    with pytest.raises(WmvlaError, match=r"uint8 \(32, 32, 3\) frames of camera 'observation.images.image'"):
        online.push(0, np.zeros((64, 64, 3), np.uint8))


def test_workers_and_small_blocks_give_identical_latents(ds, enc, reference, tmp_path):
    """Blocks split episodes (ClipBuffer carries frames across blocks); worker processes decode mp4 or PNG."""
    out = tmp_path / "w.fp16.npy"
    got = precompute_latents(ds, enc, out, batch_size=5, num_workers=2, block_size=3, **QUIET)
    np.testing.assert_array_equal(np.asarray(got.latents), np.asarray(reference.latents))


def test_resume_after_interrupt_gives_identical_results(ds, enc, reference, tmp_path):
    out = tmp_path / "r.fp16.npy"
    with pytest.raises(KeyboardInterrupt):
        precompute_latents(ds, enc, out, batch_size=4, checkpoint_every_s=0, _interrupt_after_episodes=2, **QUIET)
    assert not meta_path(out).exists()
    prog = json.loads(progress_path(out).read_text())
    assert prog["episodes_done"] >= 2
    with pytest.raises(WmvlaError, match="incomplete: its build stopped after"):
        LatentCache.open(out)
    # a kill can leave rows after the checkpoint half-written: they must be recomputed, not trusted
    mm = np.load(out, mmap_mode="r+")
    mm[ds.episodes[prog["episodes_done"]].start :] = 7.0
    mm.flush()
    del mm
    lines = []
    got = precompute_latents(ds, enc, out, batch_size=4, log=lines.append)
    assert any("resuming" in line for line in lines)
    np.testing.assert_array_equal(np.asarray(got.latents), np.asarray(reference.latents))
    assert not progress_path(out).exists()
    # a second run finds it complete and does nothing
    lines.clear()
    precompute_latents(ds, enc, out, **dict(log=lines.append))
    assert any("already complete" in line for line in lines)


def test_partial_cache_with_other_settings_is_not_resumed(ds, enc, tmp_path):
    out = tmp_path / "p.fp16.npy"
    with pytest.raises(KeyboardInterrupt):
        precompute_latents(ds, enc, out, checkpoint_every_s=0, _interrupt_after_episodes=1, **QUIET)
    enc1 = build_world_encoder(dataclasses.replace(enc.spec, window=1, revision=None), device="cpu")
    with pytest.raises(WmvlaError, match="partial build of latents with different settings.*\n.*window"):
        precompute_latents(ds, enc1, out, **QUIET)


def test_partial_array_of_another_shape_is_not_resumed(ds, enc, tmp_path):
    """A partial build whose array was replaced (another shape or dtype) is refused before any row is written:
    the shared start of every resumable cache build (world latents and vision features)."""
    out = tmp_path / "s.fp16.npy"
    with pytest.raises(KeyboardInterrupt):
        precompute_latents(ds, enc, out, checkpoint_every_s=0, _interrupt_after_episodes=1, **QUIET)
    np.save(out, np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(WmvlaError, match=r"partial array is float32 \(3, 5\), expected float16 .*Fix: --overwrite"):
        precompute_latents(ds, enc, out, **QUIET)
    assert progress_path(out).exists() and not meta_path(out).exists()  # nothing lost: still resumable state


def test_open_refuses_spec_mismatches(ds, reference):
    path = reference.path
    LatentCache.open(path, expect=WorldEncoderSpec(encoder="tiny", window=4), dataset=ds)  # matches
    with pytest.raises(WmvlaError, match=r"window: expected 1, found 4[\s\S]*--window 1"):
        LatentCache.open(path, expect=WorldEncoderSpec(encoder="tiny", window=1))
    with pytest.raises(WmvlaError, match="encoder: expected 'facebook/vjepa2-vitg-fpc64-256', found 'tiny'"):
        LatentCache.open(path, expect=WorldEncoderSpec(encoder="facebook/vjepa2-vitg-fpc64-256", window=4))
    with pytest.raises(WmvlaError, match="dim: expected 1408, found 64"):
        LatentCache.open(path, expect=WorldEncoderSpec(encoder="tiny", window=4, dim=1408))
    with pytest.raises(WmvlaError, match="camera_key"):
        LatentCache.open(path, expect=WorldEncoderSpec(encoder="tiny", camera_key="observation.images.image2"))


def _copy_cache(src: LatentCache, dst_dir):
    dst = dst_dir / src.path.name
    np.save(dst, np.asarray(src.latents))
    meta_path(dst).write_text(meta_path(src.path).read_text())
    return dst


def test_open_refuses_nan_rows_and_names_them(ds, reference, tmp_path):
    path = _copy_cache(reference, tmp_path)
    mm = np.load(path, mmap_mode="r+")
    mm[3, 5] = np.nan
    mm[ds.episodes[2].start] = np.inf
    mm.flush()
    del mm
    ep2 = ds.episodes[2].episode_index
    with pytest.raises(WmvlaError, match=rf"NaN/inf in 2 row\(s\): 3, {ds.episodes[2].start} \(episodes \[0, {ep2}\]\)"):
        LatentCache.open(path, dataset=ds)


def test_open_refuses_wrong_row_count_and_torn_files(ds, reference, tmp_path):
    path = _copy_cache(reference, tmp_path)
    np.save(path, np.asarray(reference.latents)[:-1])  # array no longer matches its spec
    with pytest.raises(WmvlaError, match="do not belong together"):
        LatentCache.open(path)
    meta = json.loads(meta_path(path).read_text())
    meta["num_rows"] -= 1
    meta_path(path).write_text(json.dumps(meta))
    with pytest.raises(WmvlaError, match=rf"has {ds.num_frames - 1} rows but the dataset .* has {ds.num_frames} frames"):
        LatentCache.open(path, dataset=ds)
    meta_path(path).unlink()
    with pytest.raises(WmvlaError, match="no spec file"):
        LatentCache.open(path)
    with pytest.raises(WmvlaError, match="no latent cache"):
        LatentCache.open(tmp_path / "nothing.fp16.npy")


def test_open_refuses_a_dataset_changed_since_caching(enc, tmp_path):
    root = tmp_path / "changing"
    kw = dict(layout="v3_png", image_size=32, min_length=6, max_length=9, seed=1)
    ds = _open(make_libero_like(root, episodes=3, num_tasks=1, **kw))
    cache = precompute_latents(ds, enc, tmp_path / "c.fp16.npy", **QUIET)
    # the same content in another folder is the same dataset (location is recorded, not compared)
    import shutil

    moved = _open(shutil.copytree(root, tmp_path / "moved"))
    assert moved.fingerprint()["source"] != ds.fingerprint()["source"]
    LatentCache.open(cache.path, dataset=moved)
    # regenerated with the same frame count but other task labels: only the fingerprint can tell
    relabelled = _open(make_libero_like(root, episodes=3, num_tasks=3, **kw))
    assert relabelled.num_frames == ds.num_frames
    with pytest.raises(WmvlaError, match=r"dataset changed since latent cache[\s\S]*content_hash"):
        LatentCache.open(cache.path, dataset=relabelled)
    with pytest.raises(WmvlaError, match="content_hash[\\s\\S]*--overwrite"):
        precompute_latents(relabelled, enc, cache.path, **QUIET)  # refuses to mix, suggests --overwrite
    grown = _open(make_libero_like(root, episodes=4, num_tasks=3, **kw))
    with pytest.raises(WmvlaError, match=rf"has {ds.num_frames} rows but the dataset .* has {grown.num_frames} frames"):
        LatentCache.open(cache.path, dataset=grown)
    again = precompute_latents(grown, enc, cache.path, overwrite=True, **QUIET)
    assert again.latents.shape[0] == grown.num_frames
    LatentCache.open(cache.path, dataset=grown)


def test_cli_latents_writes_the_default_layout(ds, tmp_path, monkeypatch):
    from vla_core.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["latents", str(ds.root), "--encoder", "tiny", "--window", "1", "--image-size", "32",
               "--num-workers", "0", "--batch-size", "8"])
    assert rc == 0
    path = tmp_path / "cache" / "libero_like" / "train_world_latents_tiny_m1.fp16.npy"
    cache = LatentCache.open(path, expect=WorldEncoderSpec(encoder="tiny", window=1), dataset=ds)
    assert cache.spec.window == 1 and cache.num_rows == ds.num_frames
    rc = main(["latents", str(ds.root), "--window", "2", "--image-size", "32", "--num-workers", "0",
               "--out", str(tmp_path / "elsewhere")])
    assert rc == 0 and (tmp_path / "elsewhere" / "train_world_latents_tiny_m2.fp16.json").exists()
    assert main(["latents", str(ds.root), "--camera-key", "nope", "--num-workers", "0"]) == 2


@pytest.mark.slow
def test_sigkill_mid_precompute_then_resume_matches(tmp_path):
    """A real kill -9 at an arbitrary moment (not a hook): the resumed cache equals an uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = make_libero_like(tmp_path / "ds", layout="v3_png", episodes=20, image_size=32, min_length=15, max_length=25)
    out = tmp_path / "k.fp16.npy"
    script = (
        "import sys\n"
        "from vla_core.data.lerobot import LeRobotDataset\n"
        "from vla_core.world.cache import precompute_latents\n"
        "from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder\n"
        "ds = LeRobotDataset.open(sys.argv[1])\n"
        "enc = build_world_encoder(WorldEncoderSpec(encoder='tiny', window=4, image_size=32), 'cpu')\n"
        "precompute_latents(ds, enc, sys.argv[2], batch_size=1, block_size=4, checkpoint_every_s=0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), str(out)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            p = progress_path(out)
            if p.exists() and json.loads(p.read_text() or "{}").get("episodes_done", 0) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, "precompute finished before it could be killed"
            time.sleep(0.01)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not meta_path(out).exists()
    ds = _open(root)
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=4, image_size=32), device="cpu")
    resumed = precompute_latents(ds, enc, out, batch_size=8, **QUIET)
    fresh = precompute_latents(ds, enc, tmp_path / "fresh.fp16.npy", batch_size=8, **QUIET)
    np.testing.assert_allclose(np.asarray(resumed.latents, dtype=np.float32),
                               np.asarray(fresh.latents, dtype=np.float32), atol=1e-3, rtol=1e-3)
