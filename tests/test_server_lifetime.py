"""Servers the project starts end with the process that started them, however it ends (vla_core.keeper):

- the demo's embedded SeaweedFS, started exactly as `wmvla demo` starts it, after a SIGKILL of its owner
  (the same folder then starts again at once, data kept), and after Ctrl-C (SIGINT to the foreground
  process group: a graceful stop, nothing half-dead);
- a server started from a worker thread outlives that thread (why the keeper, not PR_SET_PDEATHSIG);
- a keeper killed with -9 takes its server along (the server's PR_SET_PDEATHSIG towards the keeper);
- a SeaweedFS left behind on a data folder (as older versions left it: no keeper, no lock) is stopped at
  start when it is idle, and named (pid, folder, command) when a client still uses it;
- the test suite's own servers (SeaweedFS, Prometheus, Pushgateway fixtures) are gone after pytest itself
  is killed with -9, as a CI timeout kills it, and a re-run on the same folders starts clean.

Every wait polls with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vla_core.keeper import Kept
from vla_core.storage import StorageError
from vla_core.storage.seaweed import PID_FILE, SeaweedFS, _start_time

ROOT = Path(__file__).resolve().parents[1]

# The owner restores Python's Ctrl-C handler first: a parent that ignores SIGINT (pytest started from a shell's
# background job, as CI may) hands SIG_IGN down, and Python then leaves it ignored, unlike a terminal's process.
OWNER = """
import contextlib, signal, sys, time
from pathlib import Path
from pipelines.demo import _embedded_store
signal.signal(signal.SIGINT, signal.default_int_handler)
with contextlib.ExitStack() as stack:
    print(_embedded_store(stack, Path(sys.argv[1])), flush=True)
    time.sleep(600)
"""


def _alive(pid: int, start: int | None) -> bool:
    """The same process (pid and start time: pids are reused) still runs (a zombie counts as gone)."""
    return start is not None and _start_time(pid) == start


def _wait_gone(procs: dict[int, int | None], what: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        left = {pid: start for pid, start in procs.items() if _alive(pid, start)}
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: still running after {deadline_s:.0f} s: "
                         + ", ".join(f"{pid} ({' '.join(_cmd(pid))[:120]})" for pid in left))


def _cmd(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _start_owner(data_dir: Path) -> tuple[subprocess.Popen, dict]:
    """A process that owns the embedded store as `wmvla demo` does; returns it and the folder's pid file."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(data_dir)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a SIGINT to it is a terminal's Ctrl-C
    line = proc.stdout.readline()
    assert line.startswith("s3://"), f"the owner did not start its store (exit {proc.wait()}); see {data_dir}/weed.log"
    info = json.loads((data_dir / PID_FILE).read_text())
    assert info["owner"] == proc.pid and _start_time(info["server"]) is not None
    return proc, info


def _keeper_lines(data_dir: Path, server_pid: int) -> str:
    return "\n".join(line for line in (data_dir / "weed.log").read_text(errors="replace").splitlines()
                     if "[wmvla keeper" in line and f"pid {server_pid}" in line)


def test_sigkill_of_the_demos_store_owner_leaves_no_server_and_the_folder_restarts(tmp_path):
    data_dir = tmp_path / "s3"
    owner, info = _start_owner(data_dir)
    server = {info["server"]: _start_time(info["server"]), info["keeper"]: _start_time(info["keeper"])}
    owner.send_signal(signal.SIGKILL)  # the owner only: its server lives in its own session
    owner.wait()
    # at once, as a user re-running the command would: this waits for the old keeper's graceful stop
    with SeaweedFS(data_dir) as again:
        _wait_gone(server, "the killed owner's SeaweedFS and its keeper")
        assert [b["Name"] for b in again.client().list_buckets()["Buckets"]] == ["wmvla-demo"]  # data kept
    log = _keeper_lines(data_dir, info["server"])
    assert "stopped gracefully with status 0" in log and "SIGKILL" not in log, log


def test_ctrl_c_stops_the_demos_store_gracefully(tmp_path):
    data_dir = tmp_path / "s3"
    owner, info = _start_owner(data_dir)
    server = {info["server"]: _start_time(info["server"]), info["keeper"]: _start_time(info["keeper"])}
    os.killpg(owner.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
    owner.wait(timeout=60)
    _wait_gone(server, "the SeaweedFS after Ctrl-C")
    log = _keeper_lines(data_dir, info["server"])
    # stopped once, by its owner's stop() (not by the SIGINT: it is in another session), gracefully
    assert "stop asked by the owner" in log and "stopped gracefully with status 0" in log, log
    assert "SIGINT" not in log and "SIGKILL" not in log, log
    assert not (data_dir / PID_FILE).exists()


def _pushgateway_args() -> tuple[list[str], str]:
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        pytest.fail("prometheus-pushgateway is not installed: scripts/setup.sh installs it (apt-get)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [binary, f"--web.listen-address=127.0.0.1:{port}"], f"http://127.0.0.1:{port}"


def _wait_ready(kept: Kept, url: str) -> None:
    from test_telemetry_servers import http_get, wait_until

    def ready():
        assert kept.poll() is None, f"the server exited with {kept.returncode}"
        return http_get(f"{url}/-/ready", timeout=2)

    wait_until(ready, url)


def test_a_server_started_from_a_thread_outlives_the_thread(tmp_path):
    """PR_SET_PDEATHSIG set on the server would kill it when the *thread* that forked it exits."""
    args, url = _pushgateway_args()
    got = {}
    with open(tmp_path / "pg.log", "wb") as log:
        t = threading.Thread(target=lambda: got.update(kept=Kept(args, log=log)))
        t.start()
        t.join()
    kept = got["kept"]
    try:
        _wait_ready(kept, url)  # the thread has ended: the server still answers
    finally:
        kept.stop()
    assert not _alive(kept.pid, _start_time(kept.pid))


def test_a_keeper_killed_with_minus_9_takes_its_server_along(tmp_path):
    """The last line of defence: the server has PR_SET_PDEATHSIG(SIGKILL) towards its (single-threaded) keeper."""
    args, url = _pushgateway_args()
    with open(tmp_path / "pg.log", "wb") as log:
        kept = Kept(args, log=log)
    server = {kept.pid: _start_time(kept.pid)}
    try:
        _wait_ready(kept, url)
    finally:
        os.kill(kept.keeper.pid, signal.SIGKILL)
        kept.keeper.wait()
    _wait_gone(server, "the server of a keeper killed with -9")


def _leave_behind(data_dir: Path) -> tuple[subprocess.Popen, int]:
    """A `weed mini` on data_dir as versions without the keeper left it: its own session, no lock, no pid
    file, its owner gone. Returns it and its S3 port."""
    with SeaweedFS(data_dir) as first:
        first.create_bucket("kept")
        args, env = first.proc.args, {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        port = first.port
    first._socket_dir()  # stop() removed it when it was in /tmp (a long data_dir); the old server expects it
    old = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                           cwd=data_dir, env=env, start_new_session=True)
    from test_telemetry_servers import wait_until

    def answers():
        assert old.poll() is None, "the left-behind server did not start"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True

    wait_until(answers, "the left-behind weed")
    return old, port


def test_a_server_left_behind_is_stopped_when_idle_and_named_when_busy(tmp_path, capsys):
    data_dir = tmp_path / "s3"
    old, port = _leave_behind(data_dir)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:  # someone still uses it
            client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # answered: accepted by the server
            assert client.recv(100).startswith(b"HTTP/1.1 ")
            with pytest.raises(StorageError) as e:
                SeaweedFS(data_dir).start()
            msg = str(e.value)
            assert f"pid {old.pid}" in msg and str(data_dir) in msg and f"`kill {old.pid}`" in msg, msg
            assert old.poll() is None, "a server in use was stopped"
        with SeaweedFS(data_dir) as s3:  # idle now: stopped, and the folder is served by a new server
            assert old.wait(timeout=30) == 0  # weed's graceful exit on SIGTERM
            assert [b["Name"] for b in s3.client().list_buckets()["Buckets"]] == ["kept"]
        assert f"stopping the idle server pid {old.pid}" in capsys.readouterr().err
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


HELD = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from conftest import s3_server  # noqa: F401  (the suite's fixtures, as its tests use them)
from test_telemetry_servers import servers  # noqa: F401


def test_hold(s3_server, servers):
    s3_server.create_bucket("held")
    hold = os.environ.get("HOLD_FILE")
    if hold:
        with open(hold + ".tmp", "w") as f:
            json.dump({{"s3": s3_server.data_dir.as_posix(), **servers}}, f)
        os.replace(hold + ".tmp", hold)
        time.sleep(600)
"""


def _descendants(pid: int) -> dict[int, int | None]:
    """pid's process tree (children by /proc/*/stat's ppid), with start times."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found[child] = _start_time(child)
                frontier.append(child)
    return found


def test_the_suites_servers_are_gone_after_pytest_is_killed(tmp_path):
    """A small pytest session that starts the suite's SeaweedFS, Prometheus and Pushgateway fixtures, killed
    with -9 (a CI timeout); then the same session again on the same folders passes."""
    (tmp_path / "held").mkdir()
    test_file = tmp_path / "held" / "test_held.py"
    test_file.write_text(HELD.format(tests=str(ROOT / "tests")))
    hold = tmp_path / "hold.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}",
           str(test_file)]
    env = {**os.environ, "HOLD_FILE": str(hold)}
    with open(tmp_path / "pytest1.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        from test_telemetry_servers import wait_until

        wait_until(lambda: hold.exists() or proc.poll() is not None, "the held session's servers", deadline_s=180)
        assert hold.exists(), (tmp_path / "pytest1.log").read_text()[-3000:]
        tree = _descendants(proc.pid)
        names = {os.path.basename(_cmd(p)[0]) for p in tree if _cmd(p)}
        assert {"weed", "prometheus", "prometheus-pushgateway"} <= names, names
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _wait_gone(tree, "the killed pytest's servers")
    env.pop("HOLD_FILE")
    again = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                           timeout=300)
    assert again.returncode == 0 and "1 passed" in again.stdout, again.stdout[-3000:]
