"""Training that survives a lost pod: the run folder mirrored to `TrainConfig.remote` (s3://... or a folder).

    <remote>/config.json, train_log.jsonl, val_log.jsonl, done.json     the run folder's top-level files
    <remote>/checkpoints/step_0000500/...  + _manifest.json              each checkpoint, manifest written last
    <remote>/checkpoints/latest                                          the newest uploaded checkpoint's name

Every checkpoint is uploaded when saved (rank 0, synchronously: the next steps start from a checkpoint that
is safe). A checkpoint without its manifest is an interrupted upload and is never resumed from. On start, a
run folder with no checkpoint of its own gets the newest complete remote one (verified against its
manifest) plus the top-level files, and the loop's ordinary resume continues from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vla_core.storage import MANIFEST, open_store, publish_run, pull_run
from vla_core.storage.sync import run_pool
from vla_core.train.rundir import CKPT_DIR, CONFIG_FILE, DONE_FILE, LATEST, TRAIN_LOG, VAL_LOG
from vla_core.utils import atomic_write_text

TOP_FILES = (CONFIG_FILE, TRAIN_LOG, VAL_LOG, DONE_FILE)


def _complete_checkpoints(store) -> list[str]:
    """Names of the remote checkpoints whose upload finished (manifest present), oldest first."""
    names = [n for n in store.list_dirs(CKPT_DIR) if n.startswith("step_")]
    return sorted(n for n in names if store.exists(f"{CKPT_DIR}/{n}/{MANIFEST}"))


def restore_from_remote(run_dir: str | Path, remote: str, log: Callable[[str], None] = print) -> str | None:
    """If `run_dir` has no checkpoint, download the newest complete checkpoint (and the run's top-level files)
    from `remote`. Returns the checkpoint's name, or None when nothing was restored."""
    run_dir = Path(run_dir)
    if (run_dir / CKPT_DIR / LATEST).exists():
        return None  # the local run folder is the newer truth (same pod, or a shared volume)
    store = open_store(remote)
    store.check()
    done = store.exists(DONE_FILE)
    names = _complete_checkpoints(store)
    if not names and not done:
        return None
    # the top-level files first: a checkpoint without config.json would be refused as "not a run folder"
    present = [f for f in TOP_FILES if store.exists(f)]
    run_pool(lambda f: store.get_file(f, run_dir / f), present)
    if not names:
        return None
    name = names[-1]
    res = pull_run(store.child(f"{CKPT_DIR}/{name}"), run_dir / CKPT_DIR / name)
    atomic_write_text(run_dir / CKPT_DIR / LATEST, name + "\n")
    log(f"train: restored {name} from {store.uri} ({res['downloaded']} files, {res['bytes'] / 1e6:.1f} MB)")
    return name


def upload_checkpoint(run_dir: str | Path, ckpt: str | Path, remote: str, keep: set[str] | None = None) -> None:
    """Upload checkpoint folder `ckpt` (manifest last), the run's top-level files and the `latest` pointer;
    then delete remote checkpoints that no longer exist locally (the local keep-last pruning)."""
    run_dir, ckpt = Path(run_dir), Path(ckpt)
    store = open_store(remote)
    publish_run(ckpt, store.child(f"{CKPT_DIR}/{ckpt.name}"))
    upload_run_files(run_dir, remote)
    store.put_bytes(f"{CKPT_DIR}/{LATEST}", (ckpt.name + "\n").encode())
    local = {p.name for p in (run_dir / CKPT_DIR).glob("step_*") if p.is_dir()} if keep is None else keep
    for name in store.list_dirs(CKPT_DIR):
        if name.startswith("step_") and name not in local:
            old = store.child(f"{CKPT_DIR}/{name}")
            old.delete(MANIFEST)  # first: a half-deleted checkpoint must read as incomplete
            run_pool(lambda o: old.delete(o.key), old.list())


def upload_run_files(run_dir: str | Path, remote: str) -> None:
    """The run folder's top-level files (config, logs, done marker) -> remote."""
    run_dir = Path(run_dir)
    store = open_store(remote)
    run_pool(lambda f: store.put_file(run_dir / f, f), [f for f in TOP_FILES if (run_dir / f).is_file()])

