"""World encoder: frames of one camera -> one latent per dataset step (V-JEPA 2 through transformers).

One latent z_t summarises the clip of the last `window` (m) frames of an episode, ending at step t. At the
start of an episode the clip is clamped by repeating the first frame (`ClipBuffer`), never by reaching into
the previous episode. Precompute (`vla_core.world.cache`) and online rollout (`OnlineWorldEncoder`) both go
through exactly the same objects: `WorldEncoder.preprocess_frames` (once per frame) -> `ClipBuffer.push`
-> `WorldEncoder.encode_preprocessed`. The encoder settings are one `WorldEncoderSpec`, stored with the
cache and the checkpoint; evaluation rebuilds the encoder from that record, so an m=1 vs m=4 mismatch (as
in the first attempt at this project) cannot happen silently.

Preprocessing reproduces transformers' `VJEPA2VideoProcessor` in plain torch (there is no torchvision here):
resize the shorter side to int(S * 256 / 224) (292 for S=256) with bilinear + antialias, round to uint8
levels as torchvision does for uint8 input, centre crop S x S, rescale by 1/255, normalise with ImageNet
mean/std.

Temporal tubelets: V-JEPA 2 embeds frames in tubelets of 2 (a Conv3d with temporal stride 2). A clip whose
length is not a multiple of the tubelet size would silently lose its last frames in the strided conv, so
the clip is left-padded by repeating its oldest frame: m=1 -> [f_t, f_t] (what transformers itself does for
a single frame), m=3 -> [f_t-2, f_t-2, f_t-1, f_t]. The newest frame is always encoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from vla_core.utils import WmvlaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when the preprocessing code changes in a way that changes latents: caches record it and refuse
# to be mixed with a different version.
PREPROCESSING_ID = "vjepa2-v1"
PREPROCESSING_DESCRIPTION = (
    "per frame: resize shorter side to int(S*256/224) (bilinear, antialias, rounded to uint8 levels), "
    "centre crop SxS, x/255, normalise ImageNet mean (0.485,0.456,0.406) std (0.229,0.224,0.225); "
    "clip = last m frames of the episode, clamped at the episode start by repeating the first frame, "
    "left-padded with its oldest frame to a multiple of the tubelet size (2)"
)

TINY = "tiny"

# Sizes of the "tiny" encoder: the same VJEPA2Model class with seeded random weights. Its latents are
# random features of the images (they change with the image, but mean nothing learned); it exists for
# tests and the offline demo on a CPU machine, never as a stand-in for V-JEPA 2 results.
TINY_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    mlp_ratio=2.0,
    patch_size=8,
    pred_hidden_size=32,
    pred_num_hidden_layers=1,
    pred_num_attention_heads=4,
    num_pooler_layers=1,
)
TINY_IMAGE_SIZE = 64


@dataclass(frozen=True)
class WorldEncoderSpec:
    """Everything that determines a world latent. Stored beside every latent cache and in checkpoints.

    Fields left as None / "auto" are resolved by `build_world_encoder` (the encoder's `.spec` is the
    resolved one); when used as an *expectation* (`LatentCache.open(expect=...)`) they match anything.
    """

    # "tiny" (seeded random weights, built in code) | hub id (facebook/vjepa2-vitl-fpc64-256) | local path
    encoder: str = TINY
    revision: str | None = None  # hub revision; for a local path, resolved to a hash of config + weight sizes
    window: int = 4  # m: frames per clip (the clip ends at the current step)
    camera_key: str = "observation.images.image"
    image_size: int | None = None  # crop size S; None -> the checkpoint's crop_size (256), 64 for tiny
    pooling: Literal["mean", "last"] = "mean"  # mean over all tokens | mean over the newest tubelet's tokens
    dim: int | None = None  # latent size D (hidden size of the encoder); resolved from the model
    dtype: Literal["float16"] = "float16"  # storage dtype of cached latents
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # compute; auto -> bf16 on CUDA, fp32 on CPU
    preprocessing: str = PREPROCESSING_ID
    seed: int = 0  # weight seed of the tiny encoder (ignored for pretrained ones)
    # (H, W) of the camera frames the latents were computed from; filled in by the precompute from the
    # dataset. The online encoder refuses rollout frames of another size (a resize would change the latents).
    frame_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.frame_shape is not None:
            object.__setattr__(self, "frame_shape", tuple(int(x) for x in self.frame_shape))
        if self.window < 1:
            raise WmvlaError(f"WorldEncoderSpec.window must be >= 1, got {self.window}.")
        if self.pooling not in ("mean", "last"):
            raise WmvlaError(f"WorldEncoderSpec.pooling must be 'mean' or 'last', got {self.pooling!r}.")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise WmvlaError(f"WorldEncoderSpec.precision must be auto|bf16|fp32, got {self.precision!r}.")

    @property
    def source(self) -> str:
        """Short name used in cache file names: "tiny" or "vjepa"."""
        return TINY if self.encoder == TINY else "vjepa"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldEncoderSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise WmvlaError(f"world encoder spec has unknown fields {sorted(unknown)}; written by another wmvla version?")
        return cls(**d)

    def mismatches(self, found: "WorldEncoderSpec") -> list[str]:
        """Differences between this spec (as an expectation: None/"auto" match anything) and `found`."""
        out = []
        for f in dataclasses.fields(self):
            want, got = getattr(self, f.name), getattr(found, f.name)
            if want is None or want == "auto":
                continue
            if f.name == "seed" and self.encoder != TINY:
                continue
            if want != got:
                out.append(f"{f.name}: expected {want!r}, found {got!r}")
        return out


# --------------------------------------------------------------------------------------------- clips


class ClipBuffer:
    """Rolling buffer of the last m items of ONE episode; `push` returns the clip ending at the new item.

    The first push of an episode fills the buffer with m copies of the first item, so the clip at step t
    is items[max(0, t-m+1) .. t] - the same clamping as `vla_core.data.windows.clamp_indices` with offsets
    -(m-1)..0. Call `reset()` at every episode start. Items are opaque (preprocessed frame tensors in
    precompute and rollout; latents or indices work too).
    """

    def __init__(self, m: int):
        if m < 1:
            raise WmvlaError(f"ClipBuffer window must be >= 1, got {m}.")
        self.m = m
        self._items: deque = deque(maxlen=m)

    def reset(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Any) -> list:
        if not self._items:
            self._items.extend([item] * self.m)
        else:
            self._items.append(item)
        return list(self._items)


def clip_positions(t: int, m: int) -> list[int]:
    """Positions within the episode of the clip ending at step t (what ClipBuffer yields)."""
    return [max(0, t - m + 1 + j) for j in range(m)]


# -------------------------------------------------------------------------------------- preprocessing


def resize_size_for_crop(crop: int) -> int:
    """Shorter-side resize target of VJEPA2VideoProcessor: int(crop_size * 256 / 224)."""
    return int(crop * 256 / 224)


def preprocess_frames(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, crop, crop], as VJEPA2VideoProcessor (see module docstring)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise WmvlaError(f"expected frames uint8 [n, H, W, 3], got {tuple(frames.shape)} {frames.dtype}.")
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    short = resize_size_for_crop(crop)
    # torchvision's rule (default_to_square=False): shorter side -> `short`, longer side int(short*long/short_in)
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    if (new_h, new_w) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)  # torchvision returns uint8 for uint8 input
    top = int((new_h - crop) / 2.0)
    left = int((new_w - crop) / 2.0)
    x = x[:, :, top : top + crop, left : left + crop]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


# ------------------------------------------------------------------------------------------- encoder


def _local_revision(path: Path) -> str:
    """Fingerprint of a local checkpoint folder: hash of config.json and the weight files' names and sizes."""
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "local-" + h.hexdigest()[:16]


def tiny_vjepa2_config(image_size: int):
    from transformers import VJEPA2Config

    return VJEPA2Config(crop_size=image_size, **TINY_CONFIG)


class WorldEncoder:
    """A V-JEPA 2 encoder (VJEPA2Model) with its preprocessing, pooling and the resolved spec."""

    def __init__(self, spec: WorldEncoderSpec, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype):
        self.spec = spec
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        self.tubelet = int(model.config.tubelet_size)

    @property
    def dim(self) -> int:
        return int(self.spec.dim)

    def new_clip_buffer(self) -> ClipBuffer:
        return ClipBuffer(self.spec.window)

    @torch.no_grad()
    def preprocess_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] -> [n, 3, S, S] on the encoder's device, in its compute dtype."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        frames = frames.to(self.device, non_blocking=True)
        return preprocess_frames(frames, int(self.spec.image_size)).to(self.compute_dtype)

    def stack_clips(self, clips: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """ClipBuffer outputs (lists of m preprocessed frames) -> [B, m, 3, S, S] in one copy."""
        m = len(clips[0])
        flat = torch.stack([f for clip in clips for f in clip])
        return flat.view(len(clips), m, *flat.shape[1:])

    @torch.no_grad()
    def encode_preprocessed(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, m, 3, S, S] preprocessed clips -> float32 [B, D] pooled latents (on the device)."""
        if clips.shape[1] != self.spec.window:
            raise WmvlaError(
                f"clip has {clips.shape[1]} frames but this encoder's window is m={self.spec.window}; "
                "build clips with encoder.new_clip_buffer()."
            )
        pad = (-clips.shape[1]) % self.tubelet
        if pad:  # left-pad with the oldest frame so the newest frames are never dropped by the strided conv
            clips = torch.cat([clips[:, :1].expand(-1, pad, -1, -1, -1), clips], dim=1)
        x = clips.to(self.device, self.compute_dtype, non_blocking=True)
        hidden = self.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        if self.spec.pooling == "last":
            # tokens are ordered (time, height, width): the last H'*W' tokens are the newest tubelet
            side = int(self.spec.image_size) // int(_patch(self.model.config))
            hidden = hidden[:, -side * side :]
        return hidden.float().mean(dim=1)

    @torch.no_grad()
    def encode_clips(self, clips: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 [B, m, H, W, 3] -> float32 [B, D] (numpy). Convenience path for tests and small jobs."""
        clips_t = torch.as_tensor(clips)
        b, m = clips_t.shape[:2]
        pre = self.preprocess_frames(clips_t.reshape(b * m, *clips_t.shape[2:]))
        pre = pre.view(b, m, *pre.shape[1:])
        return self.encode_preprocessed(pre).cpu().numpy()


def _patch(config) -> int:
    p = config.patch_size
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_world_encoder(spec: WorldEncoderSpec, device: str | torch.device | None = "auto") -> WorldEncoder:
    """Build the encoder a spec describes; the returned `.spec` has every field resolved.

    Pretrained weights are loaded with `VJEPA2Model.from_pretrained(spec.encoder, revision=...)` from a
    local folder or the hub cache; nothing in this project downloads them implicitly in tests.
    """
    from transformers import VJEPA2Model

    dev = _resolve_device(device)
    precision = spec.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    if spec.encoder == TINY:
        image_size = spec.image_size or TINY_IMAGE_SIZE
        config = tiny_vjepa2_config(image_size)
        # seeded init without disturbing the caller's global RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = VJEPA2Model(config)
        revision = spec.revision or f"random-seed{spec.seed}"
    else:
        local = Path(spec.encoder).expanduser()
        try:
            if local.exists():
                revision = _local_revision(local)
                if spec.revision is not None and spec.revision != revision:
                    raise WmvlaError(
                        f"local encoder folder {local} changed: its fingerprint is {revision}, the spec (cache or "
                        f"checkpoint) records {spec.revision}. Fix: use the checkpoint the latents were made with, "
                        "or recompute the latents."
                    )
                model = VJEPA2Model.from_pretrained(str(local), attn_implementation="sdpa")
            else:
                model = VJEPA2Model.from_pretrained(spec.encoder, revision=spec.revision, attn_implementation="sdpa")
                revision = spec.revision or getattr(model.config, "_commit_hash", None) or "main"
        except (OSError, ValueError) as e:
            raise WmvlaError(
                f"could not load the V-JEPA 2 encoder {spec.encoder!r} (revision {spec.revision!r}): {e}\n"
                "Expected a local folder with config.json + weights or a hub id in the local HF cache. Fix: "
                f"`huggingface-cli download {spec.encoder}` on a machine with hub access and pass the local path, "
                "or `wmvla latents --encoder tiny` for random features (tests, demo)."
            ) from e
        config = model.config
        image_size = spec.image_size or int(config.crop_size)
    model = model.to(dev, compute_dtype).eval().requires_grad_(False)
    dim = int(config.hidden_size)
    if spec.dim is not None and spec.dim != dim:
        raise WmvlaError(f"spec says dim={spec.dim} but encoder {spec.encoder!r} has hidden size {dim}: the spec was "
                         "made for other weights. Use the encoder it names, or leave the width to the encoder "
                         "(`wmvla train --world.dim None`, the default).")
    if image_size % _patch(config):
        raise WmvlaError(f"image_size {image_size} is not a multiple of the patch size {_patch(config)}.")
    resolved = dataclasses.replace(spec, revision=revision, image_size=image_size, dim=dim, precision=precision)
    return WorldEncoder(resolved, model, dev, compute_dtype)


# -------------------------------------------------------------------------------------------- online


class OnlineWorldEncoder:
    """Encoder + one ClipBuffer per env slot, for closed-loop evaluation.

    Build it from the spec stored in the checkpoint / cache (`OnlineWorldEncoder(spec)`): same class,
    preprocessing and ClipBuffer as the precompute, so online latents equal cached ones for the same frames.
    """

    def __init__(self, spec: WorldEncoderSpec | dict, num_slots: int = 1, device: str | torch.device | None = "auto",
                 encoder: WorldEncoder | None = None):
        if isinstance(spec, dict):
            spec = WorldEncoderSpec.from_dict(spec)
        self.encoder = encoder if encoder is not None else build_world_encoder(spec, device)
        if encoder is not None:
            diff = spec.mismatches(encoder.spec)
            if diff:
                raise WmvlaError("OnlineWorldEncoder: the given encoder does not match the spec: " + "; ".join(diff))
        self.spec = self.encoder.spec
        self.buffers = [self.encoder.new_clip_buffer() for _ in range(num_slots)]

    @property
    def camera_key(self) -> str:
        return self.spec.camera_key

    def reset(self, slot: int) -> None:
        """Call at the start of every episode in `slot`."""
        self.buffers[slot].reset()

    def push(self, slot: int, frame: np.ndarray) -> np.ndarray:
        """Add the newest frame (uint8 [H, W, 3]) of the episode in `slot`; return its latent float32 [D]."""
        return self.push_many([slot], [frame])[0]

    def push_many(self, slots: Sequence[int], frames: Sequence[np.ndarray]) -> np.ndarray:
        """One frame per slot, encoded as one batch -> float32 [len(slots), D]."""
        return np.concatenate(self.push_sequences(slots, [[f] for f in frames]))

    @torch.no_grad()
    def push_sequences(self, slots: Sequence[int], frame_lists: Sequence[Sequence[np.ndarray]],
                       max_batch: int = 256) -> list[np.ndarray]:
        """Several frames per slot, oldest first (e.g. the executed steps of an action chunk) -> per slot float32
        [len(frames), D]. The clips are built in order per slot exactly as by repeated `push`, then encoded
        together in batches of up to `max_batch` clips: one encoder call for a whole round of a rollout
        instead of one per executed step (the encoder is most of the policy's cost in closed loop)."""
        if len(set(slots)) != len(slots):
            raise WmvlaError(f"push_many/push_sequences: each slot at most once per call, got {list(slots)}.")
        counts = [len(f) for f in frame_lists]
        flat = [np.asarray(f) for frames in frame_lists for f in frames]
        if not flat:
            return [np.zeros((0, self.spec.dim or 0), np.float32) for _ in slots]
        want = self.spec.frame_shape
        for f in flat:
            if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3 or (want is not None and f.shape[:2] != want):
                raise WmvlaError(
                    f"world encoder got a frame {f.dtype} {f.shape}; the latents were computed from uint8 "
                    f"{(*want, 3) if want else '[H, W, 3]'} frames of camera {self.spec.camera_key!r}. Fix: render "
                    "that camera at the dataset's resolution and orientation (a resize here would change the latents)."
                )
        pre = self.encoder.preprocess_frames(np.stack(flat))
        clips, i = [], 0
        for s, n in zip(slots, counts):
            for _ in range(n):
                clips.append(self.buffers[s].push(pre[i]))
                i += 1
        out = np.concatenate([
            self.encoder.encode_preprocessed(self.encoder.stack_clips(clips[b:b + max_batch])).cpu().numpy()
            for b in range(0, len(clips), max_batch)])
        return list(np.split(out, np.cumsum(counts)[:-1]))

