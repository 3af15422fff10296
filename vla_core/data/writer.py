"""Write LeRobot v3.0 datasets (used by the MetaWorld generator and the test fixtures).

Layout (as LeRobot 0.4 writes it, so LeRobot itself can read the result):

    meta/info.json                                   codebase_version "v3.0", fps, features, totals, templates
    meta/stats.json                                  dataset statistics per feature
    meta/tasks.parquet                               task string (pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet         one row per episode: length, data/video locations, stats
    data/chunk-XXX/file-YYY.parquet                  frames of many episodes, in global index order
    videos/<key>/chunk-XXX/file-YYY.mp4              (image_storage="video") many episodes back to back

Memory stays bounded: each episode is written to the open parquet (and mp4) file as soon as it is added;
only small per-episode metadata and the numeric columns (for exact dataset quantiles) are kept. Every file
is written under a temporary name and renamed when complete; `meta/info.json` is written last, so a dataset
without it is an interrupted write and readers refuse it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vla_core.data.video import DEFAULT_CODEC, VideoFileWriter, video_info
from vla_core.utils import WmvlaError, atomic_write_json

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk folder (LeRobot's default)
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
TASKS_PATH = "meta/tasks.parquet"

# The bookkeeping columns, exactly as LeRobot declares them.
DEFAULT_FEATURES: dict[str, dict] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
IMAGE_STATS_FRAMES = 16  # frames sampled per episode for image statistics (as LeRobot, a sample suffices)

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def is_image(feature: dict) -> bool:
    return feature.get("dtype") in ("image", "video")


def arrow_type(feature: dict) -> pa.DataType:
    """Arrow type of a feature column, matching what Hugging Face `datasets` writes for LeRobot features."""
    if is_image(feature):
        return IMAGE_STRUCT
    dtype, shape = feature["dtype"], list(feature["shape"])
    if dtype == "string":
        return pa.string()
    value = pa.from_numpy_dtype(np.dtype(dtype))
    if shape == [1]:
        return value
    if len(shape) == 1:
        return pa.list_(value, shape[0])  # fixed-size list = datasets.Sequence(length=D)
    raise WmvlaError(f"feature with shape {shape}: only scalar ([1]) and vector ([D]) numeric features are supported")


def hf_features_metadata(features: dict[str, dict]) -> bytes:
    """The `huggingface` schema metadata `datasets` uses to restore Image/Sequence features."""
    out = {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        if ft["dtype"] == "image":
            out[key] = {"_type": "Image"}
        elif list(ft["shape"]) == [1] or ft["dtype"] == "string":
            out[key] = {"dtype": ft["dtype"], "_type": "Value"}
        else:
            out[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": ft["shape"][0],
                        "_type": "Sequence"}
    return json.dumps({"info": {"features": out}}).encode()


def encode_png(img: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def validate_episode(features: dict[str, dict], task: str, frames: dict[str, np.ndarray]) -> tuple[dict, int]:
    """Check one episode against the user features; return (arrays cast to the feature dtypes, length)."""
    if not isinstance(task, str) or not task.strip():
        raise WmvlaError(f"episode task must be a non-empty instruction string, got {task!r}")
    user_keys = [k for k in features if k not in DEFAULT_FEATURES]
    given = set(frames)
    reserved = given & set(DEFAULT_FEATURES)
    if reserved:
        raise WmvlaError(f"frames must not contain {sorted(reserved)}: the writer adds the index columns itself")
    if given != set(user_keys):
        raise WmvlaError(
            f"frames keys do not match the features: missing {sorted(set(user_keys) - given)}, "
            f"unexpected {sorted(given - set(user_keys))}"
        )
    lengths = {k: len(v) for k, v in frames.items()}
    if len(set(lengths.values())) != 1:
        raise WmvlaError(f"all frame arrays must have the same length T, got {lengths}")
    T = next(iter(lengths.values()))
    if T < 1:
        raise WmvlaError("an episode needs at least one frame")
    out = {}
    for key in user_keys:
        ft = features[key]
        arr = np.asarray(frames[key])
        shape = tuple(ft["shape"])
        if is_image(ft):
            if arr.dtype != np.uint8 or arr.shape[1:] != shape:
                raise WmvlaError(f"{key}: expected uint8 [T, {', '.join(map(str, shape))}], got {arr.dtype} {list(arr.shape)}")
        elif ft["dtype"] == "string":
            arr = np.asarray([str(s) for s in arr], dtype=object)
        else:
            if shape == (1,) and arr.ndim == 1:
                arr = arr[:, None]
            if arr.shape[1:] != shape:
                raise WmvlaError(f"{key}: expected shape [T, {', '.join(map(str, shape))}], got {list(arr.shape)}")
            target = np.dtype(ft["dtype"])
            if np.issubdtype(target, np.floating) and not np.all(np.isfinite(arr)):
                raise WmvlaError(f"{key}: contains NaN or inf values")
            arr = arr.astype(target, copy=False)
        out[key] = arr
    return out, T


def numeric_stats(x: np.ndarray) -> dict[str, Any]:
    """LeRobot-style statistics of a numeric column [T, D] (vectorised over frames)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    q = np.quantile(x, list(QUANTILES.values()), axis=0)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    out.update({name: q[i] for i, name in enumerate(QUANTILES)})
    return {k: v.tolist() for k, v in out.items()}


def image_stats(images: np.ndarray) -> dict[str, Any]:
    """Per-channel statistics in [0, 1] with LeRobot's [3, 1, 1] shape, from a sample of frames."""
    T = len(images)
    sel = np.unique(np.linspace(0, T - 1, min(T, IMAGE_STATS_FRAMES)).round().astype(int))
    px = images[sel, ::4, ::4].reshape(-1, 3).astype(np.float64) / 255.0
    out = {"min": px.min(0), "max": px.max(0), "mean": px.mean(0), "std": px.std(0)}
    out = {k: v.reshape(3, 1, 1).tolist() for k, v in out.items()}
    out["count"] = [T]
    return out


def pooled_image_stats(per_episode: list[dict]) -> dict[str, Any]:
    """Combine per-episode image stats (weighted by episode length) into dataset stats."""
    w = np.array([s["count"][0] for s in per_episode], dtype=np.float64)
    mean = np.array([s["mean"] for s in per_episode])  # [E, 3, 1, 1]
    var = np.array([s["std"] for s in per_episode]) ** 2
    wn = (w / w.sum())[:, None, None, None]
    m = (wn * mean).sum(0)
    v = (wn * (var + (mean - m) ** 2)).sum(0)
    return {
        "min": np.min([s["min"] for s in per_episode], axis=0).tolist(),
        "max": np.max([s["max"] for s in per_episode], axis=0).tolist(),
        "mean": m.tolist(), "std": np.sqrt(v).tolist(), "count": [int(w.sum())],
    }


def tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as LeRobot writes it: a pandas DataFrame indexed by the task string."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    schema = pa.schema([("task_index", pa.int64()), ("__index_level_0__", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    return pa.table({"task_index": np.arange(len(tasks), dtype=np.int64), "__index_level_0__": tasks}, schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, **kwargs)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless `overwrite` (then only a dataset folder is removed)."""
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise WmvlaError(f"{root}: output folder exists and is not empty; pass overwrite=True or choose another path")
        if not ((root / "meta").is_dir() or (root / "data").is_dir()):
            raise WmvlaError(f"{root}: refusing to delete a folder that does not look like a LeRobot dataset")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


class LeRobotV3Writer:
    """Incremental LeRobot v3.0 writer.

        w = LeRobotV3Writer(root, fps=10, features={"observation.images.image": {"dtype": "image",
                            "shape": [256, 256, 3], "names": ["height", "width", "channels"]}, ...})
        w.add_episode("put the bowl on the plate", {"observation.images.image": uint8 [T,H,W,3],
                      "observation.state": float32 [T,8], "action": float32 [T,7]})
        w.finalize()

    `image_storage` decides how image features are stored, whatever their dtype in `features`:
    "png" -> dtype "image", PNG bytes inline in the data parquet; "video" -> dtype "video", mp4 per file.
    Also usable as a context manager (finalize on success, clean temporary files on error).
    """

    def __init__(self, root: str | os.PathLike, fps: int, features: dict, robot_type: str | None = None,
                 image_storage: str = "png", *, overwrite: bool = False, chunks_size: int = DEFAULT_CHUNK_SIZE,
                 data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
                 video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
                 row_group_frames: int | None = None, png_compress_level: int = 1, video_codec: str = DEFAULT_CODEC,
                 video_crf: int = 20, video_gop: int = 2):
        if image_storage not in ("png", "video"):
            raise WmvlaError(f"image_storage must be 'png' or 'video', got {image_storage!r}")
        if int(fps) != fps or fps <= 0:
            raise WmvlaError(f"fps must be a positive integer, got {fps!r}")
        self.root = Path(root)
        self.fps = int(fps)
        self.robot_type = robot_type
        self.image_storage = image_storage
        self.chunks_size = chunks_size
        self.data_files_size_in_mb = data_files_size_in_mb
        self.video_files_size_in_mb = video_files_size_in_mb
        # Random access to one inline PNG reads its whole row group (that column only): keep row groups
        # small when images are inline (16 frames of 256 px PNG ~ 2 MB per read), large otherwise.
        self.row_group_frames = row_group_frames or (16 if image_storage == "png" else 1000)
        self.png_compress_level = png_compress_level
        self.video_codec, self.video_crf, self.video_gop = video_codec, video_crf, video_gop

        self.features: dict[str, dict] = {}
        for key, ft in features.items():
            if key in DEFAULT_FEATURES:
                continue  # the writer owns the index columns
            if "/" in key:
                raise WmvlaError(f"feature name {key!r} must not contain '/' (LeRobot uses it in column names)")
            ft = {"dtype": ft["dtype"], "shape": list(ft["shape"]), "names": ft.get("names")}
            if is_image(ft):
                if len(ft["shape"]) != 3 or ft["shape"][2] != 3:
                    raise WmvlaError(f"{key}: image features need shape [H, W, 3], got {ft['shape']}")
                ft["dtype"] = "video" if image_storage == "video" else "image"
                ft["names"] = ft["names"] or ["height", "width", "channels"]
                if image_storage == "video":
                    h, w = ft["shape"][:2]
                    ft["info"] = video_info(video_codec, self.fps, h, w)
            else:
                arrow_type(ft)  # validates dtype/shape
            self.features[key] = ft
        self.features.update({k: dict(v) for k, v in DEFAULT_FEATURES.items()})
        self.image_keys = [k for k, ft in self.features.items() if is_image(ft)]
        self.video_keys = self.image_keys if image_storage == "video" else []

        columns = [(k, arrow_type(ft)) for k, ft in self.features.items() if ft["dtype"] != "video"]
        self._schema = pa.schema(columns, metadata={b"huggingface": hf_features_metadata(
            {k: ft for k, ft in self.features.items()})})

        prepare_root(self.root, overwrite)
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict] = []
        self._numeric: dict[str, list[np.ndarray]] = {
            k: [] for k, ft in self.features.items() if not is_image(ft) and ft["dtype"] != "string"}
        self._image_ep_stats: dict[str, list[dict]] = {k: [] for k in self.image_keys}
        self.total_frames = 0
        # open data file
        self._data_ci, self._data_fi = 0, 0
        self._data_writer: pq.ParquetWriter | None = None
        self._data_tmp: Path | None = None
        self._data_bytes = 0
        # open video files, per key
        self._video: dict[str, VideoFileWriter | None] = {k: None for k in self.video_keys}
        self._video_idx: dict[str, tuple[int, int]] = {k: (0, 0) for k in self.video_keys}
        self._finalized = False

    # ---------------------------------------------------------------------------------------- files

    def _data_path(self, ci: int, fi: int) -> Path:
        return self.root / DATA_PATH.format(chunk_index=ci, file_index=fi)

    def _close_data_file(self) -> None:
        if self._data_writer is not None:
            self._data_writer.close()
            os.chmod(self._data_tmp, 0o644)
            os.replace(self._data_tmp, self._data_path(self._data_ci, self._data_fi))
            self._data_writer, self._data_tmp, self._data_bytes = None, None, 0
            self._data_ci, self._data_fi = _next_file(self._data_ci, self._data_fi, self.chunks_size)

    def _open_data_file(self) -> None:
        path = self._data_path(self._data_ci, self._data_fi)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self._data_tmp = Path(tmp)
        self._data_writer = pq.ParquetWriter(tmp, self._schema)

    def _video_writer(self, key: str) -> tuple[VideoFileWriter, int, int]:
        vw = self._video[key]
        ci, fi = self._video_idx[key]
        if vw is not None and os.path.getsize(vw._tmp) / 2**20 >= self.video_files_size_in_mb:
            vw.close()
            vw = None
            ci, fi = self._video_idx[key] = _next_file(ci, fi, self.chunks_size)
        if vw is None:
            h, w = self.features[key]["shape"][:2]
            vw = VideoFileWriter(self.root / VIDEO_PATH.format(video_key=key, chunk_index=ci, file_index=fi),
                                 self.fps, w, h, codec=self.video_codec, crf=self.video_crf, gop=self.video_gop)
            self._video[key] = vw
        return vw, ci, fi

    # ------------------------------------------------------------------------------------- episodes

    def add_episode(self, task: str, frames: dict[str, np.ndarray], episode_meta: dict | None = None) -> int:
        """Append one episode; returns its episode_index. See the class docstring for `frames`."""
        if self._finalized:
            raise WmvlaError("add_episode after finalize()")
        user_features = {k: v for k, v in self.features.items() if k not in DEFAULT_FEATURES}
        arrays, T = validate_episode(user_features, task, frames)
        task = task.strip()
        ep_index = len(self._episodes)
        task_index = self._tasks.setdefault(task, len(self._tasks))
        start = self.total_frames

        frame_index = np.arange(T, dtype=np.int64)
        arrays["timestamp"] = (frame_index / self.fps).astype(np.float32)
        arrays["frame_index"] = frame_index
        arrays["episode_index"] = np.full(T, ep_index, dtype=np.int64)
        arrays["index"] = start + frame_index
        arrays["task_index"] = np.full(T, task_index, dtype=np.int64)

        row: dict[str, Any] = {"episode_index": ep_index, "tasks": [task], "length": T}

        # data parquet (roll to a new file at an episode boundary once the current one is big enough)
        if self._data_writer is not None and self._data_bytes / 2**20 >= self.data_files_size_in_mb:
            self._close_data_file()
        if self._data_writer is None:
            self._open_data_file()
        columns = {}
        for key, ft in self.features.items():
            if ft["dtype"] == "video":
                continue
            if ft["dtype"] == "image":
                data = [{"bytes": encode_png(img, self.png_compress_level), "path": None} for img in arrays[key]]
                columns[key] = pa.array(data, type=IMAGE_STRUCT)
            else:
                columns[key] = _to_arrow(arrays[key], self._schema.field(key).type)
        table = pa.table(columns, schema=self._schema)
        self._data_writer.write_table(table, row_group_size=self.row_group_frames)
        self._data_bytes += table.nbytes
        row["data/chunk_index"], row["data/file_index"] = self._data_ci, self._data_fi
        row["dataset_from_index"], row["dataset_to_index"] = start, start + T

        for key in self.video_keys:
            vw, ci, fi = self._video_writer(key)
            from_ts = vw.num_frames / self.fps
            vw.add(arrays[key])
            row[f"videos/{key}/chunk_index"], row[f"videos/{key}/file_index"] = ci, fi
            row[f"videos/{key}/from_timestamp"] = from_ts
            row[f"videos/{key}/to_timestamp"] = from_ts + T / self.fps

        for key in self.image_keys:
            s = image_stats(arrays[key])
            self._image_ep_stats[key].append(s)
            row.update({f"stats/{key}/{name}": v for name, v in s.items()})
        for key in self._numeric:
            self._numeric[key].append(arrays[key])
            row.update({f"stats/{key}/{name}": v for name, v in numeric_stats(arrays[key]).items()})
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        for k, v in (episode_meta or {}).items():
            if k in row or "/" in k:
                raise WmvlaError(f"episode_meta key {k!r} collides with a LeRobot episode column")
            if isinstance(v, np.generic):
                v = v.item()
            if not isinstance(v, (bool, int, float, str)) and v is not None:
                raise WmvlaError(f"episode_meta[{k!r}] must be a bool/int/float/str, got {type(v).__name__}")
            row[k] = v
        self._episodes.append(row)
        self.total_frames += T
        return ep_index

    # -------------------------------------------------------------------------------------- finalize

    def finalize(self) -> Path:
        """Close data/video files and write the metadata (meta/info.json last). Returns the root."""
        if self._finalized:
            return self.root
        if not self._episodes:
            self.abort()
            raise WmvlaError(f"{self.root}: no episodes were added; nothing to finalize")
        self._close_data_file()
        for key, vw in self._video.items():
            if vw is not None:
                vw.close()
                self._video[key] = None

        tasks = sorted(self._tasks, key=self._tasks.get)
        write_parquet_atomic(tasks_table(tasks), self.root / TASKS_PATH)
        try:
            episodes = pa.Table.from_pylist(self._episodes)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise WmvlaError(f"episode_meta values must have one type per key across episodes: {e}") from e
        write_parquet_atomic(episodes, self.root / EPISODES_PATH.format(chunk_index=0, file_index=0))

        stats = {key: numeric_stats(np.concatenate(arrs)) for key, arrs in self._numeric.items()}
        stats.update({key: pooled_image_stats(s) for key, s in self._image_ep_stats.items()})
        atomic_write_json(self.root / "meta/stats.json", stats, indent=4)

        n_ep = len(self._episodes)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": n_ep,
            "total_frames": self.total_frames,
            "total_tasks": len(tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_files_size_in_mb,
            "video_files_size_in_mb": self.video_files_size_in_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{n_ep}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "features": self.features,
        }
        atomic_write_json(self.root / "meta/info.json", info, indent=4)
        self._finalized = True
        return self.root

    def abort(self) -> None:
        """Remove temporary files of an unfinished write (finished files stay; there is no info.json)."""
        if self._data_writer is not None:
            with contextlib.suppress(Exception):
                self._data_writer.close()
            with contextlib.suppress(FileNotFoundError):
                self._data_tmp.unlink()
            self._data_writer = None
        for key, vw in self._video.items():
            if vw is not None:
                vw.abort()
                self._video[key] = None

    def __enter__(self) -> LeRobotV3Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _next_file(ci: int, fi: int, chunks_size: int) -> tuple[int, int]:
    return (ci + 1, 0) if fi == chunks_size - 1 else (ci, fi + 1)


def _to_arrow(arr: np.ndarray, type_: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(type_):
        flat = pa.array(np.ascontiguousarray(arr).reshape(-1), type=type_.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, type_.list_size)
    if pa.types.is_string(type_):
        return pa.array(list(arr), type=type_)
    return pa.array(np.ascontiguousarray(arr).reshape(-1), type=type_)
