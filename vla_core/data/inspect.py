"""`wmvla data inspect PATH_OR_REPO [--keys.image-key ...]`: summarise a LeRobot dataset, check the keys.

Prints the codebase version, fps, features (dtype, shape, storage), episodes, frames, tasks with their
episode and frame counts, and whether each configured key exists. Any problem (unreadable or inconsistent
dataset, a missing key) ends with a clear message and a non-zero exit status.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import tyro
from rich.console import Console
from rich.table import Table

from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset


@dataclass
class InspectConfig:
    """Summarise a LeRobot dataset (local folder or hub id) and check the configured keys."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH_OR_REPO")]
    """dataset folder (holding meta/info.json) or hub dataset id 'owner/name'"""
    keys: DatasetKeys = field(default_factory=DatasetKeys)
    """dataset keys to check"""
    revision: str | None = None
    """hub revision (branch, tag or commit); ignored for a local folder"""
    check_keys: bool = True
    """fail when a configured key is missing"""
    metadata_only: bool = False
    """hub only: download just meta/ (no data checks, frame counts per task from episode metadata)"""


def _console() -> Console:
    # Wide when not a terminal (logs, tests) so task strings are printed whole.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


def run_inspect(cfg: InspectConfig) -> int:
    ds = LeRobotDataset.open(cfg.path, keys=None, revision=cfg.revision, metadata_only=cfg.metadata_only)
    con = _console()

    lengths = ds.ep_lengths
    summary = Table(title=f"LeRobot dataset {ds.source}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value")
    rows = [
        ("root", str(ds.root)),
        ("revision", ds.revision or "-"),
        ("codebase_version", ds.version),
        ("robot_type", str(ds.info.get("robot_type"))),
        ("fps", str(ds.fps)),
        ("episodes", str(ds.num_episodes)),
        ("frames", str(ds.num_frames)),
        ("tasks", str(len(ds.tasks))),
        ("episode length min/mean/max", f"{lengths.min()} / {lengths.mean():.1f} / {lengths.max()}"),
        ("data files", str(len(ds._data_files))),
        ("video files", str(sum(len({r.path for r in refs}) for refs in ds._video_refs.values()))),
        ("content hash", ds.fingerprint()["content_hash"][:16]),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    con.print(summary)

    roles = {cfg.keys.image_key: "image_key", cfg.keys.wrist_image_key: "wrist_image_key",
             cfg.keys.state_key: "state_key", cfg.keys.action_key: "action_key",
             cfg.keys.episode_key: "episode_key", cfg.keys.instruction_key: "instruction_key"}
    feats = Table(title="features")
    for c in ("key", "dtype", "shape", "storage", "role"):
        feats.add_column(c)
    for key, ft in ds.features.items():
        storage = {"image": "PNG in parquet", "video": "mp4"}.get(ft["dtype"], "parquet column")
        feats.add_row(key, str(ft["dtype"]), str(list(ft["shape"])), storage, roles.get(key, ""))
    feats.add_row("task", "string", "[1]", "meta/tasks via task_index", roles.get("task", ""))
    con.print(feats)

    ep_per_task = Counter(e.task for e in ds.episodes)
    if not ds.metadata_only and "task_index" in ds.features:
        frame_counts = np.bincount(ds.columns("task_index"), minlength=len(ds.tasks))
        frames_per_task = {t: int(frame_counts[i]) for i, t in enumerate(ds.tasks)}
    else:
        frames_per_task = Counter()
        for e in ds.episodes:
            frames_per_task[e.task] += e.length
    tasks = Table(title="tasks")
    for c in ("task_index", "task", "episodes", "frames"):
        tasks.add_column(c)
    for i, t in enumerate(ds.tasks):
        tasks.add_row(str(i), t, str(ep_per_task.get(t, 0)), str(frames_per_task.get(t, 0)))
    con.print(tasks)

    check = Table(title="configured keys")
    for c in ("role", "key", "status"):
        check.add_column(c)
    for role in ("image_key", "wrist_image_key", "state_key", "action_key", "instruction_key", "episode_key"):
        key = getattr(cfg.keys, role)
        if key is None:
            status = "not used"
        elif role == "instruction_key" and key == "task":
            status = "ok (meta/tasks via task_index)" if "task_index" in ds.features else "MISSING task_index"
        elif key in ds.features:
            status = f"ok ({ds.features[key]['dtype']} {list(ds.features[key]['shape'])})"
        else:
            status = "MISSING"
        check.add_row(role, str(key), status)
    con.print(check)

    if cfg.check_keys:
        cfg.keys.validate(ds.features, source=str(ds.root))  # WmvlaError -> message, exit status 2
    con.print(f"[green]ok[/green]: {ds.source} is a readable LeRobot {ds.version} dataset"
              + (" and the configured keys match" if cfg.check_keys else ""))
    return 0
