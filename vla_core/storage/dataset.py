"""Datasets from the bucket: a LeRobot dataset at `s3://bucket/prefix` -> a local cache folder.

The dataset readers need local files (parquet footers, mp4 seeks, memmaps), so an s3:// dataset is synced
into `<cache_root>/<bucket>/<prefix>` concurrently, skipping files already present with the same size
and sha256. `meta/info.json` is downloaded LAST: the reader treats a folder without it as an interrupted
write, so a killed sync is never mistaken for a complete dataset, and the next sync resumes it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vla_core import env_names
from vla_core.storage.store import StorageError, open_store
from vla_core.storage.sync import sync_down

INFO_KEY = "meta/info.json"


def default_dataset_cache() -> Path:
    """WMVLA_DATASET_CACHE, else ~/.cache/wmvla/datasets."""
    root = os.environ.get(env_names.DATASET_CACHE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "wmvla" / "datasets"


def dataset_cache_dir(uri: str, cache_root: str | os.PathLike | None = None) -> Path:
    """<cache_root or default_dataset_cache()>/<bucket>/<prefix>"""
    root = Path(cache_root).expanduser() if cache_root is not None else default_dataset_cache()
    return root / str(uri)[len("s3://"):].strip("/")


def sync_dataset(uri: str | os.PathLike, cache_root: str | os.PathLike | None = None, *,
                 metadata_only: bool = False, log=print) -> Path:
    """An s3:// dataset -> its local cache folder (synced); a local path is returned as it is."""
    text = str(uri)
    if not text.startswith("s3://"):
        return Path(text)
    store = open_store(text)
    store.check()
    target = dataset_cache_dir(text, cache_root)
    objects = store.list()
    if metadata_only:
        objects = [o for o in objects if o.key.startswith("meta/")]
    if not any(o.key == INFO_KEY for o in objects):
        raise StorageError(f"{store.describe(INFO_KEY)}: missing: {text} is not a LeRobot dataset (expected meta/"
                           "info.json under the prefix), or its upload has not finished")
    rest = [o for o in objects if o.key != INFO_KEY]
    info = [o for o in objects if o.key == INFO_KEY]
    target.mkdir(parents=True, exist_ok=True)
    # several processes of one host (DDP ranks, latents + training) sync the same folder: one at a time, and
    # the later ones find everything in place
    with open(target.parent / f".{target.name}.sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / INFO_KEY).exists():
            # a changed dataset must not look complete while its other files are being replaced
            (target / INFO_KEY).unlink()
        res = sync_down(store, target, objects=rest)
        sync_down(store, target, objects=info)
    log(f"dataset: {text} -> {target} ({len(res.transferred) + 1} files downloaded, {len(res.skipped)} already "
        f"cached, {res.bytes / 1e6:.1f} MB)")
    return target
