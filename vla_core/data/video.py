"""mp4 encode/decode with PyAV, as LeRobot stores camera streams.

Decoding is by timestamp: a LeRobot v3.0 video file holds many episodes back to back, and a frame is found
at `from_timestamp` (the episode's offset in the file) + the frame's `timestamp`. `VideoReader` keeps the
container open and decodes forward from the last position when the next request is a little later (the
common case for history windows and sequential passes); otherwise it seeks to the nearest keyframe before
the target. Readers are per process (see `lerobot.LeRobotDataset`), never shared across forked workers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import av
import numpy as np

from vla_core.utils import WmvlaError

# Our writer's default. h264 decodes everywhere (PyAV, torchcodec, browsers); LeRobot itself defaults to
# libsvtav1, which this reader decodes too (PyAV wheels ship dav1d).
DEFAULT_CODEC = "libx264"


class VideoFileWriter:
    """Append uint8 RGB frames to one mp4; the file appears under `path` only when `close()` succeeds."""

    def __init__(self, path: str | os.PathLike, fps: int, width: int, height: int, codec: str = DEFAULT_CODEC,
                 crf: int = 20, gop: int = 2, pix_fmt: str = "yuv420p", preset: str | None = "veryfast"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self.fps, self.width, self.height = int(fps), int(width), int(height)
        self.num_frames = 0
        self.codec = codec
        self.pix_fmt = pix_fmt
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream(codec, rate=self.fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, pix_fmt
        # A short GOP (LeRobot uses g=2) keeps random access cheap: a seek lands at most gop-1 frames early.
        options = {"g": str(gop), "crf": str(crf)}
        if preset and codec in ("libx264", "libx265"):
            options["preset"] = preset
        self._stream.options = options

    def add(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise WmvlaError(
                f"{self.path}: expected uint8 frames [T, {self.height}, {self.width}, 3], got "
                f"{frames.dtype} {list(frames.shape)}"
            )
        for img in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = self.num_frames
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.num_frames += 1

    def close(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def video_info(codec: str, fps: int, height: int, width: int, pix_fmt: str = "yuv420p") -> dict:
    """The `info` block LeRobot puts on a video feature in meta/info.json."""
    name = {"libx264": "h264", "libsvtav1": "av1", "libx265": "hevc"}.get(codec, codec)
    return {
        "video.height": height, "video.width": width, "video.codec": name, "video.pix_fmt": pix_fmt,
        "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False,
    }


class VideoReader:
    """Random access by timestamp (seconds) into one mp4 file."""

    # Decode forward instead of seeking when the target is at most this far after the current frame.
    FORWARD_WINDOW_S = 1.0

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        if not self.path.is_file():
            raise WmvlaError(
                f"{self.path}: video file is missing. The dataset is incomplete (an interrupted download or "
                "copy?); fetch it again or regenerate it."
            )
        try:
            self._container = av.open(str(self.path))
            self._stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError) as e:
            raise WmvlaError(f"{self.path}: cannot open video ({e}); the file is corrupt or not an mp4.") from e
        # One decoding thread: DataLoader workers already run in parallel.
        self._stream.thread_type = "SLICE"
        self._stream.codec_context.thread_count = 1
        self.tolerance = 0.5 / float(fps)  # half a frame: frames sit on a k/fps grid
        self._frames = None  # decode generator
        self._cur_time: float | None = None
        self._cur: np.ndarray | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()

    def _seek(self, t: float) -> None:
        tb = self._stream.time_base
        target = max(0, int((t - self.tolerance) / tb)) if tb else 0
        self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._cur_time, self._cur = None, None

    def _advance(self) -> bool:
        try:
            frame = next(self._frames)
        except (StopIteration, av.error.EOFError):
            return False
        except av.error.FFmpegError as e:
            raise WmvlaError(f"{self.path}: decoding failed ({e}); the video file is corrupt.") from e
        self._cur_time = float(frame.time)
        self._cur = frame.to_ndarray(format="rgb24")
        return True

    def _get(self, t: float) -> np.ndarray:
        tol = self.tolerance
        if self._cur_time is not None and abs(self._cur_time - t) <= tol:
            return self._cur
        if self._frames is None or self._cur_time is None or t < self._cur_time or t - self._cur_time > self.FORWARD_WINDOW_S:
            self._seek(t)
            if not self._advance():
                raise self._missing(t)
            if self._cur_time > t + tol and t > tol:  # keyframe index landed late: seek well before
                self._seek(max(0.0, t - 2.0))
                if not self._advance():
                    raise self._missing(t)
        while self._cur_time < t - tol:
            if not self._advance():
                raise self._missing(t)
        if abs(self._cur_time - t) > tol:
            raise self._missing(t)
        return self._cur

    def _missing(self, t: float) -> WmvlaError:
        return WmvlaError(
            f"{self.path}: no frame at t={t:.4f}s (last decoded: {self._cur_time}). The episode metadata "
            "(from_timestamp/to_timestamp) or the timestamp column is inconsistent with the video, or the "
            "video is truncated; regenerate or re-download the dataset."
        )

    def read(self, times: np.ndarray | list[float]) -> np.ndarray:
        """uint8 [n, H, W, 3] frames at `times` (seconds, any order, repeats allowed)."""
        times = np.asarray(times, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        out: list[np.ndarray | None] = [None] * len(times)
        for i in order:
            out[i] = self._get(float(times[i]))
        return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
