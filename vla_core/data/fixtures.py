"""Small LeRobot datasets generated in code, with the exact schema of HuggingFaceVLA/libero.

    make_libero_like(path, layout="v3_png" | "v3_mp4" | "v2.1" | "v2.1_png", episodes=6, seed=0, image_size=256)

Schema (as HuggingFaceVLA/libero): two cameras `observation.images.image` (agent view) and
`observation.images.image2` (wrist), [S, S, 3] uint8 (S = 256 in the real dataset; smaller sizes keep
tests fast), `observation.state` float32 [8], `action` float32 [7] whose last dim is the gripper in {-1, +1},
fps 10, several tasks, episodes of different lengths, language under `task`.

Images are informative so tests can tell which frame was decoded: `libero_like_image(episode, t, camera,
size)` draws a background colour per episode and camera, a top band whose grey level depends on t, and a
white square that moves with t. State and action are smooth functions of (episode, t) plus noise,
reproducible from the seed (`libero_like_episode`).

`write_lerobot_v21` writes the older v2.1 layout (one parquet and one mp4 per episode, jsonl metadata);
it exists for fixtures and reader tests, new data is written as v3.0 by `writer.LeRobotV3Writer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from vla_core.data.video import DEFAULT_CODEC, VideoFileWriter, video_info
from vla_core.data.writer import (
    DEFAULT_FEATURES,
    IMAGE_STRUCT,
    LeRobotV3Writer,
    _to_arrow,
    arrow_type,
    encode_png,
    hf_features_metadata,
    image_stats,
    is_image,
    numeric_stats,
    prepare_root,
    validate_episode,
    write_parquet_atomic,
)
from vla_core.utils import WmvlaError, atomic_write_json, atomic_write_text

LAYOUTS = ("v3_png", "v3_mp4", "v2.1", "v2.1_png")
LIBERO_FPS = 10
LIBERO_TASKS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "pick up the alphabet soup and place it in the basket",
    "turn on the stove and put the moka pot on it",
)
CAMERA_KEYS = ("observation.images.image", "observation.images.image2")


def libero_features(image_size: int = 256) -> dict:
    """Feature dict of HuggingFaceVLA/libero (image dtype; the writer switches to video if asked)."""
    img = {"dtype": "image", "shape": [image_size, image_size, 3], "names": ["height", "width", "channel"]}
    return {
        CAMERA_KEYS[0]: dict(img),
        CAMERA_KEYS[1]: dict(img),
        "observation.state": {"dtype": "float32", "shape": [8], "names": {
            "motors": ["x", "y", "z", "axis_angle1", "axis_angle2", "axis_angle3", "gripper", "gripper"]}},
        "action": {"dtype": "float32", "shape": [7], "names": {
            "motors": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]}},
    }


def _texture(camera: int, size: int) -> np.ndarray:
    """A fixed noise pattern per camera (static 'scene detail'): PNG/mp4 sizes and decode costs close to
    rendered images, where flat colours would compress unrealistically well."""
    return np.random.default_rng(1000 + camera).integers(0, 48, size=(size, size, 3), dtype=np.uint8)


def libero_like_image(episode: int, t: int, camera: int, size: int, texture: bool = False) -> np.ndarray:
    """Deterministic frame: colour per (episode, camera), grey band per t, square moving with t
    (+ a static noise texture when `texture`)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    base = np.array([40 + 37 * (episode % 5), 60 + 29 * (episode % 6), 200 - 45 * camera], dtype=np.uint8)
    img[:] = base
    if texture:
        img += _texture(camera, size)
    band = size // 4
    img[:band] = (30 + 23 * t + 60 * camera) % 200 + 30
    sq = max(2, size // 4)
    step = max(1, size // 16)
    x = (t * step) % (size - sq)
    y = size // 2
    img[y:y + sq, x:x + sq] = 255
    return img


def libero_like_episode(episode: int, length: int, image_size: int, rng: np.random.Generator,
                        texture: bool = False) -> dict[str, np.ndarray]:
    """One episode's frames in the LIBERO schema."""
    t = np.arange(length, dtype=np.float32)[:, None]
    drift = rng.normal(0, 0.5, size=(1, 6)).astype(np.float32)
    pose = np.concatenate([0.1 * episode + 0.01 * drift[:, :3] * t, np.sin(0.05 * t + drift[:, 3:])], axis=1)
    close_at = length // 2
    gripper_action = np.where(np.arange(length) < close_at, -1.0, 1.0).astype(np.float32)[:, None]
    finger = np.where(gripper_action > 0, 0.01, 0.04).astype(np.float32)
    state = np.concatenate([pose, finger, -finger], axis=1) + rng.normal(0, 1e-3, size=(length, 8))
    arm = np.clip(0.5 * np.sin(0.3 * t + drift) + rng.normal(0, 0.1, size=(length, 6)), -0.9375, 0.9375)
    action = np.concatenate([arm, gripper_action], axis=1)
    frames = {
        CAMERA_KEYS[c]: np.stack([libero_like_image(episode, i, c, image_size, texture) for i in range(length)])
        for c in range(2)
    }
    frames["observation.state"] = state.astype(np.float32)
    frames["action"] = action.astype(np.float32)
    return frames


def episode_lengths(episodes: int, seed: int, min_length: int, max_length: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    lengths = rng.integers(min_length, max_length + 1, size=episodes).tolist()
    if episodes > 1 and len(set(lengths)) == 1 and max_length > min_length:
        lengths[1] = min_length if lengths[0] != min_length else max_length
    return lengths


def make_libero_like(path: str | os.PathLike, layout: str = "v3_png", episodes: int = 6, seed: int = 0,
                     image_size: int = 256, num_tasks: int = 3, min_length: int = 8, max_length: int = 20,
                     overwrite: bool = True, texture: bool = False, **writer_kwargs) -> Path:
    """Write a LIBERO-schema dataset in `layout` to `path`; returns the dataset root.

    Episode e has task LIBERO_TASKS[e % num_tasks] and a length drawn from [min_length, max_length]
    (at least two different lengths). `texture` adds a static noise pattern to the images (realistic
    PNG/mp4 sizes for benchmarks; frames stay reproducible with libero_like_image(..., texture=True)).
    `writer_kwargs` go to LeRobotV3Writer (e.g. data_files_size_in_mb
    to force several data files).
    """
    if layout not in LAYOUTS:
        raise WmvlaError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 1 <= num_tasks <= len(LIBERO_TASKS):
        raise WmvlaError(f"num_tasks must be in 1..{len(LIBERO_TASKS)}")
    rng = np.random.default_rng(seed)
    lengths = episode_lengths(episodes, seed, min_length, max_length)

    def generate() -> Iterable[tuple[str, dict]]:
        for e, n in enumerate(lengths):
            yield LIBERO_TASKS[e % num_tasks], libero_like_episode(e, n, image_size, rng, texture)

    features = libero_features(image_size)
    if layout.startswith("v3"):
        storage = "video" if layout == "v3_mp4" else "png"
        w = LeRobotV3Writer(path, LIBERO_FPS, features, robot_type="panda", image_storage=storage,
                            overwrite=overwrite, **writer_kwargs)
        with w:
            for task, frames in generate():
                w.add_episode(task, frames)
        return Path(path)
    return write_lerobot_v21(path, LIBERO_FPS, features, generate(), robot_type="panda",
                             image_storage="png" if layout == "v2.1_png" else "video", overwrite=overwrite)


def write_lerobot_v21(root: str | os.PathLike, fps: int, features: dict, episodes: Iterable[tuple[str, dict]],
                      robot_type: str | None = None, image_storage: str = "video", overwrite: bool = False,
                      chunks_size: int = 1000, video_codec: str = DEFAULT_CODEC) -> Path:
    """Write a LeRobot v2.1 dataset: data/chunk-XXX/episode_YYYYYY.parquet, one mp4 per episode and camera,
    meta/{info.json, tasks.jsonl, episodes.jsonl, episodes_stats.jsonl}."""
    import json

    root = Path(root)
    prepare_root(root, overwrite)
    feats: dict[str, dict] = {}
    for key, ft in features.items():
        ft = {"dtype": ft["dtype"], "shape": list(ft["shape"]), "names": ft.get("names")}
        if is_image(ft):
            ft["dtype"] = "video" if image_storage == "video" else "image"
            if image_storage == "video":
                ft["info"] = video_info(video_codec, fps, ft["shape"][0], ft["shape"][1])
        feats[key] = ft
    feats.update({k: dict(v) for k, v in DEFAULT_FEATURES.items()})
    user = {k: v for k, v in feats.items() if k not in DEFAULT_FEATURES}
    schema = pa.schema([(k, arrow_type(ft)) for k, ft in feats.items() if ft["dtype"] != "video"],
                       metadata={b"huggingface": hf_features_metadata(feats)})
    data_tpl = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_tpl = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    tasks: dict[str, int] = {}
    ep_lines, stats_lines = [], []
    total = 0
    for e, (task, frames) in enumerate(episodes):
        arrays, T = validate_episode(user, task, frames)
        ti = tasks.setdefault(task.strip(), len(tasks))
        fi = np.arange(T, dtype=np.int64)
        arrays.update(timestamp=(fi / fps).astype(np.float32), frame_index=fi,
                      episode_index=np.full(T, e, np.int64), index=total + fi, task_index=np.full(T, ti, np.int64))
        cols = {}
        for k, ft in feats.items():
            if ft["dtype"] == "video":
                vw = VideoFileWriter(root / video_tpl.format(episode_chunk=e // chunks_size, video_key=k, episode_index=e),
                                     fps, ft["shape"][1], ft["shape"][0], codec=video_codec)
                vw.add(arrays[k])
                vw.close()
            elif ft["dtype"] == "image":
                cols[k] = pa.array([{"bytes": encode_png(im), "path": None} for im in arrays[k]], type=IMAGE_STRUCT)
            else:
                cols[k] = _to_arrow(arrays[k], schema.field(k).type)
        write_parquet_atomic(pa.table(cols, schema=schema),
                             root / data_tpl.format(episode_chunk=e // chunks_size, episode_index=e))
        ep_lines.append({"episode_index": e, "tasks": [task.strip()], "length": T})
        st = {k: (image_stats(arrays[k]) if is_image(ft) else numeric_stats(arrays[k]))
              for k, ft in feats.items() if ft["dtype"] != "string"}
        st = {k: {m: v[m] for m in ("min", "max", "mean", "std", "count")} for k, v in st.items()}
        stats_lines.append({"episode_index": e, "stats": st})
        total += T
    if not ep_lines:
        raise WmvlaError(f"{root}: no episodes to write")

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    atomic_write_text(root / "meta/tasks.jsonl", jsonl([{"task_index": i, "task": t} for t, i in tasks.items()]))
    atomic_write_text(root / "meta/episodes.jsonl", jsonl(ep_lines))
    atomic_write_text(root / "meta/episodes_stats.jsonl", jsonl(stats_lines))
    n_video = sum(ft["dtype"] == "video" for ft in feats.values())
    info = {
        "codebase_version": "v2.1", "robot_type": robot_type, "total_episodes": len(ep_lines),
        "total_frames": total, "total_tasks": len(tasks), "total_videos": n_video * len(ep_lines),
        "total_chunks": (len(ep_lines) - 1) // chunks_size + 1, "chunks_size": chunks_size, "fps": fps,
        "splits": {"train": f"0:{len(ep_lines)}"}, "data_path": data_tpl,
        "video_path": video_tpl if n_video else None, "features": feats,
    }
    atomic_write_json(root / "meta/info.json", info, indent=4)
    return root
