"""Precomputed outputs of a frozen vision tower: one entry per (dataset frame, camera), plus the spec that keys them.

    wmvla vision-cache --preset tiny --dataset DS --policy.finetune frozen_vision
    wmvla train --preset tiny --dataset DS --policy.finetune frozen_vision --vision-cache cache/DS/...npy

When the policy's vision tower is frozen (`finetune` frozen_vision / lora / heads_only) its output for a
training frame never changes, yet every step would run the tower on every image. The cache holds, per global
frame i and camera c, what the tower returns for that image after the policy's own preprocessing
(`processing.resize_images` to `image_size`, `pixel_values_from_images`): the merged tokens (`pooler_output`)
and the DeepStack features, stacked as

    [N_frames, n_cams, 1 + n_deepstack, tokens_per_image, d_text]

(row i = global frame i, cameras in `camera_keys` order, merged tokens first). bf16 runs store the bf16 bits
exactly (uint16 on disk, viewed as bfloat16 on load); fp32 runs store float32. Training reads these rows
instead of running the tower (`VLBackbone.forward(vision_features=...)`); evaluation and rollouts always run
the tower live. Size at Qwen3-VL-2B, 224 px: 4 x 49 x 2048 x 2 bytes = 0.8 MB per image (docs/benchmarks.md).

Files, as the world-latent cache (vla_core/world/cache.py, whose helpers this module reuses):

    <name>.npy            the array (a .npy memmap)
    <name>.json           spec + dataset fingerprint; written LAST (atomically): the completion marker
    <name>.progress.json  only while a build is unfinished (resumes from the finished episode count)

The spec keys everything that decides the tower's output: backbone id / revision (or the tiny config),
family, image size, cameras, normalisation mean/std, resize method, patch / merge sizes, the compute dtype,
a sha256 over the tower's weights, and the dataset's content fingerprint. Opening it with another policy
config or dataset is refused, naming each differing field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vla_core.policy.config import PolicyConfig
from vla_core.policy.processing import RESIZE_METHOD, pixel_values_from_images, resize_images
from vla_core.utils import WmvlaError, atomic_write_json, config_diff, to_jsonable
from vla_core.world.cache import (
    _dataset_diff,
    _episode_ranges,
    _fingerprint,
    _Interrupted,
    _npy_path,
    _write_progress,
    dataset_name,
    meta_path,
    open_resumable_build,
    progress_path,
    read_complete_meta,
)

FORMAT = "wmvla-vision-features-v1"
HOW = ("`wmvla vision-cache` with the same arguments as the training run (its preset, dataset and policy flags; "
       "it resumes an unfinished build)")
# numpy has no bfloat16: its bits are stored as uint16 and reinterpreted on load
_STORAGE = {"bfloat16": np.uint16, "float32": np.float32}


# --------------------------------------------------------------------------------------------- spec


def vision_weights_sha256(visual: nn.Module) -> str:
    """sha256 over the tower's state dict (names, dtypes, shapes, bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(visual.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class VisionCacheSpec:
    """What decides the cached tower outputs; two caches are interchangeable iff their specs are equal."""

    backbone: str
    revision: str | None
    family: str
    tiny: dict | None  # the tiny backbone's sizes (its weights are also in vision_weights_sha256)
    image_size: int
    camera_keys: tuple[str, ...]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resize: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    tokens_per_image: int
    n_deepstack: int
    hidden_size: int
    dtype: str  # "bfloat16" (autocast_bf16 runs) | "float32"
    vision_weights_sha256: str

    def to_dict(self) -> dict:
        return to_jsonable(dataclasses.asdict(self))

    @property
    def entry_shape(self) -> tuple[int, int, int, int]:
        """Shape of one frame's entry: [n_cams, 1 + n_deepstack, tokens_per_image, d]."""
        return (len(self.camera_keys), 1 + self.n_deepstack, self.tokens_per_image, self.hidden_size)

    @property
    def entry_bytes(self) -> int:
        """Bytes of one frame's entry on disk (all cameras)."""
        return int(np.prod(self.entry_shape)) * np.dtype(_STORAGE[self.dtype]).itemsize


def compute_dtype(cfg: PolicyConfig) -> str:
    return "bfloat16" if cfg.autocast_bf16 else "float32"


def spec_for(cfg: PolicyConfig, backbone) -> VisionCacheSpec:
    """The spec of `backbone` (a VLBackbone built from `cfg`, its tower cast to the run's frozen dtype)."""
    if backbone.family != "qwen3_vl":
        raise WmvlaError(f"the vision-feature cache supports Qwen3-VL backbones; {cfg.backbone!r} is {backbone.family}. "
                         "Fix: train without --vision-cache.")
    visual = backbone.vision_tower
    return VisionCacheSpec(
        backbone=cfg.backbone, revision=cfg.revision, family=backbone.family,
        tiny=to_jsonable(dataclasses.asdict(cfg.tiny)) if cfg.is_tiny else None,
        image_size=int(cfg.image_size), camera_keys=tuple(cfg.camera_keys),
        image_mean=tuple(float(x) for x in backbone.image_mean), image_std=tuple(float(x) for x in backbone.image_std),
        resize=RESIZE_METHOD, patch_size=backbone.patch_size, merge_size=backbone.merge_size,
        temporal_patch_size=backbone.temporal_patch_size, tokens_per_image=backbone.tokens_per_image,
        n_deepstack=len(getattr(visual, "deepstack_visual_indexes", ())), hidden_size=backbone.hidden_size,
        dtype=compute_dtype(cfg), vision_weights_sha256=vision_weights_sha256(visual),
    )


def check_vision_frozen(cfg: PolicyConfig) -> None:
    """Refuse a cache for a run whose tower trains (its outputs change every step)."""
    if cfg.finetune == "full":
        raise WmvlaError("a vision-feature cache needs a frozen vision tower, but policy.finetune='full' trains it "
                         "(its outputs change every step: cached ones would be stale). Fix: --policy.finetune "
                         "frozen_vision (or lora / heads_only), or train without --vision-cache.")


def cache_filename(spec: VisionCacheSpec) -> str:
    name = Path(spec.backbone.rstrip("/")).name
    return f"train_vision_features_{name}_s{spec.image_size}_{spec.vision_weights_sha256[:8]}.{spec.dtype}.npy"


def default_cache_path(path_or_repo: str, spec: VisionCacheSpec, root: str | Path = "cache") -> Path:
    return Path(root) / dataset_name(path_or_repo) / cache_filename(spec)


# ------------------------------------------------------------------------------------------ reading


def _as_torch(rows: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    # uint16 -> int16 (the same bits; torch's uint16 has few ops) -> bfloat16
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else t


class VisionFeatureCache:
    """A complete cache: `.array` memmap [N, n_cams, 1 + n_deepstack, tokens, d], `.spec`, `.meta`.

    Pickles as its path only (DataLoader workers reopen the memmap lazily, never copy it)."""

    def __init__(self, path: Path, spec: VisionCacheSpec, meta: dict):
        self.path = Path(path)
        self.spec = spec
        self.meta = meta
        self._arr = None

    @property
    def array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = np.load(self.path, mmap_mode="r")
        return self._arr

    @property
    def num_rows(self) -> int:
        return int(self.meta["num_rows"])

    def get(self, indices) -> torch.Tensor:
        """Entries at global frame indices [B] -> tensor [B, n_cams, 1 + n_deepstack, tokens, d] (bf16 / fp32)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return _as_torch(self.array[idx], self.spec.dtype)

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}

    @classmethod
    def open(cls, path: str | Path, expect: VisionCacheSpec | None = None, dataset=None) -> "VisionFeatureCache":
        """Open and verify; refuse (WmvlaError) an unfinished cache, another spec or another dataset."""
        npy = _npy_path(path)
        meta = read_complete_meta(npy, FORMAT, "vision-feature cache", HOW)
        spec = VisionCacheSpec(**{**meta["spec"], "camera_keys": tuple(meta["spec"]["camera_keys"]),
                                  "image_mean": tuple(meta["spec"]["image_mean"]),
                                  "image_std": tuple(meta["spec"]["image_std"])})
        cache = cls(npy, spec, meta)
        arr = cache.array
        want = (int(meta["num_rows"]), *spec.entry_shape)
        if arr.shape != want or arr.dtype != _STORAGE[spec.dtype]:
            raise WmvlaError(f"vision-feature cache {npy}: array is {arr.dtype} {arr.shape}, its spec says "
                             f"{np.dtype(_STORAGE[spec.dtype])} {want}. Fix: delete both files and rebuild with {HOW}.")
        if expect is not None:
            diff = config_diff(expect.to_dict(), spec.to_dict())
            if diff:
                raise WmvlaError(
                    f"vision-feature cache {npy} was built for another policy config than this run's (expected = "
                    "this run, found = the cache):\n  - " + "\n  - ".join(diff)
                    + f"\nFix: rebuild the cache for this config with {HOW} (it writes to a new file), or train "
                    "with the config the cache was built for.")
        if dataset is not None:
            if dataset.num_frames != cache.num_rows:
                raise WmvlaError(f"vision-feature cache {npy} has {cache.num_rows} rows but the dataset {dataset.root} "
                                 f"has {dataset.num_frames} frames. Fix: rebuild it for this dataset with {HOW}.")
            diff = _dataset_diff(meta["dataset"], _fingerprint(dataset))
            if diff:
                raise WmvlaError(f"the dataset changed since vision-feature cache {npy} was built:\n  - "
                                 + "\n  - ".join(diff) + f"\nFix: rebuild it with {HOW} (add --overwrite).")
        return cache


# ------------------------------------------------------------------------------------------ writing


def tower_features(backbone, images: torch.Tensor, autocast: bool) -> torch.Tensor:
    """uint8 [n, 3, S, S] (already resized) -> the tower's outputs [n, 1 + n_deepstack, tokens, d], computed by
    the same call as training (`get_image_features`, under the policy's autocast)."""
    bb = backbone
    device = next(bb.vision_tower.parameters()).device
    pixel_values, grid = pixel_values_from_images(images.to(device), bb.image_mean, bb.image_std, bb.patch_size,
                                                  bb.merge_size, bb.temporal_patch_size)
    grid = bb.grid_for_model(grid, device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), ctx:
        out = bb.model.get_image_features(pixel_values, grid)
    # transformers 5.x: an output object; before: a tuple (per-image merged tokens, deepstack features)
    merged, deep = (out.pooler_output, out.deepstack_features) if hasattr(out, "pooler_output") else out

    def per_image(x) -> torch.Tensor:  # split per image or not: [n, tokens, d]
        x = torch.cat(list(x)) if isinstance(x, (list, tuple)) else x
        return x.reshape(images.shape[0], bb.tokens_per_image, -1)

    return torch.stack([per_image(merged), *(per_image(f) for f in deep)], dim=1)


def precompute_vision_features(ds, backbone, cfg: PolicyConfig, out: str | Path, *, batch_size: int = 32,
                               overwrite: bool = False, checkpoint_every_s: float = 60.0, log=print,
                               spec: VisionCacheSpec | None = None,
                               _interrupt_after_episodes: int | None = None) -> VisionFeatureCache:
    """Run the frozen tower of `backbone` on every frame x camera of `ds` into the cache at `out` (resumable).

    `backbone` is built from `cfg` with its tower in the run's frozen dtype (see `build_frozen_backbone`).
    `spec`: `spec_for(cfg, backbone)` when the caller has it already (it hashes the tower's weights)."""
    check_vision_frozen(cfg)
    spec = spec or spec_for(cfg, backbone)
    npy = Path(out)
    meta_p, prog_p = meta_path(npy), progress_path(npy)
    ranges = _episode_ranges(ds)
    n = int(ds.num_frames)
    identity = {"spec": spec.to_dict(), "dataset": _fingerprint(ds), "num_rows": n}
    storage = _STORAGE[spec.dtype]

    mm, episodes_done = open_resumable_build(
        npy, to_jsonable(identity), storage, (n, *spec.entry_shape), len(ranges), overwrite=overwrite,
        what="vision features", fix_other="--vision-cache PATH for a separate file", fill_nan=False, log=log)
    if mm is None:
        return VisionFeatureCache.open(npy, expect=spec, dataset=ds)

    t0, last_ckpt = time.time(), time.time()
    autocast = compute_dtype(cfg) == "bfloat16"
    for e in range(episodes_done, len(ranges)):
        a0, b0 = ranges[e]
        for a in range(a0, b0, batch_size):
            b = min(a + batch_size, b0)
            for c, key in enumerate(cfg.camera_keys):
                frames = np.asarray(ds.frames(key, np.arange(a, b)))
                feats = tower_features(backbone, resize_images(frames, cfg.image_size), autocast)
                feats = feats.to(torch.bfloat16 if autocast else torch.float32).cpu()
                if not torch.isfinite(feats.float()).all():
                    raise WmvlaError(f"the vision tower produced NaN/inf for frames {a}..{b - 1}, camera {key!r}; the "
                                     f"cache at {npy} is left unfinished. Fix: check those frames.")
                mm[a:b, c] = (feats.view(torch.int16).numpy().view(np.uint16) if autocast else feats.numpy())
        if time.time() - last_ckpt >= checkpoint_every_s or _interrupt_after_episodes is not None:
            mm.flush()
            _write_progress(prog_p, identity, e + 1, len(ranges))
            last_ckpt = time.time()
            if _interrupt_after_episodes is not None and e + 1 >= _interrupt_after_episodes:
                raise _Interrupted(f"test interrupt after {e + 1} episodes")
    mm.flush()
    del mm
    seconds = time.time() - t0
    atomic_write_json(meta_p, {"format": FORMAT, "complete": True, **identity, "storage_dtype": np.dtype(storage).name,
                               "index": "[global frame, camera, (merged, deepstack...), token, channel]",
                               "created_unix": time.time(), "seconds": seconds})  # the completion marker
    prog_p.unlink(missing_ok=True)
    log(f"vision-cache: wrote {npy} [{n}, {', '.join(map(str, spec.entry_shape))}] {spec.dtype} in {seconds:.1f} s")
    return VisionFeatureCache.open(npy, expect=spec, dataset=ds)


def build_frozen_backbone(cfg: PolicyConfig, device: str | torch.device = "cpu"):
    """The backbone alone (no heads), its tower in the dtype a training run of `cfg` keeps it in."""
    from vla_core.policy.backbone import VLBackbone
    from vla_core.policy.modeling import _resolve_frozen_dtype

    backbone = VLBackbone(cfg)
    visual = backbone.vision_tower.to(device)
    dtype = _resolve_frozen_dtype(cfg)
    for p in visual.parameters():  # parameters only, as VLAPolicy casts frozen weights (buffers keep theirs)
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    return backbone.eval()
