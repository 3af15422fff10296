"""`wmvla results push|list|pull`: published runs in object storage (docs/storage.md).

    wmvla results push runs/mt10 s3://bucket/results          # -> s3://bucket/results/mt10/ (+ _manifest.json last)
    wmvla results list s3://bucket/results                    # runs with date, cells, verdict; incomplete ones flagged
    wmvla results pull s3://bucket/results/mt10 pulled/mt10   # verified (size + sha256); re-run resumes
    wmvla report pulled/mt10                                  # the report works on what was pulled

URI defaults to $WMVLA_RESULTS_URI. Credentials and endpoint: boto3's standard chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for MinIO / SeaweedFS / Ceph).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from vla_core import env_names
from vla_core.utils import WmvlaError


def results_uri_or_env(uri: str | None, how: str = "pass one (s3://bucket/prefix or a folder)") -> str:
    """`uri`, else $WMVLA_RESULTS_URI (the chart's ConfigMap sets it in every pipeline pod); a clear error when
    neither is set (`how` says how to give one)."""
    uri = uri or os.environ.get(env_names.RESULTS_URI)
    if not uri:
        raise WmvlaError(f"no results URI: {how} or set {env_names.RESULTS_URI}")
    return uri.rstrip("/")


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@dataclass
class ResultsPushConfig:
    """Publish a results folder to `<URI>/<name>/`, then its `_manifest.json` (written last)."""

    dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="DIR")]
    """the results folder (a `wmvla matrix` / `wmvla demo` output, or any folder)"""
    uri: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="URI")] = None
    """results root (s3://bucket/prefix or a folder); default $WMVLA_RESULTS_URI"""
    name: str | None = None
    """run name under URI; default the folder's name"""


def run_push(cfg: ResultsPushConfig) -> int:
    from vla_core.storage.runs import publish_run
    from vla_core.storage.store import open_store

    if not Path(cfg.dir).is_dir():
        raise WmvlaError(f"{cfg.dir}: no such folder to push")
    name = cfg.name or Path(cfg.dir).resolve().name
    if "/" in name or name in ("", ".", ".."):
        raise WmvlaError(f"--name {name!r}: expected one folder name without '/'")
    target = open_store(results_uri_or_env(cfg.uri)).child(name)
    print(f"results: publishing {cfg.dir} -> {target.uri}", flush=True)
    uri = publish_run(cfg.dir, target)
    print(f"results: published {uri} (manifest written last)")
    return 0


@dataclass
class ResultsListConfig:
    """List the runs under a results URI: date, completeness, size, cells and verdict."""

    uri: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="URI")] = None
    """results root (s3://bucket/prefix or a folder); default $WMVLA_RESULTS_URI"""
    json: bool = False
    """print JSON (one object per run) instead of a table"""


def run_list(cfg: ResultsListConfig) -> int:
    from vla_core.storage.runs import list_runs

    uri = results_uri_or_env(cfg.uri)
    runs = list_runs(uri)
    if cfg.json:
        import json

        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no runs under {uri}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs under {uri}")
    for col in ("run", "created", "state", "files", "size", "cells", "verdict"):
        table.add_column(col)
    for r in runs:
        cells = r.get("cells")
        table.add_row(r["name"], r.get("created") or "-", "complete" if r["complete"] else "INCOMPLETE",
                      str(r.get("files", "?")), _human(r.get("total_bytes")),
                      ", ".join(cells) if cells else "-", str(r.get("verdict") or r.get("problem") or "-"))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


@dataclass
class ResultsPullConfig:
    """Download a published run, verifying every file against its manifest (re-running resumes)."""

    uri: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="URI")]
    """the run's URI (s3://bucket/prefix/<run> or a folder), as `wmvla results list` shows it"""
    dir: Annotated[Path | None, tyro.conf.Positional, tyro.conf.arg(metavar="DIR")] = None
    """local folder; default ./<run name>"""
    allow_incomplete: bool = False
    """pull a run without a manifest (unverified) or with missing / corrupted files (skipping those)"""


def run_pull(cfg: ResultsPullConfig) -> int:
    from vla_core.storage.runs import pull_run

    uri = cfg.uri.rstrip("/")
    local = Path(cfg.dir) if cfg.dir is not None else Path(uri.rsplit("/", 1)[-1])
    print(f"results: pulling {uri} -> {local}", flush=True)
    res = pull_run(uri, local, allow_incomplete=cfg.allow_incomplete)
    print(f"results: {res['files']} files: {res['downloaded']} downloaded ({_human(res['bytes'])}), "
          f"{res['skipped']} already there and verified")
    if not res["complete"]:
        print("results: WARNING: the pulled run is incomplete (--allow-incomplete):\n  - "
              + "\n  - ".join(res["problems"][:20]), file=sys.stderr)
    print(f"results: `wmvla report {local}` rebuilds the report from it")
    return 0
