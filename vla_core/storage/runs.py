"""Published runs: `<results_uri>/<run>/` plus `_manifest.json`, written LAST.

Object stores have no rename, so a reader cannot tell a half-uploaded folder from a finished one by its
files. The manifest (every file with size and sha256) is uploaded only after every file it lists; a run
without it is incomplete, and `pull_run` refuses it (or pulls what is there when told to). A re-publish
first deletes the old manifest, so a reader never pairs an old manifest with half-replaced files.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path

from vla_core.storage.store import ObjectInfo, StorageError, Store, open_store
from vla_core.storage.sync import SyncResult, local_files, sync_down, sync_up

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = "wmvla-run-manifest-v1"


class RunIncomplete(StorageError):
    """The run has no manifest (its upload did not finish) or lacks files the manifest lists."""


class RunCorrupted(StorageError):
    """An object's size or sha256 differs from the manifest."""


def _store(uri: str | Store) -> Store:
    return uri if isinstance(uri, Store) else open_store(uri)


def _run_summary(local_dir: Path) -> dict:
    """What `wmvla results list` shows without downloading the run: the report's verdict and the cells /
    conditions it compared (from the report's summary.json when present)."""
    path = local_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    verdict = s.get("verdict")
    if isinstance(verdict, dict):
        out["verdict"] = verdict.get("overall")
    elif isinstance(verdict, str):
        out["verdict"] = verdict
    if isinstance(s.get("conditions"), dict):
        out["cells"] = sorted(s["conditions"])
    elif isinstance(s.get("overall"), dict):  # a single evaluation's summary.json
        out["success_rate"] = s["overall"].get("success_rate")
    return out


def publish_run(local_dir: str | os.PathLike, uri: str | Store, *, workers: int | None = None) -> str:
    """Upload a results folder to `uri` (the run's own prefix), then `_manifest.json` last. Returns uri.

    Re-running after an interruption skips the files already uploaded (same size and sha256)."""
    local_dir = Path(local_dir)
    store = _store(uri)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: no such results folder to publish")
    # first request: a missing bucket or wrong credentials fail here, before any upload. The listing also
    # says which files are there already (a resumed publish) and whether an old manifest must go first
    listing = store.list()
    if any(o.key == MANIFEST for o in listing):
        store.delete(MANIFEST)
    kwargs = {"workers": workers} if workers else {}
    # the manifest carries every file's sha256: big files are hashed while they upload, not in a pass before
    res: SyncResult = sync_up(local_dir, store, exclude=lambda rel: rel == MANIFEST, object_sha256=False,
                              listing=[o for o in listing if o.key != MANIFEST], **kwargs)
    manifest = {
        "format": MANIFEST_FORMAT,
        "run": local_dir.resolve().name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"host": socket.gethostname(), "path": str(local_dir.resolve())},
        "files": {rel: {"size": res.sizes[rel], "sha256": res.sha256[rel]} for rel in sorted(res.sizes)},
        "total_bytes": sum(res.sizes.values()),
        "summary": _run_summary(local_dir),
    }
    store.put_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return store.uri


def read_manifest(uri: str | Store, present: bool | None = None) -> dict | None:
    """The run's manifest, or None when it has none. `present`: known from a listing (saves a HEAD)."""
    store = _store(uri)
    if present is False or (present is None and not store.exists(MANIFEST)):
        return None
    try:
        m = json.loads(store.get_bytes(MANIFEST))
    except json.JSONDecodeError as e:
        raise RunCorrupted(f"{store.describe(MANIFEST)}: not valid JSON ({e}); re-publish the run") from None
    if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), dict):
        raise RunCorrupted(f"{store.describe(MANIFEST)}: expected format {MANIFEST_FORMAT!r} with a 'files' map, "
                           f"found format {m.get('format')!r}; re-publish the run with this wmvla version")
    return m


def pull_run(uri: str | Store, local_dir: str | os.PathLike, allow_incomplete: bool = False,
             *, workers: int | None = None) -> dict:
    """Download a published run into local_dir, verifying every file's size and sha256 against the manifest.

    Files already present and matching are skipped, so a re-run resumes an interrupted pull. Refuses (raises)
    a run without a manifest, with missing files or with a corrupted object, unless `allow_incomplete`: then
    it downloads what it can (unverified when there is no manifest) and reports the problems.
    Returns {"uri", "local_dir", "complete", "files", "downloaded", "skipped", "bytes", "problems"}."""
    store = _store(uri)
    local_dir = Path(local_dir)
    # the listing is the first request (a missing bucket / wrong credentials fail here) and says whether
    # the manifest exists
    objs = store.list()
    manifest = read_manifest(store, present=any(o.key == MANIFEST for o in objs))
    listed = {o.key: o for o in objs if o.key != MANIFEST}
    problems: list[str] = []
    if manifest is None:
        if not listed:
            raise StorageError(f"{store.uri}: no such run (nothing stored under this prefix); "
                               "`wmvla results list PARENT_URI` shows the published runs")
        msg = (f"{store.uri}: incomplete run: no {MANIFEST} (its upload did not finish; the manifest is written "
               f"last). {len(listed)} objects are there.")
        if not allow_incomplete:
            raise RunIncomplete(msg + " Re-run `wmvla results push` for it, or pass --allow-incomplete to pull what "
                                      "is there unverified.")
        problems.append(msg)
        objects, expected = list(listed.values()), {}
    else:
        files = manifest["files"]
        missing = sorted(k for k in files if k not in listed)
        wrong_size = sorted(k for k in files if k in listed and listed[k].size != files[k]["size"])
        for k in missing:
            problems.append(f"{store.describe(k)}: listed in the manifest but missing from the store")
        for k in wrong_size:
            problems.append(f"{store.describe(k)}: corrupted: {listed[k].size} bytes stored, manifest says "
                            f"{files[k]['size']}")
        if problems and not allow_incomplete:
            raise (RunCorrupted if wrong_size else RunIncomplete)(
                f"{store.uri}: refusing to pull:\n  - " + "\n  - ".join(problems[:20])
                + "\nRe-publish the run, or pass --allow-incomplete to pull the intact files.")
        objects = [ObjectInfo(k, files[k]["size"]) for k in sorted(files) if k in listed and k not in wrong_size]
        expected = {k: files[k]["sha256"] for k in files}
    kwargs = {"workers": workers} if workers else {}
    res = sync_down(store, local_dir, objects=objects, expected_sha256=expected, verify=manifest is not None,
                    collect_errors=allow_incomplete, **kwargs)
    problems += list(res.failed.values())
    if manifest is not None:
        from vla_core.utils import atomic_path

        # the pulled folder carries the manifest too: it says what was verified, and a re-push reuses nothing
        # from it (publish_run always writes a fresh one). Not fsynced, as the downloaded files are not: the
        # rename keeps it whole, and a write lost in a crash only means pulling again
        with atomic_path(local_dir / MANIFEST, suffix=".part", fsync=False) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return {"uri": store.uri, "local_dir": str(local_dir), "complete": not problems,
            "files": len(objects), "downloaded": len(res.transferred), "skipped": len(res.skipped),
            "bytes": res.bytes, "problems": problems}


def list_runs(uri: str | Store) -> list[dict]:
    """The runs under a results prefix: one dict per sub-folder with name, uri, complete, created, files,
    total_bytes and the manifest's summary (verdict, cells). Incomplete runs are listed as such."""
    store = _store(uri)
    store.check()
    out = []
    for name in store.list_dirs():
        run = store.child(name)
        m = None
        problem = None
        try:
            m = read_manifest(run)
        except RunCorrupted as e:
            problem = str(e)
        entry = {"name": name, "uri": run.uri, "complete": m is not None}
        if m is not None:
            entry.update(created=m.get("created"), files=len(m["files"]), total_bytes=m.get("total_bytes"),
                         **(m.get("summary") or {}))
        else:
            objs = run.list()
            if not objs and problem is None:
                continue  # an emptied folder some stores keep as a prefix (a deleted run)
            entry.update(created=None, files=len(objs), total_bytes=sum(o.size for o in objs),
                         problem=problem or f"no {MANIFEST}: upload unfinished or interrupted")
        out.append(entry)
    return out


def local_run_files(local_dir: str | os.PathLike) -> list[str]:
    return local_files(Path(local_dir), exclude=lambda rel: rel == MANIFEST)
