"""Precomputed world latents: one float16 row per dataset frame, plus the spec that produced them.

    wmvla latents DATASET --encoder tiny --window 4
    wmvla latents /data/libero --encoder facebook/vjepa2-vitg-fpc64-256 --window 4 --batch-size 64

Files (default folder cache/<dataset name>/, `--out DIR` overrides):

    train_world_latents_<source>_m<m>.fp16.npy            [N_frames, D] float16 (a .npy memmap), row i = global frame i
    train_world_latents_<source>_m<m>.fp16.json           spec + dataset fingerprint + per-dim mean/std; written LAST
    train_world_latents_<source>_m<m>.fp16.progress.json  only while a precompute is unfinished

Completion is atomic: the .json beside the array is written (atomically) only after every row is written,
flushed and checked finite; until then the cache is refused by `LatentCache.open`. A killed precompute
resumes from the progress file, which records the number of finished episodes (rows are flushed before
it is written), so rows of a half-done episode are simply recomputed.

Throughput: DataLoader workers decode blocks of consecutive frames of one episode (each frame decoded once);
the main process preprocesses each frame once on the device and builds clips with the same `ClipBuffer`
used online, so overlapping windows share frames instead of decoding/preprocessing them m times.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

from vla_core import telemetry
from vla_core.utils import WmvlaError, atomic_write_json, config_diff, to_jsonable
from vla_core.world.encoder import (
    PREPROCESSING_DESCRIPTION,
    WorldEncoder,
    WorldEncoderSpec,
    build_world_encoder,
)

try:  # tyro only shapes the CLI; the GPU benchmark imports this module without it
    import tyro

    def positional(tp, metavar: str):
        return Annotated[tp, tyro.conf.Positional, tyro.conf.arg(metavar=metavar)]
except ImportError:  # pragma: no cover
    def positional(tp, metavar: str):
        return tp

FORMAT = "wmvla-latents-v1"


# --------------------------------------------------------------------------------------------- paths


def dataset_name(path_or_repo: str) -> str:
    """Folder name under cache/: the dataset folder's name or the repo's name (HuggingFaceVLA/libero -> libero)."""
    return Path(str(path_or_repo).rstrip("/")).name


def cache_filename(spec: WorldEncoderSpec) -> str:
    return f"train_world_latents_{spec.source}_m{spec.window}.fp16.npy"


def default_cache_path(path_or_repo: str, spec: WorldEncoderSpec, root: str | Path = "cache") -> Path:
    return Path(root) / dataset_name(path_or_repo) / cache_filename(spec)


def _stem(npy: Path) -> Path:
    return npy.with_name(npy.name[: -len(".npy")] if npy.name.endswith(".npy") else npy.name)


def meta_path(npy: Path) -> Path:
    return _stem(Path(npy)).with_name(_stem(Path(npy)).name + ".json")


def progress_path(npy: Path) -> Path:
    return _stem(Path(npy)).with_name(_stem(Path(npy)).name + ".progress.json")


def _npy_path(path: str | Path) -> Path:
    p = Path(path)
    if p.name.endswith(".progress.json"):
        return p.with_name(p.name[: -len(".progress.json")] + ".npy")
    if p.suffix == ".json":
        return p.with_suffix(".npy")
    return p


# ------------------------------------------------------------------------------------------ reading


def _fingerprint(ds) -> dict:
    return to_jsonable(ds.fingerprint())


# Where the dataset was read from is recorded but not compared: the same content moved to another folder
# (or reached through another path) is the same dataset. Content (hash of the metadata files, counts) is.
_LOCATION_KEYS = ("source", "revision")


def _dataset_diff(recorded: dict, found: dict) -> list[str]:
    strip = lambda d: {k: v for k, v in (d or {}).items() if k not in _LOCATION_KEYS}  # noqa: E731
    return config_diff(strip(recorded), strip(found))


def _identity_diff(expected: dict, found: dict) -> list[str]:
    """Differences between two {spec, dataset, num_rows, dim} records (dataset compared by content)."""
    out = config_diff({k: v for k, v in expected.items() if k != "dataset"},
                      {k: found.get(k) for k in expected if k != "dataset"})
    return out + [f"dataset.{line}" for line in _dataset_diff(expected["dataset"], found.get("dataset"))]


def _nonfinite_rows(arr: np.ndarray, chunk: int = 65536) -> np.ndarray:
    bad = []
    for a in range(0, arr.shape[0], chunk):
        block = np.asarray(arr[a : a + chunk])
        rows = np.nonzero(~np.isfinite(block).all(axis=1))[0]
        bad.append(rows + a)
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def _mean_std(arr: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    n, d = arr.shape
    s, ss = np.zeros(d), np.zeros(d)
    for a in range(0, n, chunk):
        block = np.asarray(arr[a : a + chunk], dtype=np.float64)
        s += block.sum(0)
        ss += (block * block).sum(0)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
    return mean, std


def _describe_rows(rows: np.ndarray, ds=None) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:20]) + (" ..." if len(rows) > 20 else "")
    text = f"{len(rows)} row(s): {shown}"
    if ds is not None:
        eps = sorted({int(ds.episodes[int(ds.episode_of[r])].episode_index) for r in rows[:1000]})
        text += f" (episodes {eps[:20]}{' ...' if len(eps) > 20 else ''})"
    return text


def read_complete_meta(npy: Path, fmt: str, what: str, how: str) -> dict:
    """The spec file of a finished cache beside `npy`, or a WmvlaError naming what is wrong and the command that
    fixes it (`how`): an interrupted build (progress file, no spec), an array without spec, no cache at all, a
    spec of another format or not marked complete, a spec without its array. Shared by every cache of this
    layout (world latents here, the vision-feature cache in vla_core/policy/vision_cache.py)."""
    meta_p, prog_p = meta_path(npy), progress_path(npy)
    if not meta_p.exists():
        if prog_p.exists():
            prog = json.loads(prog_p.read_text())
            raise WmvlaError(f"{what} {npy} is incomplete: its build stopped after {prog.get('episodes_done')} of "
                             f"{prog.get('num_episodes')} episodes. Fix: run {how} again; it resumes where it stopped.")
        if npy.exists():
            raise WmvlaError(f"{what} {npy} has no spec file {meta_p.name} beside it: its build did not complete (or "
                             f"the spec was deleted). Fix: delete {npy} and build it with {how}.")
        raise WmvlaError(f"no {what} at {npy}. Fix: build it with {how}.")
    meta = json.loads(meta_p.read_text())
    if meta.get("format") != fmt or not meta.get("complete"):
        raise WmvlaError(f"{meta_p} is not a complete {fmt} spec (format {meta.get('format')!r}, complete "
                         f"{meta.get('complete')!r}). Fix: rebuild with {how}.")
    if not npy.exists():
        raise WmvlaError(f"{what} spec {meta_p} exists but the array {npy} is missing. Fix: rebuild with {how}.")
    return meta


class LatentCache:
    """A complete latent cache: `.latents` float16 memmap [N, D] (row = global frame index), `.spec`, `.meta`."""

    def __init__(self, path: Path, latents: np.ndarray, spec: WorldEncoderSpec, meta: dict):
        self.path = path
        self.latents = latents
        self.spec = spec
        self.meta = meta

    @property
    def num_rows(self) -> int:
        return int(self.latents.shape[0])

    @property
    def dim(self) -> int:
        return int(self.latents.shape[1])

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.meta["stats"]["mean"], dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.meta["stats"]["std"], dtype=np.float32)

    def get(self, indices) -> np.ndarray:
        """Rows at global frame indices (any shape) -> float32 [..., D]."""
        idx = np.asarray(indices, dtype=np.int64)
        return np.asarray(self.latents[idx.reshape(-1)], dtype=np.float32).reshape(*idx.shape, self.dim)

    @classmethod
    def open(cls, path: str | Path, expect: WorldEncoderSpec | None = None, dataset=None,
             check_finite: bool = True) -> "LatentCache":
        """Open and verify a cache; refuse (WmvlaError) anything that does not match.

        expect: the run config's encoder spec (None/"auto" fields match anything).
        dataset: the LeRobotDataset the latents will be used with (row count + fingerprint must match).
        """
        npy = _npy_path(path)
        how = "`wmvla latents DATASET --encoder ENCODER --window M` (same arguments as before)"
        meta = read_complete_meta(npy, FORMAT, "latent cache", how)
        spec = WorldEncoderSpec.from_dict(meta["spec"])
        latents = np.load(npy, mmap_mode="r")
        want_shape = (int(meta["num_rows"]), int(meta["dim"]))
        if latents.shape != want_shape or latents.dtype != np.float16:
            raise WmvlaError(
                f"latent cache {npy}: array is {latents.dtype} {latents.shape}, its spec says float16 {want_shape}; "
                f"the files do not belong together. Fix: delete both and recompute with {how}."
            )
        if latents.shape[1] != spec.dim:
            raise WmvlaError(f"latent cache {npy}: dim {latents.shape[1]} but spec dim {spec.dim}. Fix: recompute.")
        if expect is not None:
            diff = expect.mismatches(spec)
            if diff:
                raise WmvlaError(
                    f"latent cache {npy} was computed with a different world encoder spec than this run expects:\n  - "
                    + "\n  - ".join(diff)
                    + f"\nFix: compute matching latents (`wmvla latents DATASET --encoder {expect.encoder} "
                    f"--window {expect.window}` ...) or change the run's world settings to the cache's "
                    f"(encoder {spec.encoder}, window {spec.window}, dim {spec.dim})."
                )
        if dataset is not None:
            if dataset.num_frames != latents.shape[0]:
                raise WmvlaError(
                    f"latent cache {npy} has {latents.shape[0]} rows but the dataset {dataset.root} has "
                    f"{dataset.num_frames} frames (one row per frame expected). Fix: recompute the latents for "
                    f"this dataset with {how}, or use the dataset the cache was made from ({meta['dataset']})."
                )
            diff = _dataset_diff(meta["dataset"], _fingerprint(dataset))
            if diff:
                raise WmvlaError(
                    f"the dataset changed since latent cache {npy} was computed:\n  - " + "\n  - ".join(diff)
                    + f"\nFix: recompute the latents with {how} (add --overwrite to replace this cache)."
                )
        if check_finite:
            bad = _nonfinite_rows(latents)
            if len(bad):
                raise WmvlaError(
                    f"latent cache {npy} has NaN/inf in {_describe_rows(bad, dataset)}. Fix: delete it and "
                    f"recompute with {how} (use --precision fp32 if the encoder overflows in bf16)."
                )
        return cls(npy, latents, spec, meta)


# ------------------------------------------------------------------------------------------ writing


class _BlockReader(torch.utils.data.Dataset):
    """Item i = frames of block i (consecutive frames of one episode), each decoded once. The dataset object
    is fork/pickle safe (it reopens its files in each worker process)."""

    def __init__(self, ds, blocks: list[tuple[int, int, int]], camera_key: str):
        self.ds = ds
        self.blocks = blocks
        self.camera_key = camera_key

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        ep, a, b = self.blocks[i]
        frames = np.asarray(self.ds.frames(self.camera_key, np.arange(a, b)))
        if frames.shape[0] != b - a or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise WmvlaError(f"dataset returned frames {frames.dtype} {frames.shape} for rows {a}..{b - 1}; "
                             f"expected uint8 [{b - a}, H, W, 3].")
        return ep, a, b, torch.from_numpy(frames)


def _episode_ranges(ds) -> list[tuple[int, int]]:
    ranges = [(int(e.start), int(e.start) + int(e.length)) for e in ds.episodes]
    pos = 0
    for a, b in ranges:
        if a != pos or b <= a:
            raise WmvlaError(
                f"dataset {ds.root}: episodes do not tile the global frame index 0..{ds.num_frames - 1} in order "
                f"(episode starting at {a}, expected {pos}); latents are indexed by global frame index."
            )
        pos = b
    if pos != ds.num_frames:
        raise WmvlaError(f"dataset {ds.root}: episodes cover {pos} frames but num_frames is {ds.num_frames}.")
    return ranges


class _Interrupted(KeyboardInterrupt):
    """Raised by the test hook that simulates a kill right after a progress checkpoint."""


def open_resumable_build(npy: Path, identity: dict, dtype, shape: tuple, num_episodes: int, *, overwrite: bool,
                         what: str, fix_other: str, fill_nan: bool, log=print) -> tuple[np.ndarray | None, int]:
    """The start of a resumable cache build at `npy`, shared by every cache of this layout (world latents here,
    the vision-feature cache in vla_core/policy/vision_cache.py). Returns (None, 0) when a finished cache with
    this `identity` ({spec, dataset, num_rows, ...}) is already there: nothing to do. Resumes a partial build
    with the same identity (its array, opened r+, and the episodes done); refuses a finished or partial cache of
    another identity, naming each differing field, unless `overwrite`; else starts a fresh array (NaN-filled
    with `fill_nan`, so a bug that skips rows cannot pass a finiteness check) and its progress file."""
    meta_p, prog_p = meta_path(npy), progress_path(npy)
    if meta_p.exists() and not overwrite:
        diff = _identity_diff(identity, json.loads(meta_p.read_text()))
        if not diff:
            log(f"{what}: {npy} is already complete for this spec and dataset; nothing to do")
            return None, 0
        raise WmvlaError(f"{npy} already holds {what} made with different settings:\n  - " + "\n  - ".join(diff)
                         + f"\nFix: pass {fix_other}, or --overwrite to replace it.")
    if prog_p.exists() and npy.exists() and not overwrite:
        prog = json.loads(prog_p.read_text())
        diff = _identity_diff(identity, prog)
        if diff:
            raise WmvlaError(f"{npy} is a partial build of {what} with different settings:\n  - " + "\n  - ".join(diff)
                             + f"\nFix: rerun with the original settings to resume, {fix_other}, or --overwrite.")
        episodes_done = int(prog["episodes_done"])
        mm = np.load(npy, mmap_mode="r+")
        if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
            raise WmvlaError(f"{npy}: the partial array is {mm.dtype} {mm.shape}, expected {np.dtype(dtype).name} "
                             f"{tuple(shape)}. Fix: --overwrite.")
        log(f"{what}: resuming {npy} at episode {episodes_done}/{num_episodes}")
        return mm, episodes_done
    for p in (meta_p, prog_p):
        p.unlink(missing_ok=True)
    npy.parent.mkdir(parents=True, exist_ok=True)
    mm = np.lib.format.open_memmap(npy, mode="w+", dtype=dtype, shape=tuple(shape))
    if fill_nan:
        for a in range(0, shape[0], 65536):
            mm[a : a + 65536] = np.nan
        mm.flush()
    _write_progress(prog_p, identity, 0, num_episodes)
    return mm, 0


def precompute_latents(
    ds,
    encoder: WorldEncoder,
    out: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    block_size: int = 256,
    overwrite: bool = False,
    checkpoint_every_s: float = 60.0,
    log=print,
    _interrupt_after_episodes: int | None = None,
) -> LatentCache:
    """Encode every frame of `ds` (one clip per frame, clamped at episode starts) into the cache at `out`.

    Resumes an interrupted run with the same spec and dataset; refuses to touch a cache made with different
    settings unless `overwrite`. Returns the opened, verified cache.
    """
    npy = Path(out)
    meta_p, prog_p = meta_path(npy), progress_path(npy)
    spec = encoder.spec
    feature = ds.features.get(spec.camera_key, {})
    if feature.get("dtype") not in ("image", "video"):
        raise WmvlaError(f"camera {spec.camera_key!r} is not an image feature of {ds.root}; image features: "
                         f"{[k for k, v in ds.features.items() if v.get('dtype') in ('image', 'video')]}.")
    shape = tuple(int(x) for x in feature["shape"][:2])
    if spec.frame_shape is None:  # the record says which frames the latents were made from (online check)
        spec = encoder.spec = dataclasses.replace(spec, frame_shape=shape)
    elif spec.frame_shape != shape:
        raise WmvlaError(f"encoder spec expects {spec.frame_shape} frames, camera {spec.camera_key!r} of {ds.root} "
                         f"has {shape}.")
    fingerprint = _fingerprint(ds)
    ranges = _episode_ranges(ds)
    n, d = int(ds.num_frames), int(spec.dim)
    identity = {"spec": spec.to_dict(), "dataset": fingerprint, "num_rows": n, "dim": d}

    mm, episodes_done = open_resumable_build(
        npy, to_jsonable(identity), np.float16, (n, d), len(ranges), overwrite=overwrite, what="latents",
        fix_other="--out DIR for a separate cache", fill_nan=True, log=log)
    if mm is None:
        return LatentCache.open(npy, expect=spec, dataset=ds)

    t0 = time.time()
    rows_start = ranges[episodes_done][0] if episodes_done < len(ranges) else n
    blocks = [(e, a, min(a + block_size, b)) for e, (s, b) in enumerate(ranges) if e >= episodes_done
              for a in range(s, b, block_size)]
    reader = _BlockReader(ds, blocks, spec.camera_key)
    loader = torch.utils.data.DataLoader(
        reader, batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if num_workers else None,
    )

    buffer = encoder.new_clip_buffer()
    pending: list = []  # clips (lists of m preprocessed frames) waiting for a full batch
    pending_first_row = rows_start
    in_flight = None  # (first row, latents on the device) of the batch launched last
    written = rows_start  # rows [0, written) are in the memmap
    state = {"episodes_done": episodes_done, "last_ckpt": time.time(), "last_log": time.time()}

    def write(batch) -> None:
        nonlocal written
        first, z = batch
        z = z.cpu().numpy()
        if first != written:  # rows are produced strictly in order
            raise RuntimeError(f"latents written out of order: {first} != {written}")
        mm[first : first + len(z)] = z.astype(np.float16)
        written = first + len(z)
        while state["episodes_done"] < len(ranges) and ranges[state["episodes_done"]][1] <= written:
            state["episodes_done"] += 1
        now = time.time()
        if now - state["last_log"] > 10:
            state["last_log"] = now
            rate = (written - rows_start) / max(now - t0, 1e-9)
            log(f"latents: {written}/{n} frames, {rate:.1f} clips/s, eta {(n - written) / max(rate, 1e-9) / 60:.1f} min")
        metrics.latents_progress(written, n, (written - rows_start) / max(now - t0, 1e-9))
        if now - state["last_ckpt"] >= checkpoint_every_s:
            checkpoint()

    def checkpoint() -> None:
        mm.flush()
        _write_progress(prog_p, identity, state["episodes_done"], len(ranges))
        state["last_ckpt"] = time.time()
        if _interrupt_after_episodes is not None and state["episodes_done"] >= _interrupt_after_episodes:
            raise _Interrupted(f"test interrupt after {state['episodes_done']} episodes")

    def launch() -> None:
        nonlocal pending, pending_first_row, in_flight
        z = encoder.encode_preprocessed(encoder.stack_clips(pending))
        prev, in_flight = in_flight, (pending_first_row, z)
        pending_first_row += len(pending)
        pending = []
        if prev is not None:  # fetch the previous batch while this one runs on the device
            write(prev)

    current_ep = None
    # Prometheus (docs/metrics.md): frames done, clips/s; never fails the precompute
    with torch.inference_mode(), telemetry.start_job("latents") as metrics:
        metrics.latents_progress(written, n)
        for ep, a, b, frames in loader:
            ep = int(ep)
            if ep != current_ep:
                buffer.reset()
                current_ep = ep
            pre = encoder.preprocess_frames(frames)
            for i in range(int(b) - int(a)):
                pending.append(buffer.push(pre[i]))
                if len(pending) == batch_size:
                    launch()
        if pending:
            launch()
        if in_flight is not None:
            write(in_flight)
    if written != n:
        raise RuntimeError(f"precompute wrote {written} of {n} rows")
    mm.flush()
    state["episodes_done"] = len(ranges)

    bad = _nonfinite_rows(mm)
    if len(bad):
        raise WmvlaError(
            f"the encoder produced NaN/inf latents for {_describe_rows(bad, ds)}; the cache at {npy} is left "
            "incomplete. Fix: check the frames of those rows, or recompute with --precision fp32."
        )
    mean, std = _mean_std(mm)
    seconds = time.time() - t0
    meta = {
        "format": FORMAT,
        "complete": True,
        **identity,
        "dtype": "float16",
        "index": "row i = dataset frame with global index i",
        "preprocessing_description": PREPROCESSING_DESCRIPTION,
        "stats": {"mean": mean.tolist(), "std": std.tolist()},
        "created_unix": time.time(),
        "device": str(encoder.device),
        "seconds": seconds,
    }
    del mm
    atomic_write_json(meta_p, meta)  # the completion marker
    prog_p.unlink(missing_ok=True)
    log(f"latents: wrote {npy} [{n}, {d}] in {seconds:.1f} s ({(n - rows_start) / max(seconds, 1e-9):.1f} clips/s)")
    return LatentCache.open(npy, expect=spec, dataset=ds)


def _write_progress(path: Path, identity: dict, episodes_done: int, num_episodes: int) -> None:
    atomic_write_json(path, {**identity, "episodes_done": episodes_done, "num_episodes": num_episodes})


# ---------------------------------------------------------------------------------------------- CLI


@dataclass
class LatentsConfig:
    """Precompute world-encoder latents for every frame of a dataset (resumable)."""

    dataset: positional(str, "DATASET")
    """dataset folder (LeRobot v3.0 / v2.1) or hub repo id"""
    encoder: str = "tiny"
    """"tiny" (seeded random V-JEPA 2 weights: random features, for tests/demo) | hub id | local folder"""
    revision: str | None = None
    """encoder hub revision"""
    window: int = 4
    """m: frames per clip ending at each step (clamped at episode starts)"""
    camera_key: str = "observation.images.image"
    """camera (dataset image key) to encode; LIBERO's agent view by default"""
    image_size: int | None = None
    """crop size; default: the checkpoint's (256), 64 for tiny"""
    pooling: Literal["mean", "last"] = "mean"
    """mean over all output tokens | mean over the newest tubelet's tokens"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on CUDA, fp32 on CPU"""
    seed: int = 0
    """weight seed of the tiny encoder"""
    dataset_revision: str | None = None
    """hub revision of the dataset"""
    out: Path | None = None
    """output folder (default: cache/<dataset name>/)"""
    cache_root: Path = Path("cache")
    batch_size: int = 64
    """clips per encoder forward"""
    num_workers: int = 4
    """DataLoader worker processes decoding frames"""
    block_size: int = 256
    """frames of one episode decoded per worker task"""
    device: str = "auto"
    overwrite: bool = False
    """replace an existing (complete or partial) cache with different settings"""

    def spec(self) -> WorldEncoderSpec:
        return WorldEncoderSpec(
            encoder=self.encoder, revision=self.revision, window=self.window, camera_key=self.camera_key, image_size=self.image_size, pooling=self.pooling,
            precision=self.precision, seed=self.seed,
        )


def run_latents(cfg: LatentsConfig) -> int:
    from vla_core.data.lerobot import LeRobotDataset

    ds = LeRobotDataset.open(cfg.dataset, None, revision=cfg.dataset_revision)  # only the camera is read
    spec = cfg.spec()
    if ds.features.get(spec.camera_key, {}).get("dtype") not in ("image", "video"):
        raise WmvlaError(f"camera {spec.camera_key!r} is not an image feature of {cfg.dataset}; image features: "
                         f"{[k for k, v in ds.features.items() if v.get('dtype') in ('image', 'video')]}. "
                         "Fix: --camera-key KEY.")
    spec = dataclasses.replace(spec, frame_shape=tuple(int(x) for x in ds.features[spec.camera_key]["shape"][:2]))
    encoder = build_world_encoder(spec, cfg.device)
    out = (Path(cfg.out) / cache_filename(encoder.spec)) if cfg.out else default_cache_path(cfg.dataset, encoder.spec, cfg.cache_root)
    print(f"latents: {ds.num_frames} frames / {ds.num_episodes} episodes of {cfg.dataset} -> {out}")
    print(f"latents: spec {json.dumps(encoder.spec.to_dict())}")
    cache = precompute_latents(ds, encoder, out, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                               block_size=cfg.block_size, overwrite=cfg.overwrite)
    print(f"latents: ok {cache.path} [{cache.num_rows}, {cache.dim}] float16 (spec {meta_path(cache.path).name})")
    return 0
