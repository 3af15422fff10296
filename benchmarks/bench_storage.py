"""Throughput of vla_core.storage against raw boto3, same server, same run (issue 13).

One real SeaweedFS server (vla_core.storage.seaweed, loopback, authentication on) and, interleaved in rounds
(the order flipped every round so other jobs' load hits both alike):

  big file   push: `publish_run` of a folder holding one --big-mb file (sha256 + multipart upload + manifest)
                   vs raw `client.upload_file` (boto3's default TransferConfig);
             pull: `pull_run` (download + sha256 verified against the manifest) vs raw `client.download_file`.
             Every round uses fresh keys and fresh local folders (nothing is skipped as "already there").
  small files  `sync_up` of --small-n files of --small-kb each (the thread pool) vs the same files uploaded
             one at a time with raw `client.upload_file` in a loop.

Goals: push and pull >= 0.9 of raw boto3; many small files >= 3x one at a time.

With --latency-ms, every round is measured twice: straight to the server (loopback: on 2 cores the server
shares the client's CPU, so this measures CPU cost) and through a latency-injecting loopback proxy
(vla_core.storage.netproxy, in its own process: that many ms per request exchange, as a bucket in a cloud region has; both ours
and raw boto3 go through it), where round trips, not CPU, bound the transfer.

    python benchmarks/bench_storage.py                        # ~1-2 min on 2 CPU cores
    python benchmarks/bench_storage.py --rounds 10 --latency-ms 15

Before the rounds the bucket gets volumes for all the bytes they write (SeaweedFS.grow_volumes): the write that
fills a volume waits while the server grows the next, and with the same bytes every round that stall would land
on the same step every other round (it did: our push behind the proxy, right after raw's). The output's
`volumes_grown_during_rounds` says whether one grew while measuring anyway.

Prints one JSON line per round (per step: wall seconds, our process's CPU seconds, of which in the kernel, and
the server's CPU seconds meanwhile) and one JSON object per setting: medians and quartiles of the per-round
ratios (raw time / our time: > 1 = ours faster), medians of the throughputs and of the CPU seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (the server's, here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(fn, server_pid: int) -> tuple[float, float, float, float]:
    """(wall seconds, this process's CPU seconds: the client's own cost, of which in the kernel, the server's CPU
    seconds meanwhile): where a step's time went on 2 shared cores"""
    r0, s0 = resource.getrusage(resource.RUSAGE_SELF), _proc_cpu(server_pid)
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    r1, s1 = resource.getrusage(resource.RUSAGE_SELF), _proc_cpu(server_pid)
    return (wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, r1.ru_stime - r0.ru_stime, s1 - s0)


def _client(endpoint: str, server):
    """A plain boto3 client (default retries / TransferConfig) for `endpoint` with the server's credentials."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, config=Config(s3={"addressing_style": "path"}))


def _one_round(r: int, setting: str, bucket: str, raw, tmp: Path, big_dir: Path, big: Path, small_dir: Path,
               small_files: list[Path], server_pid: int) -> dict:
    import shutil

    from vla_core.storage import publish_run, pull_run, sync_up

    tag = f"{setting}-{uuid.uuid4().hex[:8]}"
    ours_up = lambda: publish_run(big_dir, f"s3://{bucket}/ours-{tag}")  # noqa: E731
    raw_up = lambda: raw.upload_file(str(big), bucket, f"raw-{tag}/model.safetensors")  # noqa: E731
    ours_down = lambda: pull_run(f"s3://{bucket}/ours-{tag}", tmp / f"pull-{tag}")  # noqa: E731
    raw_down = lambda: raw.download_file(bucket, f"raw-{tag}/model.safetensors",  # noqa: E731
                                         str(tmp / f"raw-{tag}.bin"))
    ours_small = lambda: sync_up(small_dir, f"s3://{bucket}/small-ours-{tag}")  # noqa: E731

    def raw_small() -> None:
        for p in small_files:
            raw.upload_file(str(p), bucket, f"small-raw-{tag}/{p.relative_to(small_dir).as_posix()}")

    pairs = [("up", ours_up, raw_up), ("down", ours_down, raw_down), ("small", ours_small, raw_small)]
    row = {}
    for name, ours, base in pairs:
        if r % 2:
            t_base, t_ours = _timed(base, server_pid), _timed(ours, server_pid)
        else:
            t_ours, t_base = _timed(ours, server_pid), _timed(base, server_pid)
        row[name] = (t_ours, t_base)
    (tmp / f"raw-{tag}.bin").unlink()
    shutil.rmtree(tmp / f"pull-{tag}")
    print(json.dumps({"round": r, "setting": setting,
                      **{k: {"ours_wall_cpu_sys_server": [round(x, 3) for x in a],
                             "raw_wall_cpu_sys_server": [round(x, 3) for x in b]}
                         for k, (a, b) in row.items()}}), flush=True)
    return row


def _summary(rows: list[dict], mb: float, n_small: int) -> dict:
    def med(xs):
        return round(statistics.median(xs), 3)

    def quartiles(xs):
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return [round(q[0], 3), round(q[2], 3)]

    def ratios(name):  # raw time / our time per round: > 1 = ours faster
        return [r[name][1][0] / r[name][0][0] for r in rows]

    def cpu_ratio(name):  # our client CPU / raw client CPU, summed over rounds
        return round(sum(r[name][0][1] for r in rows) / max(1e-9, sum(r[name][1][1] for r in rows)), 3)

    def cpu_s(name, side, i):  # median seconds of CPU per step: 1 client, 2 of it in the kernel, 3 server
        return med([r[name][side][i] for r in rows])

    return {
        "push_mb_s": {"ours": med([mb / r["up"][0][0] for r in rows]), "raw_boto3": med([mb / r["up"][1][0] for r in rows])},
        "pull_mb_s": {"ours": med([mb / r["down"][0][0] for r in rows]),
                      "raw_boto3": med([mb / r["down"][1][0] for r in rows])},
        "push_ratio_vs_raw": med(ratios("up")), "push_ratio_quartiles": quartiles(ratios("up")),
        "pull_ratio_vs_raw": med(ratios("down")), "pull_ratio_quartiles": quartiles(ratios("down")),
        "small_files_per_s": {"ours_concurrent": med([n_small / r["small"][0][0] for r in rows]),
                              "raw_one_at_a_time": med([n_small / r["small"][1][0] for r in rows])},
        "small_speedup": med(ratios("small")), "small_speedup_quartiles": quartiles(ratios("small")),
        "client_cpu_ours_over_raw": {k: cpu_ratio(k) for k in ("up", "down", "small")},
        "cpu_s_client_kernel_server": {k: {"ours": [cpu_s(k, 0, i) for i in (1, 2, 3)],
                                           "raw": [cpu_s(k, 1, i) for i in (1, 2, 3)]} for k in ("up", "down", "small")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mb", type=int, default=128)
    ap.add_argument("--small-n", type=int, default=300)
    ap.add_argument("--small-kb", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="also measure behind a proxy adding this per request")
    args = ap.parse_args()

    from vla_core import env_names
    from vla_core.storage import publish_run
    from vla_core.storage.seaweed import SeaweedFS

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp_s, SeaweedFS(Path(tmp_s) / "s3") as server:
        tmp = Path(tmp_s)
        os.environ.update(server.env())
        bucket = server.create_bucket("bench")[len("s3://"):]
        settings = {"loopback": (server.endpoint, _client(server.endpoint, server))}
        proxy = None
        if args.latency_ms:  # its own process: forwarding in this one would compete for the client's GIL
            proxy = subprocess.Popen([sys.executable, "-m", "vla_core.storage.netproxy", str(server.port),
                                      str(args.latency_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            endpoint = f"http://127.0.0.1:{int(proxy.stdout.readline())}"
            settings[f"proxy_{args.latency_ms:g}ms"] = (endpoint, _client(endpoint, server))

        big_dir = tmp / "big"
        big_dir.mkdir()
        big = big_dir / "model.safetensors"
        with open(big, "wb") as f:
            for _ in range(args.big_mb):
                f.write(os.urandom(1024 * 1024))
        small_dir = tmp / "small"
        for i in range(args.small_n):
            p = small_dir / f"d{i % 10}" / f"f{i:05d}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(args.small_kb * 1024))
        small_files = sorted(p for p in small_dir.rglob("*") if p.is_file())
        # warm-up: the first writes to a new bucket allocate its volumes
        publish_run(small_dir, f"s3://{bucket}/warmup")
        # The bucket starts with one volume (1 GiB here); the write that fills one waits ~0.6-0.8 s while the
        # server grows the next. Every round writes the same bytes, so that stall would land on the same step
        # of every other round (measured: always our push behind the proxy after raw's). Volumes for all the
        # rounds' bytes are grown now, outside the timing; the output says whether any grew during the rounds.
        written = args.rounds * len(settings) * 2 * (big.stat().st_size + sum(p.stat().st_size for p in small_files))
        volumes_before = server.grow_volumes(bucket, min(64, 2 + -(-written // 2**30)))

        rows: dict[str, list] = {k: [] for k in settings}
        for r in range(args.rounds):
            for name, (endpoint, raw) in settings.items():  # interleaved: load changes hit both settings alike
                os.environ[env_names.AWS_ENDPOINT_URL] = endpoint
                rows[name].append(_one_round(r, name, bucket, raw, tmp, big_dir, big, small_dir, small_files,
                                             server.proc.pid))
        os.environ[env_names.AWS_ENDPOINT_URL] = server.endpoint
        if proxy:
            proxy.stdin.close()
            proxy.wait(30)

        result = {
            "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "big_mb": round(big.stat().st_size / 1e6, 1), "small_files": len(small_files), "small_kb": args.small_kb,
            "rounds": args.rounds, "volumes_grown_during_rounds": server.volumes(bucket) - volumes_before,
            **{name: _summary(rs, big.stat().st_size / 1e6, len(small_files)) for name, rs in rows.items()},
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
