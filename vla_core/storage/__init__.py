"""Object storage: datasets in, checkpoints and results out (docs/storage.md).

    store = open_store("s3://bucket/prefix")      # or a local folder / file:// URI
    publish_run("runs/mt10", "s3://bucket/results/mt10")   # files, then _manifest.json last
    pull_run("s3://bucket/results/mt10", "pulled/mt10")    # verified against the manifest; resumable
    list_runs("s3://bucket/results")
    sync_dataset("s3://bucket/datasets/libero")            # -> ~/.cache/wmvla/datasets/bucket/datasets/libero

Layer: imports only vla_core.env_names, vla_core.utils and vla_core.telemetry.
"""

from vla_core.storage.dataset import default_dataset_cache, sync_dataset
from vla_core.storage.runs import (
    MANIFEST,
    RunCorrupted,
    RunIncomplete,
    list_runs,
    publish_run,
    pull_run,
    read_manifest,
)
from vla_core.storage.store import LocalStore, ObjectInfo, S3Store, Store, StorageError, open_store, sha256_file
from vla_core.storage.sync import sync_down, sync_up

__all__ = [
    "MANIFEST", "LocalStore", "ObjectInfo", "RunCorrupted", "RunIncomplete", "S3Store", "StorageError", "Store",
    "default_dataset_cache", "list_runs", "open_store", "publish_run", "pull_run", "read_manifest", "sha256_file",
    "sync_dataset", "sync_down", "sync_up",
]
