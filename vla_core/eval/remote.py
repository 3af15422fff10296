"""Evaluation that survives a lost pod: the evaluation folder mirrored to `EvalConfig.remote`.

Episode records (`episodes.jsonl`, or a shard's `shards/shard-II-of-NN.jsonl`) are uploaded as they are
written, at most every UPLOAD_EVERY_S seconds and once more when the rollouts end (also on an error);
summary.json and videos follow at the end. A re-run first downloads what the bucket has that the local
folder lacks (a record file is taken from the bucket when it is longer: records are only ever appended),
and the engine's ordinary resume skips every episode already recorded.
"""

from __future__ import annotations

from pathlib import Path

from vla_core.storage import open_store
from vla_core.storage.sync import DirMirror, sync_down

UPLOAD_EVERY_S = 30.0


def restore_eval(out: str | Path, remote: str, log=print) -> int:
    """Download the remote evaluation files missing (or shorter) locally; returns how many were fetched."""
    out = Path(out)
    store = open_store(remote)
    store.check()
    wanted = []
    for obj in store.list():
        local = out / obj.key
        if not local.exists() or (obj.key.endswith(".jsonl") and obj.size > local.stat().st_size):
            wanted.append(obj)
    if wanted:
        sync_down(store, out, objects=wanted)
        log(f"eval: restored {len(wanted)} files from {store.uri} (the run continues from its records)")
    return len(wanted)


class _NoMirror:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def flush(self):
        return []


def eval_mirror(out: str | Path, remote: str, log=print):
    """A DirMirror of `out` to `remote` (a do-nothing stand-in when remote is empty)."""
    if not remote:
        return _NoMirror()
    return DirMirror(out, remote, interval_s=UPLOAD_EVERY_S, log=log)
