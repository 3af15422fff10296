"""World encoder: preprocessing as VJEPA2VideoProcessor, clip clamping, tubelet padding, online encoder."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vla_core.utils import WmvlaError
from vla_core.world.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipBuffer,
    OnlineWorldEncoder,
    WorldEncoderSpec,
    build_world_encoder,
    clip_positions,
    preprocess_frames,
    resize_size_for_crop,
)



def _smooth_image(rng, h, w):
    small = (rng.random((max(h // 8, 2), max(w // 8, 2), 3)) * 255).astype(np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def test_resize_size_matches_transformers_video_processor():
    from transformers.models.vjepa2.video_processing_vjepa2 import VJEPA2VideoProcessor

    assert resize_size_for_crop(VJEPA2VideoProcessor.crop_size) == VJEPA2VideoProcessor.size["shortest_edge"] == 292


@pytest.mark.parametrize("hw", [(256, 256), (128, 128), (300, 200), (240, 320)])
def test_preprocessing_matches_a_pil_reference(hw):
    """Shorter side -> 292 (bilinear), centre crop 256, /255, ImageNet mean/std: within one uint8 level of PIL."""
    h, w = hw
    img = _smooth_image(np.random.default_rng(h + w), h, w)
    out = preprocess_frames(torch.from_numpy(img[None]), 256)[0].permute(1, 2, 0).numpy()
    nh, nw = (292, int(292 * w / h)) if h <= w else (int(292 * h / w), 292)
    ref = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.float64)
    top, left = int((nh - 256) / 2), int((nw - 256) / 2)
    ref = (ref[top : top + 256, left : left + 256] / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    err_levels = np.abs(out - ref) * np.array(IMAGENET_STD) * 255
    assert out.shape == (256, 256, 3)
    assert err_levels.max() <= 1.01 and err_levels.mean() < 0.3


def test_clip_buffer_clamps_at_episode_start_and_resets():
    for m in (1, 3, 4):
        buf = ClipBuffer(m)
        for t in range(7):
            assert buf.push(t) == clip_positions(t, m)
        buf.reset()
        assert buf.push(100) == [100] * m  # a new episode never sees the previous one
    assert clip_positions(1, 4) == [0, 0, 0, 1]
    # the same clamping as the data module's windows (used for the Prophet's history)
    from vla_core.data.windows import clamp_indices, history_offsets

    for t in range(6):
        idx, _ = clamp_indices(10 + t, 10, 6, history_offsets(4))
        assert (idx - 10).tolist() == clip_positions(t, 4)
    with pytest.raises(WmvlaError):
        ClipBuffer(0)


@pytest.fixture(scope="module")
def tiny():
    return build_world_encoder(WorldEncoderSpec(encoder="tiny", window=4, image_size=32), device="cpu")


def test_tiny_encoder_is_seeded_and_resolves_its_spec(tiny):
    assert tiny.spec.dim == 64 and tiny.spec.image_size == 32 and tiny.spec.precision == "fp32"
    assert tiny.spec.revision == "random-seed0"
    again = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=4, image_size=32), device="cpu")
    other = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=4, image_size=32, seed=1), device="cpu")
    clips = np.random.default_rng(0).integers(0, 256, (3, 4, 40, 48, 3), dtype=np.uint8)
    z = tiny.encode_clips(clips)
    assert z.shape == (3, 64) and z.dtype == np.float32 and np.isfinite(z).all()
    assert np.array_equal(z, again.encode_clips(clips))
    assert not np.allclose(z, other.encode_clips(clips))
    assert np.abs(z[0] - z[1]).max() > 1e-3  # features depend on the images


def test_odd_windows_are_left_padded_with_the_oldest_frame(tiny):
    frames = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    m1 = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=1, image_size=32), device="cpu")
    m3 = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=3, image_size=32), device="cpu")
    # m=1: [f, f], the same as transformers' own single-frame duplication
    z1 = m1.encode_clips(frames[None, 2:3])
    z1_ref = tiny.model(pixel_values_videos=m1.preprocess_frames(frames[2:3])[None], skip_predictor=True)
    assert np.allclose(z1, z1_ref.last_hidden_state.mean(1).detach().numpy(), atol=1e-6)
    # m=3: [f0, f0, f1, f2] through the 4-frame path (newest frame kept)
    z3 = m3.encode_clips(frames[None])
    z4 = tiny.encode_clips(frames[None, [0, 0, 1, 2]])
    assert np.allclose(z3, z4, atol=1e-6)
    with pytest.raises(WmvlaError, match="window is m=4"):
        tiny.encode_preprocessed(torch.zeros(1, 3, 3, 32, 32))


def test_last_pooling_averages_the_newest_tubelet(tiny):
    last = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=4, image_size=32, pooling="last"), device="cpu")
    frames = np.random.default_rng(2).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)
    pre = tiny.preprocess_frames(frames[0])[None]
    hidden = tiny.model(pixel_values_videos=pre, skip_predictor=True).last_hidden_state  # [1, 2*16, 64]
    assert hidden.shape[1] == 2 * (32 // 8) ** 2
    assert np.allclose(last.encode_clips(frames), hidden[:, 16:].mean(1).detach().numpy(), atol=1e-6)
    assert np.allclose(tiny.encode_clips(frames), hidden.mean(1).detach().numpy(), atol=1e-6)


def test_online_encoder_equals_clamped_clips(tiny):
    rng = np.random.default_rng(3)
    ep_a = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ep_b = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    online = OnlineWorldEncoder(tiny.spec, num_slots=2, encoder=tiny)
    got_a, got_b = [], []
    for t in range(5):  # two env slots stepping together, slot 1 starts a new episode at t=2
        if t == 2:
            online.reset(1)
        if t < 2:
            got_a.append(online.push(0, ep_a[t]))
            continue
        za, zb = online.push_many([0, 1], [ep_a[t], ep_b[t - 2]])
        got_a.append(za)
        got_b.append(zb)
    want_a = tiny.encode_clips(np.stack([ep_a[clip_positions(t, 4)] for t in range(5)]))
    want_b = tiny.encode_clips(np.stack([ep_b[clip_positions(t, 4)] for t in range(3)]))
    assert np.allclose(np.stack(got_a), want_a, atol=1e-5)
    assert np.allclose(np.stack(got_b), want_b, atol=1e-5)
    with pytest.raises(WmvlaError, match="does not match the spec"):
        OnlineWorldEncoder(dataclasses.replace(tiny.spec, window=1), encoder=tiny)

    # a whole round at once (the executed steps of a chunk per slot, different counts, batches split by
    # max_batch) gives the same latents as pushing frame by frame
    seq = OnlineWorldEncoder(tiny.spec, num_slots=2, encoder=tiny)
    first = seq.push_sequences([0, 1], [list(ep_a[:3]), list(ep_b[:1])], max_batch=3)
    second = seq.push_sequences([1, 0], [list(ep_b[1:3]), list(ep_a[3:5])], max_batch=3)
    assert [z.shape[0] for z in first + second] == [3, 1, 2, 2]
    assert np.allclose(np.concatenate([first[0], second[1]]), want_a, atol=1e-5)
    assert np.allclose(np.concatenate([first[1], second[0]]), want_b, atol=1e-5)
    with pytest.raises(WmvlaError, match="frames of camera"):
        seq.push_sequences([0], [[np.zeros((32, 32, 3), np.float32)]])


def test_spec_mismatches_treat_unset_fields_as_wildcards(tiny):
    want = WorldEncoderSpec(encoder="tiny", window=4)
    assert want.mismatches(tiny.spec) == []
    diff = WorldEncoderSpec(encoder="tiny", window=1, dim=1408).mismatches(tiny.spec)
    assert diff == ["window: expected 1, found 4", "dim: expected 1408, found 64"]
    with pytest.raises(WmvlaError):
        WorldEncoderSpec(window=0)


def test_local_checkpoint_loads_through_from_pretrained(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "ckpt")
    enc = build_world_encoder(WorldEncoderSpec(encoder=str(tmp_path / "ckpt"), window=4), device="cpu")
    assert enc.spec.revision.startswith("local-") and enc.spec.image_size == 32 and enc.spec.dim == 64
    assert enc.spec.source == "vjepa"
    clips = np.random.default_rng(4).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    assert np.allclose(enc.encode_clips(clips), tiny.encode_clips(clips), atol=1e-6)
    assert build_world_encoder(enc.spec, device="cpu").spec == enc.spec  # rebuilt from its own record
    with pytest.raises(WmvlaError, match="changed: its fingerprint"):
        build_world_encoder(dataclasses.replace(enc.spec, revision="local-0000"), device="cpu")
    with pytest.raises(WmvlaError, match="hidden size 64"):
        build_world_encoder(WorldEncoderSpec(encoder=str(tmp_path / "ckpt"), dim=1024), device="cpu")
    with pytest.raises(WmvlaError, match="could not load the V-JEPA 2 encoder"):
        build_world_encoder(WorldEncoderSpec(encoder=str(tmp_path / "missing")), device="cpu")
