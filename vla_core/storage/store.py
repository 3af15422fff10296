"""One interface over object storage (`s3://bucket/prefix`) and local folders (`/path`, `file:///path`).

S3 goes through boto3 with its standard credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, instance or pod identity) and AWS_ENDPOINT_URL for MinIO / SeaweedFS / Ceph, which get
path-style addressing (virtual-host names do not resolve for a plain endpoint). botocore's "standard"
retry mode retries throttling, 5xx and connection errors with exponential backoff and jitter; boto3's
TransferConfig splits large files into concurrent multipart transfers.

An uploaded object carries its sha256 in user metadata (`x-amz-meta-sha256`), so a later sync can skip an
unchanged file with one HEAD instead of a download and a download without a manifest can be verified; except
a multipart upload whose caller keeps the sha256 elsewhere (`object_sha256=False`: `publish_run`'s
manifest), which is hashed while it uploads (S3 fixes an object's metadata when its multipart upload starts,
before the hash is known); such an object is matched by its ETag. Every failure becomes a `StorageError` that
names the endpoint, bucket and key, never a credential.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from vla_core import env_names
from vla_core.telemetry import count_bytes
from vla_core.utils import WmvlaError, atomic_path

SHA256_META = "sha256"  # user-metadata key (x-amz-meta-sha256)
MiB = 1024 * 1024
# boto3's defaults are 8 MiB parts, 10 threads; 16 MiB parts halve the request count of big checkpoints
MULTIPART_THRESHOLD = 16 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
# downloads: ranged GETs of 8 MiB (boto3's size); a 128 MiB file is then 16 streams over 10 connections, not 8
DOWNLOAD_PART = 8 * MiB
MAX_CONCURRENCY = 10
MAX_POOL_CONNECTIONS = 128  # file threads (32) x part threads (10) share it; beyond it urllib3 opens and drops extras
DEFAULT_MAX_ATTEMPTS = 5  # botocore standard mode; AWS_MAX_ATTEMPTS overrides
STREAM_CHUNK = 1 * MiB  # a download's body is read and written in pieces this large (reused memory, no 16 MiB buffers)
STREAM_ATTEMPTS = 3  # a part whose body stops streaming is resumed where it stopped this many times
PART_THREADS = 2 * MAX_CONCURRENCY  # download parts in flight in the whole process
# botocore asks every PutObject with a body to wait for "100 Continue" before sending it: one more round trip per
# small file. Below this size the body goes with the headers (the AWS SDKs for Go v2 and Kotlin default to 2 MB)
EXPECT_CONTINUE_MIN = 2 * MiB


class StorageError(WmvlaError):
    """An object-store operation failed; the message names endpoint, bucket and key (never a secret)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's prefix
    size: int


def sha256_file(path: str | os.PathLike, bufsize: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    buf = bytearray(bufsize)  # one buffer, read into: no allocation per chunk
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def _copy_hashing(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(4 * MiB):
            h.update(chunk)
            fo.write(chunk)
    return h.hexdigest()


def multipart_etag(path: str | os.PathLike, chunksize: int) -> str:
    """The ETag S3 gives an object uploaded in parts of `chunksize`: md5 of the parts' md5s, '-', part count."""
    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(chunksize):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if len(digests) <= 1:  # a single-part object's ETag is its plain MD5
        return digests[0].hex() if digests else hashlib.md5(b"", usedforsecurity=False).hexdigest()
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _count_bytes(direction: str, n: int) -> None:
    """The one call site of the telemetry byte counter (direction "up" or "down"; never raises for I/O)."""
    count_bytes(direction, n)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# ----------------------------------------------------------------------------------------- interface


class Store:
    """A prefix in an object store or a local folder. Keys are relative, '/'-separated."""

    uri: str

    def put_file(self, local_path: str | os.PathLike, key: str, sha256: str | None = None, *,
                 object_sha256: bool = True) -> str:
        """Upload; returns the file's sha256 (computed unless the caller passes it). `object_sha256`: the store
        keeps the sha256 with the object (S3: in its metadata) for readers without a manifest; False when the
        caller records it itself (a manifest): a big file is then hashed while it uploads, not before."""
        raise NotImplementedError

    def get_file(self, key: str, local_path: str | os.PathLike) -> str:
        """Download to `local_path` atomically (temp file + rename): a killed download leaves nothing.
        Returns the sha256 of the bytes received."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        raise NotImplementedError

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders under `prefix` (S3 common prefixes)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def child(self, subprefix: str) -> "Store":
        raise NotImplementedError

    def stored_sha256(self, key: str) -> str | None:
        """The object's sha256 if the store knows it without a download (our metadata / local file)."""
        raise NotImplementedError

    def matches(self, key: str, local_path: str | os.PathLike, sha256: str | None = None) -> bool:
        """Is the object `key` the same bytes as the local file (size and checksum)? `sha256`: the local
        file's, when the caller has it."""
        raise NotImplementedError

    def check(self) -> None:
        """Fail early with a clear message when the store cannot be used (S3: missing bucket, credentials)."""

    def describe(self, key: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def open_store(uri: str | os.PathLike) -> Store:
    """`s3://bucket/prefix` -> S3Store; a folder path or `file://` URI -> LocalStore."""
    text = str(uri)
    if text.startswith("s3://"):
        rest = text[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"{text!r}: expected s3://BUCKET/PREFIX, found no bucket name")
        return S3Store(bucket, prefix.strip("/"))
    if text.startswith("file://"):
        return LocalStore(Path(text[len("file://"):]))
    if "://" in text:
        raise StorageError(f"{text!r}: unsupported scheme; expected s3://BUCKET/PREFIX, file:///PATH or a folder path")
    return LocalStore(Path(text))


# -------------------------------------------------------------------------------------------- local


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        p = self.root / key
        if key.startswith("/") or ".." in Path(key).parts:
            raise StorageError(f"{self.uri}: key {key!r} leaves the store's folder")
        return p

    def put_file(self, local_path, key, sha256=None, *, object_sha256=True):
        dst = self._path(key)
        with atomic_path(dst, suffix=".part", fsync=False) as tmp:
            digest = _copy_hashing(local_path, tmp)
        _count_bytes("up", dst.stat().st_size)
        return digest

    def get_file(self, key, local_path):
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"{self.describe(key)}: no such object")
        local_path = Path(local_path)
        with atomic_path(local_path, suffix=".part", fsync=False) as tmp:
            digest = _copy_hashing(src, tmp)
        _count_bytes("down", local_path.stat().st_size)
        return digest

    def put_bytes(self, key, data):
        from vla_core.utils import atomic_write_bytes

        atomic_write_bytes(self._path(key), data)
        _count_bytes("up", len(data))

    def get_bytes(self, key):
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"{self.describe(key)}: no such object") from None
        _count_bytes("down", len(data))
        return data

    def list(self, prefix=""):
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            # temp files of an unfinished put are not objects
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".part")):
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return out

    def list_dirs(self, prefix=""):
        base = self._path(prefix) if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def exists(self, key):
        return self._path(key).is_file()

    def delete(self, key):
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def child(self, subprefix):
        return LocalStore(self._path(subprefix.strip("/")))

    def stored_sha256(self, key):
        p = self._path(key)
        return sha256_file(p) if p.is_file() else None

    def matches(self, key, local_path, sha256=None):
        p = self._path(key)
        if not p.is_file() or p.stat().st_size != Path(local_path).stat().st_size:
            return False
        return sha256_file(p) == (sha256 or sha256_file(local_path))


# ----------------------------------------------------------------------------------------------- s3

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _endpoint() -> str | None:
    return os.environ.get(env_names.AWS_ENDPOINT_URL) or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def s3_client():
    """A boto3 S3 client from the standard chain; cached per (endpoint, credentials source, region) so the
    thread pools share its connection pool (boto3 clients are thread-safe, sessions are not)."""
    import boto3
    from botocore.config import Config

    endpoint = _endpoint()
    region = os.environ.get(env_names.AWS_REGION) or os.environ.get("AWS_REGION") or ("us-east-1" if endpoint else None)
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    # the key id (not the secret) distinguishes credential sets, e.g. a test switching identities
    ident = (endpoint, region, attempts, os.environ.get(env_names.AWS_ACCESS_KEY_ID),
             hashlib.sha256((os.environ.get(env_names.AWS_SECRET_ACCESS_KEY) or "").encode()).hexdigest(),
             os.environ.get("AWS_PROFILE"))
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            config = Config(
                retries={"mode": os.environ.get("AWS_RETRY_MODE") or "standard", "max_attempts": attempts},
                s3={"addressing_style": "path" if endpoint else "auto"},
                signature_version="s3v4",
                max_pool_connections=MAX_POOL_CONNECTIONS,
                connect_timeout=10,
                read_timeout=60,
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
            # after botocore's own handler, which adds the header
            client.meta.events.register_last("before-call.s3.PutObject", _send_small_bodies_at_once)
            _clients[ident] = client
    return client


def _send_small_bodies_at_once(params: dict, **_) -> None:
    """A PutObject body under EXPECT_CONTINUE_MIN is sent with its headers: no `Expect: 100-continue` (a round
    trip that saves sending a body the server would refuse, worth it only for big ones), and as bytes, so
    botocore writes headers and body in one send (a file-like body goes in a second send, which can wait on
    TCP's delayed ACK). Retries resend the same bytes; the checksum headers are computed after this."""
    body = params.get("body")
    if isinstance(body, io.BytesIO) and len(body.getbuffer()) < EXPECT_CONTINUE_MIN and body.tell() == 0:
        params["headers"].pop("Expect", None)
        params["body"] = body.getvalue()


def transfer_config(multipart_threshold: int | None = None, multipart_chunksize: int | None = None):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=multipart_threshold or MULTIPART_THRESHOLD,
                          multipart_chunksize=multipart_chunksize or MULTIPART_CHUNKSIZE,
                          max_concurrency=MAX_CONCURRENCY, use_threads=True)


_HINTS = {
    "SignatureDoesNotMatch": "the secret key is wrong for this access key id; check AWS_SECRET_ACCESS_KEY",
    "InvalidAccessKeyId": "the access key id is unknown to this endpoint; check AWS_ACCESS_KEY_ID",
    "AccessDenied": "the credentials are not allowed this operation; check the key's policy or the credentials",
    "NoSuchBucket": "the bucket does not exist; create it or fix the bucket name in the URI",
    "NoSuchKey": "no such object",
    "PreconditionFailed": "the object changed while it was being downloaded (its ETag no longer matches); download "
                          "it again",
    "404": "no such object (or no such bucket)",
    "403": "access denied: wrong or missing credentials, or the key is not allowed this operation",
}


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", multipart_threshold: int | None = None,
                 multipart_chunksize: int | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize

    @property
    def client(self):
        return s3_client()

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _error(self, e: BaseException, op: str, key: str = "") -> StorageError:
        """Translate a botocore / s3transfer error into a message naming endpoint, bucket and key."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        endpoint = _endpoint() or "AWS S3 (default endpoint)"
        where = f"{op} s3://{self.bucket}/{self._key(key)} at {endpoint}"
        cause = e
        # s3transfer wraps the ClientError of a failed part / HEAD
        while not isinstance(cause, (ClientError, EndpointConnectionError, NoCredentialsError)) and cause.__cause__:
            cause = cause.__cause__
        if isinstance(cause, NoCredentialsError):
            msg = (f"{where}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile / "
                   "pod identity)")
        elif isinstance(cause, EndpointConnectionError):
            msg = (f"{where}: cannot connect to the endpoint (unreachable or not an S3 server); check "
                   f"{env_names.AWS_ENDPOINT_URL} and that the server is running")
        elif isinstance(cause, ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code") or cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
            hint = _HINTS.get(code, err.get("Message") or "request failed")
            msg = f"{where}: {code}: {hint}"
        else:
            msg = f"{where}: {type(e).__name__}: {e}"
        return StorageError(_scrub(msg))

    @contextlib.contextmanager
    def _errors(self, op: str, key: str = ""):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, op, key) from None
        except Exception as e:  # s3transfer raises its own wrappers (e.g. S3UploadFailedError)
            if type(e).__module__.startswith(("s3transfer", "boto3", "botocore")):
                raise self._error(e, op, key) from None
            raise

    def put_file(self, local_path, key, sha256=None, *, object_sha256=True):
        local_path = Path(local_path)
        size = local_path.stat().st_size
        threshold = self.multipart_threshold or MULTIPART_THRESHOLD
        if size < threshold:  # one request; read once, hashed in memory, the checksum goes into metadata
            data = local_path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            with self._errors("upload to", key):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       Metadata={SHA256_META: digest})
        elif sha256 or object_sha256:
            # multipart with the checksum in metadata: the metadata is fixed when the upload starts, so the file
            # is hashed first (unless the caller already has the hash)
            digest = sha256 or sha256_file(local_path)
            self._upload_file(local_path, key, {"Metadata": {SHA256_META: digest}})
        else:
            # the caller keeps the sha256 (a manifest written after the upload): hashed in a thread while the
            # parts go up, so the push costs no pass before its first byte (hashlib releases the GIL; the second
            # read of the file comes from the page cache). An object without the metadata is matched by its ETag
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wmvla-hash") as hashing:
                pending = hashing.submit(sha256_file, local_path)
                self._upload_file(local_path, key, None)
                digest = pending.result()
        _count_bytes("up", size)
        return digest

    def _upload_file(self, local_path: Path, key: str, extra_args: dict | None) -> None:
        with self._errors("upload to", key):
            self.client.upload_file(str(local_path), self.bucket, self._key(key), ExtraArgs=extra_args,
                                    Config=transfer_config(self.multipart_threshold, self.multipart_chunksize))

    def get_file(self, key, local_path):
        local_path = Path(local_path)
        with atomic_path(local_path, suffix=".part", fsync=False) as tmp:
            try:
                with self._errors("download", key):
                    digest, size = self._download_hashing(key, tmp)
            except _ShortBody as e:
                raise StorageError(f"download s3://{self.bucket}/{self._key(key)}: {e}") from None
        _count_bytes("down", size)
        return digest

    def _download_hashing(self, key: str, path: Path) -> tuple[str, int]:
        """Download into `path` in concurrent ranged GETs (one part size each, on the process-wide part pool),
        each part streamed to its place in the file, while this thread hashes the file in order right behind
        the writers (the file is memory-mapped: the hash reads the pages just written, in place, up to the
        newest contiguous byte): the sha256 is ready with the last byte, not after a second pass over the
        file. A one-part object is fetched and hashed in this thread. -> (sha256, size)

        The first GET asks for the first part: one request for a small object (boto3's download_file makes two,
        HEAD and GET), and its Content-Range gives the size. The other parts carry If-Match with its ETag, so an
        object replaced meanwhile fails the download instead of mixing two versions; a connection cut while a
        part streams resumes that part where it stopped (botocore retries only the request)."""
        from botocore.exceptions import ClientError

        client, bucket, full = self.client, self.bucket, self._key(key)
        part = self.multipart_chunksize or DOWNLOAD_PART
        try:
            first = client.get_object(Bucket=bucket, Key=full, Range=f"bytes=0-{part - 1}")
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) != "InvalidRange":
                raise
            first = client.get_object(Bucket=bucket, Key=full)  # an empty object has no byte 0
        content_range = first.get("ContentRange") or ""
        size = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else int(first["ContentLength"])
        etag = first.get("ETag")
        parts = [(start, min(size, start + part)) for start in range(0, size, part)] or [(0, 0)]
        if "/" not in content_range:  # the whole object came (an empty one, or a server ignoring Range): one part
            parts = [(0, size)]
        done = [0] * len(parts)  # bytes of each part in the file
        hashing = [0]  # the part the hashing thread is at
        cond = threading.Condition()
        failed: list[BaseException] = []
        # no O_TRUNC: atomic_path made the file, empty; ext4 flushes a truncated-then-rewritten file to disk at
        # close (auto_da_alloc), which cost ~45 ms per 128 MiB here
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

        def fetch(i: int, hasher=None) -> None:
            start, stop = parts[i]
            resp = first if i == 0 else None
            try:
                for attempt in range(STREAM_ATTEMPTS):
                    try:
                        if resp is None:
                            extra = {"IfMatch": etag} if etag else {}
                            resp = client.get_object(Bucket=bucket, Key=full,
                                                     Range=f"bytes={start + done[i]}-{stop - 1}", **extra)
                        if etag and resp.get("ETag") not in (None, etag):  # If-Match ignored by the server
                            raise StorageError(f"download {self.describe(key)}: the object changed while downloading "
                                               f"(ETag {etag} became {resp.get('ETag')}); download it again")
                        body = resp["Body"]
                        while chunk := body.read(STREAM_CHUNK):
                            if start + done[i] + len(chunk) > stop:
                                raise StorageError(f"download {self.describe(key)}: the server sent more bytes than "
                                                   "the requested range; refusing the object")
                            os.pwrite(fd, chunk, start + done[i])
                            if hasher is not None:  # one part: hashed as it arrives, in order
                                hasher.update(chunk)
                            with cond:
                                done[i] += len(chunk)
                                if i == hashing[0]:  # only the part the hashing waits for wakes it
                                    cond.notify_all()
                        if start + done[i] == stop:
                            return
                        raise _ShortBody(f"part {start}-{stop - 1} ended after {done[i]} bytes")
                    except _stream_errors():
                        resp = None
                        if attempt == STREAM_ATTEMPTS - 1:
                            raise
            except BaseException as e:
                with cond:
                    failed.append(e)
                    cond.notify_all()
                raise

        h = hashlib.sha256()
        if len(parts) == 1:  # a small object: one GET, no threads
            try:
                fetch(0, h)
            finally:
                os.close(fd)
            return h.hexdigest(), size
        mapped = view = None
        futures: list = []
        try:
            if size:
                # the file at its final size, mapped: the hashing reads the writers' pages in place (no copy)
                os.ftruncate(fd, size)
                mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
                view = memoryview(mapped)
            futures = [_part_pool().submit(fetch, i) for i in range(len(parts))]
            pos = 0
            for i, (start, stop) in enumerate(parts):
                while pos < stop and not failed:
                    with cond:
                        hashing[0] = i
                        cond.wait_for(lambda: start + done[i] > pos or failed)
                        ready = start + done[i]
                    h.update(view[pos:ready])
                    pos = ready
        finally:
            # no part may still write to this file descriptor once it is closed (its number would be reused)
            for fut in futures:
                fut.cancel()  # those not started (after a failure)
            concurrent.futures.wait(futures)
            if view is not None:
                view.release()
                mapped.close()
            os.close(fd)
        for fut in futures:
            if not fut.cancelled():
                fut.result()  # the first failure
        if failed:
            raise failed[0]
        return h.hexdigest(), size

    def put_bytes(self, key, data):
        with self._errors("put", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   Metadata={SHA256_META: hashlib.sha256(data).hexdigest()})
        _count_bytes("up", len(data))

    def get_bytes(self, key):
        with self._errors("get", key):
            data = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        _count_bytes("down", len(data))
        return data

    def list(self, prefix=""):
        full = _join(self.prefix, prefix)
        full = full + "/" if full and (prefix == "" or prefix.endswith("/")) else full
        out = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    out.append(ObjectInfo(rel, int(obj["Size"])))
        return out

    def list_dirs(self, prefix=""):
        full = _join(self.prefix, prefix)
        full = full + "/" if full else ""
        out = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full,
                                                                              Delimiter="/"):
                out += [p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(out)

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                # a missing bucket also answers 404 to HEAD: tell the two apart, the fix differs
                self.check()
                return None
            raise self._error(e, "head", key) from None
        except Exception as e:  # noqa: BLE001
            from botocore.exceptions import BotoCoreError

            if isinstance(e, BotoCoreError):
                raise self._error(e, "head", key) from None
            raise

    def exists(self, key):
        return self._head(key) is not None

    def delete(self, key):
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def child(self, subprefix):
        return S3Store(self.bucket, _join(self.prefix, subprefix), self.multipart_threshold, self.multipart_chunksize)

    def stored_sha256(self, key):
        head = self._head(key)
        if head is None:
            return None
        return (head.get("Metadata") or {}).get(SHA256_META)

    def matches(self, key, local_path, sha256=None):
        head = self._head(key)
        if head is None or int(head.get("ContentLength", -1)) != Path(local_path).stat().st_size:
            return False
        stored = (head.get("Metadata") or {}).get(SHA256_META)
        if stored:
            return stored == (sha256 or sha256_file(local_path))
        # no sha256 recorded (another tool's upload): the ETag is the MD5 of a single-part object or the MD5
        # of the part MD5s, recomputed locally for our part size and the AWS CLI's / boto3's default (8 MiB)
        etag = str(head.get("ETag", "")).strip('"')
        if not etag:
            return False
        chunks = {self.multipart_chunksize or MULTIPART_CHUNKSIZE, 8 * MiB} if "-" in etag else {MULTIPART_CHUNKSIZE}
        return any(multipart_etag(local_path, c) == etag for c in chunks)

    def check(self) -> None:
        """Fail early with a clear message when the bucket is missing or the credentials are wrong."""
        from botocore.exceptions import ClientError

        try:
            with self._errors("open bucket of", ""):
                # a listing, not HEAD: HEAD answers have no body, so a wrong secret would read as a bare 403
                self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except StorageError as e:
            cause = e.__context__
            if isinstance(cause, ClientError) and str(cause.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                raise StorageError(f"open bucket s3://{self.bucket} at {_endpoint() or 'AWS S3'}: NoSuchBucket: "
                                   f"{_HINTS['NoSuchBucket']}") from None
            raise


class _ShortBody(Exception):
    pass


_pool = None
_pool_lock = threading.Lock()


def _part_pool():
    """The process's threads for download parts, shared by all downloads (thread starts are paid once; the
    parts of every download in flight, e.g. sync_down's 32 files, share PART_THREADS connections). A part never
    waits for another task, so files waiting on their parts cannot deadlock the pool."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max_workers=PART_THREADS, thread_name_prefix="wmvla-part")
        return _pool


def _stream_errors() -> tuple:
    """Errors of a body that stops streaming (the request itself is retried by botocore)."""
    from botocore.exceptions import ConnectionClosedError, IncompleteReadError, ReadTimeoutError, \
        ResponseStreamingError

    return ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError, _ShortBody


def _scrub(text: str) -> str:
    """Belt and braces: no secret from the environment ever reaches a message."""
    for name in (env_names.AWS_SECRET_ACCESS_KEY, "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
