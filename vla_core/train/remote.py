"""Training that survives a lost pod: the run folder mirrored to `TrainConfig.remote` (s3://... or a folder).

    <remote>/config.json, train_log.jsonl, val_log.jsonl, done.json     the run folder's top-level files
    <remote>/checkpoints/step_0000500/...  + _manifest.json              each checkpoint, manifest written last
    <remote>/checkpoints/latest                                          the newest uploaded checkpoint's name

Every checkpoint is uploaded when saved, by rank 0, in the background (`CheckpointUploader`): the steps go on
while it uploads (a 2B checkpoint is ~35 GB, minutes on any link). At most one upload is in flight: the next
checkpoint waits for the previous upload before it writes anything, so checkpoint pruning never deletes the files
being uploaded, and a failed upload fails the training at the next checkpoint or at the end with the store's
message. The checkpoint's manifest and then `checkpoints/latest` are written only when all its files are there.
A checkpoint without its manifest is an interrupted upload and is never resumed from. On start, a run folder with
no checkpoint of its own gets the newest complete remote one (verified against its manifest) plus the top-level
files, and the loop's ordinary resume continues from there.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from vla_core.storage import MANIFEST, open_store, publish_run, pull_run
from vla_core.storage.sync import run_pool
from vla_core.train.rundir import CKPT_DIR, CONFIG_FILE, DONE_FILE, LATEST, TRAIN_LOG, VAL_LOG
from vla_core.utils import WmvlaError, atomic_write_text

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



# uploads in a thread while training goes on; False = in the step, as before (benchmarks/bench_checkpoint.py
# measures both in one run)
BACKGROUND_UPLOADS = True


class CheckpointUploadFailed(WmvlaError):
    """A checkpoint's background upload failed; the message names the checkpoint and carries the store's error."""


class CheckpointUploader:
    """Uploads checkpoints to `remote` one at a time, off the training step.

    `submit(ckpt)` starts uploading a saved checkpoint (in a thread unless BACKGROUND_UPLOADS is off); `wait()`
    blocks until the upload in flight (if any) has finished and raises CheckpointUploadFailed if it failed.
    The caller calls `wait()` BEFORE writing the next checkpoint: that bounds uploads to one in flight and keeps
    the files being uploaded unchanged (save_checkpoint prunes older checkpoints). `remote` empty: does nothing."""

    def __init__(self, run_dir: str | Path, remote: str, log: Callable[[str], None] = print,
                 background: bool | None = None):
        self.run_dir = Path(run_dir)
        self.remote = remote
        self.log = log
        self.background = BACKGROUND_UPLOADS if background is None else background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._name = ""
        self.waited_s = 0.0  # time the training spent waiting for uploads (the stall the background hides)
        self.uploads: list[dict] = []  # {"checkpoint", "seconds"} per finished upload

    def _upload(self, ckpt: Path) -> None:
        t = time.perf_counter()
        try:
            upload_checkpoint(self.run_dir, ckpt, self.remote)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e
            return
        self.uploads.append({"checkpoint": ckpt.name, "seconds": round(time.perf_counter() - t, 3)})

    def submit(self, ckpt: str | Path) -> None:
        if not self.remote:
            return
        self.wait()  # callers wait before saving; this keeps the one-in-flight bound whatever they do
        ckpt = Path(ckpt)
        self._name = ckpt.name
        if not self.background:
            t = time.perf_counter()
            self._upload(ckpt)
            self.waited_s += time.perf_counter() - t
            self._raise()
            return
        self._thread = threading.Thread(target=self._upload, args=(ckpt,), name=f"wmvla-upload-{ckpt.name}",
                                        daemon=True)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Block until the upload in flight is done; raise its failure (or only log it, raise_error=False)."""
        if self._thread is not None:
            t = time.perf_counter()
            self._thread.join()
            self.waited_s += time.perf_counter() - t
            self._thread = None
        if raise_error:
            self._raise()
        elif self._error is not None:
            self.log(f"train: uploading checkpoint {self._name} to {self.remote} failed: {self._error}")
            self._error = None

    def _raise(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            why = str(err) if isinstance(err, WmvlaError) else f"{type(err).__name__}: {err}"
            raise CheckpointUploadFailed(
                f"uploading checkpoint {self._name} to {self.remote} failed: {why}. The previous complete checkpoint "
                "there is intact (a checkpoint counts only with its manifest); fix the store and run the same command "
                "again: training resumes from the local checkpoint, or on a new pod from the newest complete one in "
                "the store.") from err
