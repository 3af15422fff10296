"""Servers that end with the process that started them, however it ends (SIGKILL included).

    server = Kept([binary, *args], log=open(path, "ab"))   # started; server.pid is the server's pid
    ...
    server.stop()                                           # graceful: SIGTERM, a grace period, then SIGKILL

Used for every server the project starts for a user or a test: the embedded SeaweedFS of `wmvla demo`
(vla_core.storage.seaweed), and the tests' and benchmarks' Prometheus and Pushgateway.

Design: a keeper process (this file, run by its path with this interpreter; standard library only) sits
between the owner (the process that creates Kept) and the server:

    owner --(control pipe: the owner holds the only write end)--> keeper --(child, PR_SET_PDEATHSIG)--> server

- The keeper stops the server (SIGTERM, wait `grace_s`, SIGKILL) when the owner writes to the control pipe
  (stop()), when the pipe reaches EOF, or when its parent is no longer the owner (the owner died and the
  keeper was re-parented). The kernel closes the pipe when the owner dies, however it dies; the parent check
  and the explicit byte cover an owner whose pipe end lives on in a child forked without exec
  (multiprocessing's fork start method), where EOF would not come. A crash and a normal stop end the server
  the same way.
- Why not PR_SET_PDEATHSIG on the server directly: it fires when the *thread* that forked exits, not the
  process, so a server started from a worker thread (a thread pool, a fixture run in a thread) would be
  killed as soon as that thread returned; and it sends one signal, with nobody to wait for the graceful
  stop or to escalate when it hangs. The keeper is single-threaded, so it can set PR_SET_PDEATHSIG(SIGKILL)
  on the server safely: if the keeper itself is SIGKILLed (kill -9 of its group), the server dies too.
- The keeper and the server run in their own session (start_new_session): Ctrl-C in a terminal sends
  SIGINT to the foreground process group, which then reaches only the owner; its KeyboardInterrupt unwinds
  to stop() (or its death closes the pipe), and the server is stopped once, gracefully, instead of being
  interrupted mid-write while the owner still uses it. A closed terminal (SIGHUP) likewise.
- SIGTERM to the keeper (`kill KEEPER_PID`, the command the error messages give) stops the server
  gracefully as well.

The keeper reports the server's pid on a status pipe, writes one line per event to the server's log (the
owner can tell a graceful stop from a forced one), and exits with the server's exit status.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


class KeeperError(RuntimeError):
    pass


class Kept:
    """A server process kept by a keeper: it ends when this process ends (see the module docstring)."""

    def __init__(self, args: list[str], *, log, cwd: str | os.PathLike | None = None, env: dict | None = None,
                 pass_fds: tuple[int, ...] = (), grace_s: float = GRACE_S, start_timeout_s: float = 30.0):
        """Start `args` under a keeper. `log`: a binary file (or fd) for the server's output and the keeper's
        lines; `pass_fds`: descriptors the *keeper* inherits (a lock that must be held as long as the server
        runs), not the server; `grace_s`: how long a stop waits after SIGTERM before SIGKILL."""
        self.args = list(args)
        self.grace_s = grace_s
        control_r, self._control_w = os.pipe()  # both ends close-on-exec: only what pass_fds names is inherited
        status_r, status_w = os.pipe()
        try:
            cmd = [sys.executable, "-S", os.path.abspath(__file__), "--owner", str(os.getpid()),
                   "--control", str(control_r), "--status", str(status_w), "--grace", str(grace_s), "--", *args]
            self.keeper = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env,
                                           pass_fds=(control_r, status_w, *pass_fds), start_new_session=True)
        except BaseException:
            os.close(self._control_w)
            os.close(status_r)
            raise
        finally:
            os.close(control_r)
            os.close(status_w)
        try:
            self.pid = self._read_server_pid(status_r, start_timeout_s)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(status_r)

    def _read_server_pid(self, fd: int, timeout_s: float) -> int:
        got = b""
        deadline = time.monotonic() + timeout_s
        while not got.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise KeeperError(f"the keeper of {self.args[0]} did not report a server pid in {timeout_s:.0f} s")
            chunk = os.read(fd, 64)
            if not chunk:
                code = self.keeper.wait()
                raise KeeperError(f"{self.args[0]} could not be started (keeper exit status {code}); see its log")
            got += chunk
        return int(got)

    def poll(self) -> int | None:
        """None while the server runs, else its exit status (the keeper exits with it)."""
        return self.keeper.poll()

    @property
    def returncode(self) -> int | None:
        return self.keeper.returncode

    def stop(self, timeout_s: float | None = None) -> int:
        """Stop the server gracefully (SIGTERM, then SIGKILL after the grace period) and wait for it.
        Idempotent. Returns the server's exit status."""
        if self._control_w is not None:
            # a byte, not only EOF: a child this process forked without exec may hold a copy of the write end
            with contextlib.suppress(OSError):
                os.write(self._control_w, b"stop\n")
            with contextlib.suppress(OSError):
                os.close(self._control_w)
            self._control_w = None
        try:
            return self.keeper.wait(timeout=(timeout_s if timeout_s is not None else self.grace_s) + 10)
        except subprocess.TimeoutExpired:  # the keeper itself is stuck: its whole session goes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.keeper.pid, signal.SIGKILL)
            return self.keeper.wait()


# ------------------------------------------------------------------------------------------- the keeper

def _say(msg: str) -> None:
    print(f"[wmvla keeper {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def _keep(owner: int, control: int, status: int, grace_s: float, args: list[str]) -> int:
    stop_asked: list[str] = []

    def on_signal(signum, _frame):
        stop_asked.append(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    me = os.getpid()

    def die_with_keeper() -> None:  # runs in the server's process between fork and exec
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(125)
        if os.getppid() != me:  # the keeper died before prctl took effect
            os._exit(125)

    try:
        server = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_keeper)
    except OSError as e:
        _say(f"cannot start {args[0]}: {e}")
        return 127
    os.write(status, f"{server.pid}\n".encode())
    os.close(status)
    _say(f"started {os.path.basename(args[0])} pid {server.pid} for owner pid {owner}")
    why = ""
    while not why:
        if server.poll() is not None:
            _say(f"server pid {server.pid} exited by itself with status {server.returncode}")
            return server.returncode if server.returncode >= 0 else 128 - server.returncode
        try:
            ready = select.select([control], [], [], 0.5)[0]
        except InterruptedError:
            ready = []
        if stop_asked:
            why = f"{stop_asked[0]} to the keeper"
        elif ready:
            asked = os.read(control, 4096)
            why = "stop asked by the owner" if asked else "owner's control pipe closed (it exited or died)"
        elif os.getppid() != owner:
            why = f"owner pid {owner} is gone"
    _say(f"stopping server pid {server.pid}: {why}; SIGTERM")
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=grace_s)
        _say(f"server pid {server.pid} stopped gracefully with status {code}")
    except subprocess.TimeoutExpired:
        server.kill()
        code = server.wait()
        _say(f"server pid {server.pid} did not stop within {grace_s:g} s; SIGKILL")
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="vla_core/keeper.py", description=__doc__.split("\n")[0])
    p.add_argument("--owner", type=int, required=True)
    p.add_argument("--control", type=int, required=True)
    p.add_argument("--status", type=int, required=True)
    p.add_argument("--grace", type=float, default=GRACE_S)
    p.add_argument("args", nargs="+")
    a = p.parse_args(argv)
    if os.getppid() != a.owner:  # the owner died while we started
        return 1
    return _keep(a.owner, a.control, a.status, a.grace, a.args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
