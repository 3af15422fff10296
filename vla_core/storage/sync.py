"""Copy folder trees to and from a store, concurrently, skipping files that are already there.

A file counts as "already there" when size and checksum match: on upload the object's sha256 metadata, or
its ETag where it has none (one HEAD, only for objects whose size already matches); on download the local
file's sha256 against the expected one (from a run manifest or the object's metadata), else the ETag.

Small files dominate results trees and datasets (JSON, parquet shards, PNGs); one request at a time they
are latency-bound, so files go through a thread pool (FILE_WORKERS) sharing one boto3 client, while each
large file is itself split into concurrent multipart transfers by boto3.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from vla_core.storage.store import (
    MULTIPART_THRESHOLD,
    ObjectInfo,
    StorageError,
    Store,
    open_store,
    sha256_file,
)

FILE_WORKERS = 32  # small objects are latency-bound; <= MAX_POOL_CONNECTIONS so threads never wait for a connection


@dataclass
class SyncResult:
    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0
    sha256: dict[str, str] = field(default_factory=dict)  # rel path -> sha256 (every file considered)
    sizes: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # key -> error (sync_down with collect_errors)


def local_files(local_dir: Path, exclude: Callable[[str], bool] | None = None) -> list[str]:
    """Relative posix paths of the regular files under local_dir (temp files of atomic writes excluded)."""
    out = []
    for p in sorted(Path(local_dir).rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(local_dir).as_posix()
        if p.name.endswith(".part") or p.name.startswith(".tmp") or "/.tmp-" in "/" + rel:
            continue
        if exclude is not None and exclude(rel):
            continue
        out.append(rel)
    return out


def run_pool(fn, items: Iterable, workers: int = FILE_WORKERS) -> list:
    """Map fn over items in threads; the first exception is raised after the running ones finish."""
    items = list(items)
    if not items:
        return []
    if len(items) == 1 or workers <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(fn, i) for i in items]
        return [f.result() for f in futures]


def sync_up(local_dir: str | os.PathLike, uri: str | Store, *, exclude: Callable[[str], bool] | None = None,
            files: list[str] | None = None, workers: int = FILE_WORKERS, object_sha256: bool = True,
            listing: list[ObjectInfo] | None = None) -> SyncResult:
    """Upload local_dir's files to uri (same relative keys), skipping objects with the same size and sha256.

    `object_sha256=False`: the caller records the returned sha256s itself (a manifest), so big files need not
    carry it in their metadata and are hashed while they upload (`Store.put_file`). `listing`: the store's
    objects when the caller has just listed them (saves a request)."""
    local_dir = Path(local_dir)
    store = uri if isinstance(uri, Store) else open_store(uri)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: no such folder to upload")
    rels = files if files is not None else local_files(local_dir, exclude)
    remote = {o.key: o.size for o in (store.list() if listing is None else listing)} if rels else {}
    result = SyncResult()

    def one(rel: str) -> tuple[str, bool, int, str]:
        path = local_dir / rel
        size = path.stat().st_size
        if remote.get(rel) == size:  # maybe there already (a re-run): compare checksums before sending
            digest = sha256_file(path)
            if store.matches(rel, path, digest):
                return rel, False, size, digest
            return rel, True, size, store.put_file(path, rel, sha256=digest)
        return rel, True, size, store.put_file(path, rel, object_sha256=object_sha256)

    for rel, sent, size, digest in run_pool(one, rels, workers):
        (result.transferred if sent else result.skipped).append(rel)
        result.bytes += size if sent else 0
        result.sha256[rel], result.sizes[rel] = digest, size
    return result


def local_matches(path: Path, size: int, sha256: str | None, store: Store | None = None, key: str = "") -> bool:
    """Is the local file at `path` the object (size + sha256)? Without an expected sha256 the store is asked
    (`Store.matches`: our sha256 metadata, else the ETag); when it cannot tell, the file is downloaded again."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    if sha256 is not None:
        return sha256_file(path) == sha256
    return store is not None and store.matches(key, path)


def sync_down(uri: str | Store, local_dir: str | os.PathLike, *, objects: list[ObjectInfo] | None = None,
              expected_sha256: dict[str, str] | None = None, verify: bool = True,
              workers: int = FILE_WORKERS, collect_errors: bool = False) -> SyncResult:
    """Download uri's objects into local_dir, skipping local files with the same size and sha256.

    `objects`: only these (default: everything listed under uri). `expected_sha256`: the checksums to
    check against (a manifest's); a downloaded file that does not match raises StorageError (it is left
    nowhere: downloads land in a temp file first). collect_errors: record failures in `.failed` and go on."""
    store = uri if isinstance(uri, Store) else open_store(uri)
    local_dir = Path(local_dir)
    objs = objects if objects is not None else store.list()
    expected = expected_sha256 or {}
    result = SyncResult()
    root = local_dir.resolve()

    def one(obj: ObjectInfo) -> tuple[str, bool, int, str | None]:
        try:
            return fetch(obj)
        except StorageError as e:
            if not collect_errors:
                raise
            result.failed[obj.key] = str(e)
            return obj.key, False, obj.size, None

    def fetch(obj: ObjectInfo) -> tuple[str, bool, int, str | None]:
        path = local_dir / obj.key
        if root not in path.resolve().parents:
            raise StorageError(f"{store.describe(obj.key)}: key leaves the target folder {local_dir}; refusing it")
        want = expected.get(obj.key)
        if local_matches(path, obj.size, want, None if want else store, obj.key):
            return obj.key, False, obj.size, want
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")  # local_files() skips *.part
        digest = store.get_file(obj.key, tmp)
        got_size = tmp.stat().st_size
        if want is None and verify:
            want = store.stored_sha256(obj.key)
        if got_size != obj.size or (want is not None and digest != want):
            tmp.unlink()
            raise StorageError(
                f"{store.describe(obj.key)}: corrupted object: expected {obj.size} bytes"
                + (f" with sha256 {want}" if want else "") + f", downloaded {got_size} bytes"
                + f" with sha256 {digest}"
                + ". The stored copy differs from what was uploaded; re-upload it (nothing local was overwritten)."
            )
        os.replace(tmp, path)
        return obj.key, True, obj.size, digest

    for key, sent, size, digest in run_pool(one, objs, workers):
        if key in result.failed:
            continue
        (result.transferred if sent else result.skipped).append(key)
        result.bytes += size if sent else 0
        result.sizes[key] = size
        if digest:
            result.sha256[key] = digest
    return result


class DirMirror:
    """Keeps a store prefix in step with a local folder that a job keeps writing (append-only logs such as
    episodes.jsonl): `flush()` uploads the files whose size or mtime changed since the last flush; with
    `interval_s` a daemon thread flushes at most that often, and leaving the `with` block flushes once more.

    Throttled on purpose: a job finishing an episode every second must not issue a request every second."""

    def __init__(self, local_dir: str | os.PathLike, uri: str | Store, interval_s: float | None = 30.0,
                 exclude: Callable[[str], bool] | None = None, log=None):
        import threading

        self.local_dir = Path(local_dir)
        self.store = uri if isinstance(uri, Store) else open_store(uri)
        self.interval_s = interval_s
        self.exclude = exclude
        self.log = log
        self._seen: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.error: BaseException | None = None

    def flush(self) -> list[str]:
        """Upload what changed; returns the relative paths uploaded."""
        with self._lock:
            if not self.local_dir.is_dir():
                return []
            changed = {}
            for rel in local_files(self.local_dir, self.exclude):
                try:
                    st = (self.local_dir / rel).stat()
                except FileNotFoundError:  # replaced between listing and stat
                    continue
                if self._seen.get(rel) != (st.st_size, st.st_mtime_ns):
                    changed[rel] = (st.st_size, st.st_mtime_ns)

            def one(rel: str) -> None:
                path = self.local_dir / rel
                if changed[rel][0] < MULTIPART_THRESHOLD:
                    # one read = one consistent snapshot of a file that is still being appended to (its sha256
                    # metadata then matches the bytes stored)
                    self.store.put_bytes(rel, path.read_bytes())
                else:
                    self.store.put_file(path, rel)

            run_pool(one, sorted(changed))
            self._seen.update(changed)
            return sorted(changed)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - a transient outage must not kill the job; retried next tick
                self.error = e
                if self.log:
                    self.log(f"storage: mirroring {self.local_dir} to {self.store.uri} failed (retrying): {e}")

    def __enter__(self) -> "DirMirror":
        import threading

        if self.interval_s:
            self._thread = threading.Thread(target=self._run, name="wmvla-mirror", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()  # also after an error: what was written is kept in the bucket
