"""Read LeRobot datasets (v3.0 and v2.x) from a local folder or the Hugging Face hub.

    ds = LeRobotDataset.open("HuggingFaceVLA/libero", keys=DatasetKeys())     # or a local path
    ds.episodes[0]            -> Episode(episode_index=0, start=0, length=214, task="put the ...")
    ds.columns("action")      -> float32 [num_frames, 7]          (pyarrow, only that column, cached)
    ds.frames("observation.images.image", [5, 6, 7]) -> uint8 [3, 256, 256, 3]
    ds.tasks_of([5, 6, 7])    -> ["put the ...", ...]

Design
- The episode index (start, length, task) comes from metadata only (meta/episodes or episodes.jsonl); no
  frame is decoded to build it. `open()` then checks the metadata against the data files cheaply (parquet
  footers, the integer index columns, file existence) so that inconsistent data fails at start-up with the
  file named, not as silently wrong windows in the middle of training.
- Frames are addressed by the global `index` (0..num_frames-1). Numeric columns are read with pyarrow,
  one column at a time, for all frames at once (no per-frame Python loop).
- Images: PNG bytes inline in parquet are read one row group at a time (small LRU cache) and decoded with
  PIL; mp4 frames are decoded with PyAV at `from_timestamp + timestamp` (see `video.VideoReader`).
- Worker safety: file handles and decoders live in a per-process cache that is dropped when the object is
  pickled or used in a new (forked) process, so DataLoader workers each open their own files lazily.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vla_core.data.keys import DatasetKeys
from vla_core.data.video import VideoReader
from vla_core.utils import WmvlaError

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
HUB_TIMEOUT_S = 10.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Episode:
    episode_index: int  # the dataset's episode id
    start: int  # global index of the episode's first frame
    length: int
    task: str  # the episode's (first) task; per-frame tasks come from `tasks_of`

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class _DataFile:
    path: str  # relative to root
    start: int  # global index of its first row
    rows: int


@dataclass(frozen=True)
class _VideoRef:
    path: str  # relative to root
    from_timestamp: float


# ----------------------------------------------------------------------------------- file helpers


def _bad(path: Path | str, problem: str, fix: str) -> WmvlaError:
    return WmvlaError(f"{path}: {problem}\nfix: {fix}")


def _short(e: BaseException, limit: int = 300) -> str:
    """An exception message cut to one readable line (pyarrow errors can dump whole schemas)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def read_parquet_metadata(path: Path) -> pq.FileMetaData:
    if not path.is_file():
        raise _bad(path, "file is missing", "the dataset is incomplete; download or regenerate it")
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        raise _bad(path, f"not a readable parquet file ({_short(e)})",
                   "the file is truncated or corrupt (an interrupted download or write?); "
                   "delete it and download or regenerate the dataset") from e


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    read_parquet_metadata(path)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise _bad(path, f"cannot read columns {columns} ({_short(e)})",
                   "the file is truncated or corrupt, or lacks a column that meta/info.json declares; "
                   "download or regenerate the dataset") from e


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise _bad(path, "file is missing", "the dataset is incomplete; download or regenerate it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"not valid JSON ({e})", "the file is corrupt; download or regenerate the dataset") from e


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise _bad(path, "file is missing", "the dataset is incomplete; download or regenerate it")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise _bad(path, f"line {i + 1} is not valid JSON ({e})", "the file is truncated or corrupt") from e
    return out


def column_to_numpy(col: pa.ChunkedArray | pa.Array, shape: Sequence[int], where: str = "") -> np.ndarray:
    """A scalar / list / fixed-size-list arrow column -> numpy [n, *shape] (vectorised)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if col.null_count:
        raise WmvlaError(f"{where}: column has {col.null_count} null values")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        values = col.flatten().to_numpy(zero_copy_only=False)
        width = int(np.prod(shape)) if len(shape) else 1
        if values.size != n * width:
            raise WmvlaError(f"{where}: expected {width} values per frame (shape {list(shape)}), "
                             f"found {values.size} values in {n} frames")
        return values.reshape(n, *shape)
    arr = col.to_numpy(zero_copy_only=False)
    if list(shape) not in ([], [1]):
        raise WmvlaError(f"{where}: expected shape {list(shape)} per frame, found a scalar column")
    return arr


# ---------------------------------------------------------------------------------------- the hub


def resolve_dataset(path_or_repo: str | os.PathLike, revision: str | None = None,
                    metadata_only: bool = False) -> tuple[Path, str, str | None]:
    """-> (local root, source as given, resolved hub commit or None for a local folder)."""
    text = str(path_or_repo)
    if text.startswith("s3://"):  # a dataset in the bucket: synced to the local cache (vla_core.storage)
        from vla_core.storage import sync_dataset

        return sync_dataset(text, metadata_only=metadata_only).resolve(), text, None
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise WmvlaError(f"{p}: expected a LeRobot dataset folder (with meta/info.json), found a file")
        return p.resolve(), str(p.resolve()), None
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise WmvlaError(f"{text}: no such folder, and not a hub dataset id of the form 'owner/name'")
    return _snapshot(text, revision, metadata_only)


def _snapshot(repo_id: str, revision: str | None, metadata_only: bool) -> tuple[Path, str, str | None]:
    from huggingface_hub import HfApi, snapshot_download

    how = (
        f"download it where the hub is reachable (`hf download {repo_id} --repo-type dataset --local-dir DIR`), "
        "copy DIR here and pass DIR instead of the repo id"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    online = False
    if not offline:
        # A short, bounded probe: an unreachable hub fails in seconds instead of hanging a worker.
        try:
            HfApi().dataset_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
            online = True
        except Exception as e:  # noqa: BLE001 - any failure means "use the local cache or fail clearly"
            name = type(e).__name__
            if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
                raise WmvlaError(f"hub dataset {repo_id!r} (revision {revision or 'main'}): {name}: {e}\nfix: {how}") from e
    patterns = ["meta/*", "meta/**"] if metadata_only else None
    try:
        local = snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns,
                                  local_files_only=not online, etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        state = "HF_HUB_OFFLINE is set" if offline else ("the hub is unreachable" if not online else "download failed")
        raise WmvlaError(
            f"hub dataset {repo_id!r} (revision {revision or 'main'}): {state} and no complete local copy is "
            f"cached ({type(e).__name__}: {e})\nfix: {how}"
        ) from e
    local = Path(local)
    return local, repo_id, local.name  # snapshot folders are named by commit hash


# -------------------------------------------------------------------------------------- the reader


class LeRobotDataset:
    """A LeRobot dataset on local disk. Build with `LeRobotDataset.open(...)`."""

    root: Path
    source: str
    revision: str | None
    info: dict
    version: str
    fps: int
    features: dict[str, dict]
    keys: DatasetKeys | None
    episodes: list[Episode]
    episode_of: np.ndarray
    tasks: list[str]  # by task_index

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def open(cls, path_or_repo: str | os.PathLike, keys: DatasetKeys | None = None, revision: str | None = None,
             *, verify: bool = True, metadata_only: bool = False) -> LeRobotDataset:
        """Open and check a dataset. `keys` are validated against the features (None: no key check).

        verify: also check the data files against the metadata (parquet footers, the integer index
        columns, video files present). metadata_only: for a hub id, download only meta/ (implies no
        verification; frames and columns are then unavailable).
        """
        root, source, resolved = resolve_dataset(path_or_repo, revision, metadata_only)
        self = cls.__new__(cls)
        self.root, self.source, self.revision = root, source, resolved
        self.metadata_only = metadata_only
        self._cache: dict[str, np.ndarray] = {}
        self._handles = _Handles()
        info_path = root / "meta" / "info.json"
        if not info_path.is_file():
            raise _bad(info_path, "missing: not a LeRobot dataset, or an interrupted write (info.json is written last)",
                       "point at the dataset root (the folder holding meta/ and data/) or regenerate it")
        self.info = _read_json(info_path)
        self.version = str(self.info.get("codebase_version"))
        if self.version not in SUPPORTED_VERSIONS:
            raise _bad(info_path, f"codebase_version {self.version!r} is not supported (supported: {list(SUPPORTED_VERSIONS)})",
                       "convert the dataset with LeRobot's conversion scripts "
                       "(e.g. lerobot.datasets.v30.convert_dataset_v21_to_v30) or use a v3.0 copy")
        for field in ("fps", "features"):
            if field not in self.info:
                raise _bad(info_path, f"has no {field!r} field", "the file is not a LeRobot info.json")
        self.fps = int(self.info["fps"])
        self.features = self.info["features"]
        for key, ft in self.features.items():
            if "dtype" not in ft or "shape" not in ft:
                raise _bad(info_path, f"feature {key!r} lacks dtype/shape", "the file is not a LeRobot info.json")
        if self.version == "v3.0":
            self._load_v3()
        else:
            self._load_v2()
        self._check_episodes()
        if verify and not metadata_only:
            self._verify_data()
        self.keys = keys
        if keys is not None:
            keys.validate(self.features, source=str(root))
        return self

    def _load_v3(self) -> None:
        root = self.root
        tasks_path = root / "meta" / "tasks.parquet"
        self.tasks = _tasks_from_table(read_parquet(tasks_path), tasks_path)
        ep_files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not ep_files:
            raise _bad(root / "meta" / "episodes", "no episode metadata files (chunk-*/file-*.parquet)",
                       "the dataset is incomplete; download or regenerate it")
        tables = []
        for f in ep_files:
            names = read_parquet_metadata(f).schema.to_arrow_schema().names
            tables.append(read_parquet(f, columns=[n for n in names if not n.startswith("stats/")]))
        try:
            eps = pa.concat_tables(tables, promote_options="permissive").to_pylist()
        except pa.ArrowException as e:
            raise _bad(ep_files[0].parent, f"episode metadata files have incompatible schemas ({_short(e)})",
                       "regenerate the dataset") from e
        self._meta_files = ["meta/info.json", "meta/tasks.parquet"] + [str(f.relative_to(root)) for f in ep_files]
        need = ["episode_index", "tasks", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
                "data/file_index"]
        missing = [c for c in need if eps and c not in eps[0]]
        if missing:
            raise _bad(ep_files[0], f"episode metadata lacks columns {missing}", "the dataset is not LeRobot v3.0; regenerate it")
        eps.sort(key=lambda r: r["dataset_from_index"])
        data_tpl = self.info.get("data_path") or "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        video_tpl = self.info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        episodes, file_rows = [], OrderedDict()
        self._video_refs = {k: [] for k in self.video_keys}
        for r in eps:
            start, stop, length = int(r["dataset_from_index"]), int(r["dataset_to_index"]), int(r["length"])
            if stop - start != length:
                raise _bad(ep_files[0], f"episode {r['episode_index']}: dataset_to_index - dataset_from_index = "
                           f"{stop - start} but length = {length}", "the episode metadata is corrupt; regenerate it")
            tasks = r.get("tasks") or []
            if isinstance(tasks, str):
                tasks = [tasks]
            task = tasks[0] if tasks else ""
            if not isinstance(task, str) or not task.strip():
                raise _bad(ep_files[0], f"episode {r['episode_index']} has an empty task string",
                           "every episode needs a non-empty language instruction; fix meta/tasks and the episodes' tasks")
            episodes.append(Episode(int(r["episode_index"]), start, length, task))
            rel = data_tpl.format(chunk_index=int(r["data/chunk_index"]), file_index=int(r["data/file_index"]))
            file_rows.setdefault(rel, []).append((start, length))
            for k in self.video_keys:
                cols = [f"videos/{k}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
                if any(c not in r for c in cols):
                    raise _bad(ep_files[0], f"no video location columns for video feature {k!r}",
                               "the episode metadata does not match meta/info.json; regenerate the dataset")
                frm, to = float(r[cols[2]]), float(r[cols[3]])
                if abs((to - frm) * self.fps - length) > 1.0:
                    raise _bad(ep_files[0], f"episode {r['episode_index']}: video {k!r} spans {to - frm:.3f}s "
                               f"= {(to - frm) * self.fps:.1f} frames but the episode has {length} frames",
                               "the episode metadata is inconsistent with the data; regenerate the dataset")
                vrel = video_tpl.format(video_key=k, chunk_index=int(r[cols[0]]), file_index=int(r[cols[1]]))
                self._video_refs[k].append(_VideoRef(vrel, frm))
        self.episodes = episodes
        self._data_files = []
        for rel, spans in file_rows.items():
            s0 = spans[0][0]
            pos = s0
            for s, n in spans:
                if s != pos:
                    raise _bad(self.root / rel, "its episodes are not contiguous in the global index",
                               "the episode metadata is inconsistent with the data; regenerate the dataset")
                pos += n
            self._data_files.append(_DataFile(rel, s0, pos - s0))

    def _load_v2(self) -> None:
        root = self.root
        tasks_path = root / "meta" / "tasks.jsonl"
        rows = _read_jsonl(tasks_path)
        by_index = {}
        for r in rows:
            if "task_index" not in r or "task" not in r:
                raise _bad(tasks_path, f"line {r} lacks task_index/task", "the file is not LeRobot tasks.jsonl")
            by_index[int(r["task_index"])] = r["task"]
        if sorted(by_index) != list(range(len(by_index))):
            raise _bad(tasks_path, f"task_index values {sorted(by_index)} are not 0..{len(by_index) - 1}", "regenerate the dataset")
        self.tasks = [by_index[i] for i in range(len(by_index))]
        _check_tasks(self.tasks, tasks_path)
        ep_path = root / "meta" / "episodes.jsonl"
        eps = sorted(_read_jsonl(ep_path), key=lambda r: int(r["episode_index"]))
        self._meta_files = ["meta/info.json", "meta/tasks.jsonl", "meta/episodes.jsonl"]
        chunks_size = int(self.info.get("chunks_size", 1000))
        data_tpl = self.info.get("data_path") or V2_DATA_PATH
        video_tpl = self.info.get("video_path") or V2_VIDEO_PATH
        self.episodes, self._data_files = [], []
        self._video_refs = {k: [] for k in self.video_keys}
        start = 0
        for r in eps:
            if "length" not in r:
                raise _bad(ep_path, f"episode {r.get('episode_index')} has no length", "regenerate the dataset")
            e, n = int(r["episode_index"]), int(r["length"])
            tasks = r.get("tasks") or []
            task = tasks[0] if tasks else ""
            if not isinstance(task, str) or not task.strip():
                raise _bad(ep_path, f"episode {e} has an empty task string",
                           "every episode needs a non-empty language instruction")
            self.episodes.append(Episode(e, start, n, task))
            chunk = e // chunks_size
            self._data_files.append(_DataFile(data_tpl.format(episode_chunk=chunk, episode_index=e), start, n))
            for k in self.video_keys:
                self._video_refs[k].append(_VideoRef(video_tpl.format(episode_chunk=chunk, video_key=k, episode_index=e), 0.0))
            start += n

    def _check_episodes(self) -> None:
        info_path = self.root / "meta" / "info.json"
        if not self.episodes:
            raise _bad(info_path, "the dataset has no episodes", "regenerate the dataset")
        idx = [e.episode_index for e in self.episodes]
        if len(set(idx)) != len(idx):
            raise _bad(self.root / "meta", "duplicate episode_index values in the episode metadata", "regenerate the dataset")
        pos = 0
        for e in self.episodes:
            if e.length <= 0:
                raise _bad(self.root / "meta", f"episode {e.episode_index} has length {e.length}", "regenerate the dataset")
            if e.start != pos:
                raise _bad(self.root / "meta", f"episode {e.episode_index} starts at global index {e.start}, expected "
                           f"{pos} (episodes must tile 0..total_frames-1)",
                           "the episode metadata is inconsistent with the data; regenerate the dataset")
            pos += e.length
        total_frames = self.info.get("total_frames")
        if total_frames is not None and int(total_frames) != pos:
            raise _bad(info_path, f"total_frames={total_frames} but the episodes hold {pos} frames",
                       "the metadata is inconsistent; regenerate the dataset")
        total_eps = self.info.get("total_episodes")
        if total_eps is not None and int(total_eps) != len(self.episodes):
            raise _bad(info_path, f"total_episodes={total_eps} but the episode metadata lists {len(self.episodes)}",
                       "the metadata is inconsistent; regenerate the dataset")
        lengths = np.array([e.length for e in self.episodes], dtype=np.int64)
        self.ep_starts = np.array([e.start for e in self.episodes], dtype=np.int64)
        self.ep_lengths = lengths
        self.episode_of = np.repeat(np.arange(len(self.episodes), dtype=np.int64), lengths)
        self._pos_of_episode_index = {e.episode_index: i for i, e in enumerate(self.episodes)}

    def _verify_data(self) -> None:
        """Cheap consistency checks of the data files against the metadata (no image is decoded)."""
        for f in self._data_files:
            path = self.root / f.path
            md = read_parquet_metadata(path)
            if md.num_rows != f.rows:
                raise _bad(path, f"has {md.num_rows} rows but the episode metadata assigns it {f.rows} frames",
                           "the episode metadata is inconsistent with the data; regenerate or re-download the dataset")
            names = set(md.schema.to_arrow_schema().names)
            missing = [k for k, ft in self.features.items() if ft["dtype"] != "video" and k not in names]
            if missing:
                raise _bad(path, f"lacks columns {missing} declared in meta/info.json",
                           "the data does not match meta/info.json; regenerate the dataset")
        for k, refs in self._video_refs.items():
            for rel in sorted({r.path for r in refs}):
                if not (self.root / rel).is_file():
                    raise _bad(self.root / rel, f"video file for feature {k!r} is missing",
                               "the dataset is incomplete; download or regenerate it")
        # The integer bookkeeping columns must agree with the episode index built from metadata.
        if "index" in self.features:
            index = self.columns("index")
            bad = np.flatnonzero(index != np.arange(self.num_frames))
            if bad.size:
                i = int(bad[0])
                raise _bad(self.root / self._file_of(i).path, f"row for global index {i} has index={index[i]}",
                           "the episode metadata is inconsistent with the data; regenerate the dataset")
        if "episode_index" in self.features:
            ep_col = self.columns("episode_index")
            expect = np.array([e.episode_index for e in self.episodes], dtype=np.int64)[self.episode_of]
            bad = np.flatnonzero(ep_col != expect)
            if bad.size:
                i = int(bad[0])
                raise _bad(self.root / self._file_of(i).path,
                           f"frame {i} has episode_index={ep_col[i]} but the episode metadata places it in episode {expect[i]}",
                           "the episode metadata is inconsistent with the data; regenerate the dataset")
        if "task_index" in self.features:
            t = self.columns("task_index")
            bad = np.flatnonzero((t < 0) | (t >= len(self.tasks)))
            if bad.size:
                i = int(bad[0])
                raise _bad(self.root / self._file_of(i).path, f"frame {i} has task_index={t[i]}, but there are "
                           f"{len(self.tasks)} tasks", "meta/tasks does not match the data; regenerate the dataset")

    # -------------------------------------------------------------------------------------- basics

    @property
    def num_frames(self) -> int:
        return int(self.ep_lengths.sum())

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def video_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "video"]

    @property
    def image_keys(self) -> list[str]:
        """All camera features (inline images and videos)."""
        return [k for k, ft in self.features.items() if ft["dtype"] in ("image", "video")]

    def episode(self, episode_index: int) -> Episode:
        """The episode with this dataset episode id."""
        try:
            return self.episodes[self._pos_of_episode_index[int(episode_index)]]
        except KeyError:
            raise WmvlaError(f"{self.root}: no episode {episode_index}") from None

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        return (f"LeRobotDataset({self.source!r}, version={self.version}, fps={self.fps}, "
                f"episodes={self.num_episodes}, frames={self.num_frames}, tasks={len(self.tasks)})")

    def _file_of(self, i: int) -> _DataFile:
        starts = [f.start for f in self._data_files]
        return self._data_files[int(np.searchsorted(starts, i, side="right")) - 1]

    def _need_data(self) -> None:
        if self.metadata_only:
            raise WmvlaError(f"{self.source}: opened with metadata_only=True; frames and columns are not available")

    # ------------------------------------------------------------------------------------- columns

    def columns(self, key: str) -> np.ndarray:
        """All frames of a numeric feature: numpy [num_frames, *shape] ([num_frames] for shape [1]). Cached."""
        if key in self._cache:
            return self._cache[key]
        self._need_data()
        if key not in self.features:
            raise WmvlaError(f"{self.root}: no feature {key!r}; available: {sorted(self.features)}")
        ft = self.features[key]
        if ft["dtype"] in ("image", "video"):
            raise WmvlaError(f"{key!r} is an image feature; use frames()")
        shape = [int(s) for s in ft["shape"]]
        shape = [] if shape == [1] else shape
        parts = []
        for f in self._data_files:
            path = self.root / f.path
            table = read_parquet(path, columns=[key])
            arr = column_to_numpy(table.column(key), shape, where=f"{path} column {key!r}")
            if len(arr) != f.rows:
                raise _bad(path, f"has {len(arr)} rows, the episode metadata expects {f.rows}",
                           "the episode metadata is inconsistent with the data; regenerate the dataset")
            parts.append(arr)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if ft["dtype"] != "string":
            out = out.astype(np.dtype(ft["dtype"]), copy=False)
        out.setflags(write=False)
        self._cache[key] = out
        return out

    def tasks_of(self, indices: Sequence[int] | np.ndarray, instruction_key: str | None = None) -> list[str]:
        """Language instruction of each frame (via task_index and meta/tasks, or a string column).

        instruction_key: default the opened keys' instruction_key, else "task".
        """
        indices = np.asarray(indices, dtype=np.int64)
        key = instruction_key or (self.keys.instruction_key if self.keys is not None else "task")
        if key == "task":
            ti = self.columns("task_index")[indices]
            return [self.tasks[int(t)] for t in ti]
        col = self.columns(key)[indices]
        out = [str(s) for s in col]
        for i, s in zip(indices, out):
            if not s.strip():
                raise WmvlaError(f"{self.root}: frame {int(i)} has an empty {key!r} string")
        return out

    # -------------------------------------------------------------------------------------- frames

    def frames(self, key: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Decoded images uint8 [n, H, W, 3] of frames `indices` (global), any order, repeats allowed."""
        self._need_data()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if key not in self.features or self.features[key]["dtype"] not in ("image", "video"):
            raise WmvlaError(f"{self.root}: {key!r} is not an image feature; image features: {self.image_keys}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_frames):
            raise IndexError(f"frame index out of range [0, {self.num_frames}): {indices.min()}..{indices.max()}")
        H, W, C = (int(s) for s in self.features[key]["shape"])
        out = np.empty((len(indices), H, W, 3), dtype=np.uint8)
        if self.features[key]["dtype"] == "video":
            self._frames_video(key, indices, out)
        else:
            self._frames_png(key, indices, out)
        return out

    def _frames_png(self, key: str, indices: np.ndarray, out: np.ndarray) -> None:
        h = self._handles.get()
        starts = np.array([f.start for f in self._data_files])
        fpos = np.searchsorted(starts, indices, side="right") - 1
        for j, (i, fp) in enumerate(zip(indices, fpos)):
            f = self._data_files[fp]
            path = self.root / f.path
            rg_starts = h.row_group_starts(path)
            row = int(i - f.start)
            rg = int(np.searchsorted(rg_starts, row, side="right") - 1)
            col = h.row_group_column(path, rg, key)
            item = col[row - int(rg_starts[rg])].as_py()
            data = item.get("bytes") if isinstance(item, dict) else item
            if data is None:
                raise _bad(path, f"image {key!r} of frame {int(i)} has no inline bytes (path={item.get('path')!r})",
                           "only images embedded in the parquet are supported; re-export the dataset with embedded images")
            try:
                img = Image.open(io.BytesIO(data))
                img = img.convert("RGB") if img.mode != "RGB" else img
                arr = np.asarray(img)
            except Exception as e:  # noqa: BLE001 - PIL raises many types
                raise _bad(path, f"image {key!r} of frame {int(i)} cannot be decoded ({e})", "the file is corrupt") from e
            if arr.shape != out.shape[1:]:
                raise _bad(path, f"image {key!r} of frame {int(i)} has shape {list(arr.shape)}, meta/info.json says "
                           f"{list(out.shape[1:])}", "the data does not match meta/info.json; regenerate the dataset")
            out[j] = arr

    def _frames_video(self, key: str, indices: np.ndarray, out: np.ndarray) -> None:
        h = self._handles.get()
        ts = self.columns("timestamp")
        refs = self._video_refs[key]
        ep = self.episode_of[indices]
        times = np.array([refs[e].from_timestamp for e in ep]) + ts[indices].astype(np.float64)
        paths = [refs[e].path for e in ep]
        for rel in dict.fromkeys(paths):
            sel = np.array([p == rel for p in paths])
            frames = h.video(self.root / rel, self.fps).read(times[sel])
            if frames.shape[1:] != out.shape[1:]:
                raise _bad(self.root / rel, f"decoded frames have shape {list(frames.shape[1:])}, meta/info.json says "
                           f"{list(out.shape[1:])}", "the video does not match meta/info.json; regenerate the dataset")
            out[sel] = frames

    # --------------------------------------------------------------------------------- fingerprint

    def fingerprint(self) -> dict:
        """Identity of the dataset for caches built on it (latents, stats).

        `content_hash` is a sha256 over the metadata files (info, tasks, episodes): cheap, and it changes
        whenever episodes, lengths, tasks or file layout change. Compare `content_hash` + `num_frames`
        to decide whether a cache still matches; `source` tells where it was built from.
        """
        h = hashlib.sha256()
        for rel in self._meta_files:
            h.update(rel.encode())
            h.update((self.root / rel).read_bytes())
        return {
            "source": self.source, "revision": self.revision, "version": self.version,
            "num_frames": self.num_frames, "num_episodes": self.num_episodes, "content_hash": h.hexdigest(),
        }

    # ------------------------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = None  # open files never cross a process boundary
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handles = _Handles()


# -------------------------------------------------------------------------------- per-process files


_INHERITED: list = []  # see _Handles.get


class _Handles:
    """Open parquet files, row-group caches and video decoders of one process (reset after fork)."""

    MAX_VIDEOS = 8
    MAX_ROW_GROUPS = 8

    def __init__(self):
        self._pid = None

    def get(self) -> _Handles:
        if self._pid != os.getpid():  # first use, or inherited through fork: start fresh
            if self._pid is not None:
                # Objects inherited through fork belong to the parent. Never close or free them here:
                # deallocating an inherited PyAV container in the child deadlocks inside FFmpeg.
                _INHERITED.append((self._parquet, self._row_groups, self._videos))
            self._pid = os.getpid()
            self._parquet: dict[Path, pq.ParquetFile] = {}
            self._rg_starts: dict[Path, np.ndarray] = {}
            self._row_groups: OrderedDict = OrderedDict()
            self._videos: OrderedDict = OrderedDict()
        return self

    def parquet(self, path: Path) -> pq.ParquetFile:
        pf = self._parquet.get(path)
        if pf is None:
            read_parquet_metadata(path)
            pf = self._parquet[path] = pq.ParquetFile(path)
        return pf

    def row_group_starts(self, path: Path) -> np.ndarray:
        s = self._rg_starts.get(path)
        if s is None:
            md = self.parquet(path).metadata
            n = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            s = self._rg_starts[path] = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        return s

    def row_group_column(self, path: Path, rg: int, key: str) -> pa.Array:
        k = (path, rg, key)
        col = self._row_groups.get(k)
        if col is not None:
            self._row_groups.move_to_end(k)
            return col
        try:
            col = self.parquet(path).read_row_group(rg, columns=[key]).column(key).combine_chunks()
        except (pa.ArrowException, OSError) as e:
            raise _bad(path, f"cannot read row group {rg} of column {key!r} ({_short(e)})",
                       "the file is truncated or corrupt; download or regenerate the dataset") from e
        self._row_groups[k] = col
        if len(self._row_groups) > self.MAX_ROW_GROUPS:
            self._row_groups.popitem(last=False)
        return col

    def video(self, path: Path, fps: float) -> VideoReader:
        r = self._videos.get(path)
        if r is not None:
            self._videos.move_to_end(path)
            return r
        r = self._videos[path] = VideoReader(path, fps)
        if len(self._videos) > self.MAX_VIDEOS:
            _, old = self._videos.popitem(last=False)
            old.close()
        return r


def _check_tasks(tasks: list[str], path: Path) -> None:
    for i, t in enumerate(tasks):
        if not isinstance(t, str) or not t.strip():
            raise _bad(path, f"task_index {i} has an empty task string {t!r}",
                       "every task needs a non-empty language instruction; fix the tasks file and regenerate")


def _tasks_from_table(table: pa.Table, path: Path) -> list[str]:
    """meta/tasks.parquet -> task strings by task_index (task string in a `task` column or the pandas index)."""
    names = table.schema.names
    if "task_index" not in names:
        raise _bad(path, f"no task_index column (columns: {names})", "the file is not LeRobot meta/tasks.parquet")
    col = "task" if "task" in names else None
    if col is None:
        meta = (table.schema.metadata or {}).get(b"pandas")
        if meta:
            idx = [c for c in json.loads(meta).get("index_columns", []) if isinstance(c, str)]
            col = idx[0] if idx and idx[0] in names else None
        if col is None and "__index_level_0__" in names:
            col = "__index_level_0__"
    if col is None:
        raise _bad(path, f"no task string column (columns: {names})", "the file is not LeRobot meta/tasks.parquet")
    ti = table.column("task_index").to_pylist()
    text = table.column(col).to_pylist()
    by_index = dict(zip(ti, text))
    if sorted(by_index) != list(range(len(by_index))):
        raise _bad(path, f"task_index values {sorted(by_index)} are not 0..{len(by_index) - 1}", "regenerate the dataset")
    tasks = [by_index[i] for i in range(len(by_index))]
    _check_tasks(tasks, path)
    return tasks
