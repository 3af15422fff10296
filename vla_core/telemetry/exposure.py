"""How metrics leave the process: an HTTP endpoint (scraped by the chart's PodMonitor) and pushes to a
Pushgateway (so a job that ends between two scrapes still leaves its final values).

Both are best effort: a failure (port taken, gateway down, a bad URL) gives ONE warning per kind of failure
per process and the job carries on; metrics are never a reason for a training or evaluation to fail.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
import warnings

from prometheus_client import push_to_gateway, start_http_server
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.metrics_core import Metric

from vla_core import env_names
from vla_core.telemetry.metrics import REGISTRY

PUSH_JOB = "wmvla"  # the Pushgateway's `job` label of every group (the grouping key adds run/cell/microjob/shard)
PUSH_INTERVAL_S = 15.0  # the usual Prometheus scrape interval: pushing more often shows nothing new
PUSH_TIMEOUT_S = 5.0  # one push may block the pusher thread (or the final push at exit) at most this long
DEFAULT_METRICS_ADDR = "0.0.0.0"  # in a pod the PodMonitor scrapes the pod IP; tests bind 127.0.0.1


class TelemetryWarning(RuntimeWarning):
    """A metrics failure (reported once per kind; the job is not affected)."""


_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(kind: str, message: str) -> None:
    with _warn_lock:
        if kind in _warned:
            return
        _warned.add(kind)
    warnings.warn(f"metrics ({kind}): {message}. The job carries on without it; further {kind} failures in this "
                  "process are not reported.", TelemetryWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which failures were reported (tests that check the single warning)."""
    with _warn_lock:
        _warned.clear()


def push_target(url: str):
    """WMVLA_PUSHGATEWAY_URL -> (URL without user:password, urllib handler): `http://user:pass@host:9091`
    pushes with HTTP basic auth (a Pushgateway behind an authenticating proxy) and the password never
    appears in a URL that could end up in a message."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.username is None:
        return redact_url(url), default_handler
    user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")

    def handler(url, method, timeout, headers, data):
        return basic_auth_handler(url, method, timeout, headers, data, user, password)

    return redact_url(url), handler


def redact_url(url: str) -> str:
    """A URL without user:password (safe for messages)."""
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparsable URL>"


# ------------------------------------------------------------------------------------------- HTTP endpoint

_http_lock = threading.Lock()
_http_server = None  # (server, thread, port) once started; one per process


def ensure_http_server() -> int | None:
    """Start the process's metrics endpoint if WMVLA_METRICS_PORT is set (once; later calls return its port).

    Only the first process of a node-local group (LOCAL_RANK 0 or unset) serves it: under torchrun every rank
    would otherwise try the same port. The other ranks' metrics reach the Pushgateway."""
    global _http_server
    raw = os.environ.get(env_names.METRICS_PORT, "").strip()
    if not raw or os.environ.get("LOCAL_RANK", "0") != "0":  # LOCAL_RANK: torchrun's / accelerate's name
        return None
    with _http_lock:
        if _http_server is not None:
            return _http_server[2]
        try:
            port = int(raw)
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} is out of range 0..65535")
        except ValueError as e:
            warn_once("http", f"{env_names.METRICS_PORT}={raw!r} is not a TCP port number ({e}); no metrics endpoint")
            return None
        addr = os.environ.get(env_names.METRICS_ADDR, "").strip() or DEFAULT_METRICS_ADDR
        try:
            server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
        except OSError as e:
            warn_once("http", f"cannot serve metrics on {addr}:{port} ({e}); no metrics endpoint")
            return None
        _http_server = (server, thread, server.server_address[1])
        return _http_server[2]


def stop_http_server() -> None:
    global _http_server
    with _http_lock:
        if _http_server is not None:
            server, thread, _ = _http_server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            _http_server = None


# ------------------------------------------------------------------------------------------- Pushgateway


class JobView:
    """The samples of one job (those whose job labels match), as a registry for push_to_gateway: a process
    that runs several jobs (wmvla demo, matrix) pushes each to its own group, without the others' series."""

    def __init__(self, labels: dict[str, str]):
        self.labels = dict(labels)

    def collect(self):
        for metric in REGISTRY.collect():
            samples = [s for s in metric.samples if all(s.labels.get(k) == v for k, v in self.labels.items())]
            if samples:
                out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                out.samples = samples
                yield out


# pushes attempted and failed by every pusher of this process (for tests and debugging; not a metric)
push_counts = {"attempts": 0, "failures": 0}


class Pusher:
    """Pushes one job's samples to the Pushgateway every `interval_s` (background thread) and once more on
    `stop()`, grouped by the job labels; PUT semantics: each push replaces the group, so the last push is
    what stays."""

    def __init__(self, url: str, labels: dict[str, str], interval_s: float = PUSH_INTERVAL_S):
        self.url, self._handler = push_target(url)
        self._secret = urllib.parse.urlsplit(url if "://" in url else f"http://{url}").password
        self.labels = dict(labels)
        self.interval_s = float(interval_s)
        self.view = JobView(labels)
        self.pushes = 0  # successful pushes (tests, docs)
        self._lock = threading.Lock()  # the periodic and the final push never overlap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wmvla-metrics-push", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def push(self) -> bool:
        with self._lock:
            push_counts["attempts"] += 1
            try:
                push_to_gateway(self.url, job=PUSH_JOB, registry=self.view, grouping_key=self.labels,
                                timeout=PUSH_TIMEOUT_S, handler=self._handler)
            except Exception as e:  # noqa: BLE001 - any failure of a push is a metrics failure, never the job's
                push_counts["failures"] += 1
                reason = str(e).replace(self._secret, "***") if self._secret else str(e)
                warn_once("push", f"pushing to the Pushgateway at {self.url} ({env_names.PUSHGATEWAY_URL}) failed: "
                                  f"{type(e).__name__}: {reason}")
                return False
            self.pushes += 1
            return True

    def stop(self) -> None:
        """Stop the thread, then push the final values."""
        self._stop.set()
        self._thread.join(timeout=PUSH_TIMEOUT_S + 1)
        self.push()


def delete_run_groups(url: str, run: str) -> int:
    """Delete every group of `run` (its grouping label run=<run>) from the Pushgateway at `url`; returns how many.

    Called when a run's report is written (its last step): the groups' final values were pushed when each job
    ended, and Prometheus keeps the history it scraped; left on the gateway they would be scraped forever as if
    current (stale progress, rates, counters of finished runs). Best effort like every push: a failure warns."""
    import base64
    import json
    import urllib.request

    from prometheus_client import delete_from_gateway

    target, handler = push_target(url)
    try:
        request = urllib.request.Request(f"{target.rstrip('/')}/api/v1/metrics")
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.username is not None:  # the same basic auth the pushes use
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        with urllib.request.urlopen(request, timeout=PUSH_TIMEOUT_S) as response:
            listed = json.loads(response.read())["data"]
        groups = [dict(g["labels"]) for g in listed if g.get("labels", {}).get("run") == run]
        for labels in groups:
            job = labels.pop("job", PUSH_JOB)
            delete_from_gateway(target, job=job, grouping_key=labels, timeout=PUSH_TIMEOUT_S, handler=handler)
    except Exception as e:  # noqa: BLE001 - a metrics failure never fails the job
        secret = urllib.parse.urlsplit(url if "://" in url else f"http://{url}").password
        reason = str(e).replace(secret, "***") if secret else str(e)
        warn_once("delete", f"deleting run {run!r}'s groups from the Pushgateway at {target} "
                            f"({env_names.PUSHGATEWAY_URL}) failed: {type(e).__name__}: {reason}")
        return 0
    return len(groups)
