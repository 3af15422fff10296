"""Shared bottom layer: user-facing errors, atomic writes, seeding, config (de)serialisation.

Everything that writes a file a later step reads goes through the atomic helpers here (temp file in the
same folder + os.replace), so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class WmvlaError(Exception):
    """An error caused by input or configuration. The CLI prints its message without a traceback.

    Messages say what was expected, what was found, and how to fix it.
    """


# ----------------------------------------------------------------------------------------- atomic IO


def _read_umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: done once, at import, before any thread runs
    os.umask(umask)  # (per call, two threads could each see the other's 0 and leave the process at umask 0)
    return umask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path` atomically.

    On an exception the temporary file is removed and `path` is left as it was. `fsync=False` skips flushing
    to disk before the rename (a cache that can be fetched again: the rename still makes it all-or-nothing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; results are meant to be shared, so use the usual umask-based mode.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (resumable logs: a crash loses at most this line).

    Readers use `read_jsonl`, which skips a torn final line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record)) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by `append_jsonl`; a torn last line (killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final line from an interrupted write
            raise WmvlaError(f"{path}: line {i + 1} is not valid JSON; the file is corrupt. Move it away to start over.")
    return out


# ------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


# ----------------------------------------------------------------------------- config serialisation


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy arrays/scalars, paths and tuples -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (possibly nested) dataclass from `to_jsonable` output. Unknown keys are an error."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise WmvlaError(
            f"{cls.__name__}: unknown fields {sorted(unknown)} (known: {sorted(names)}). "
            "The file was written by a different wmvla version or edited by hand."
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name])
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _coerce(args[0], value)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None):
                continue
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return from_dict(a, value)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value)
        return value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args:
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list:
        return [_coerce(args[0], v) for v in value] if args else list(value)
    if origin is dict:
        return {k: _coerce(args[1], v) for k, v in value.items()} if args else dict(value)
    if tp is Path:
        return Path(value)
    return value


def config_diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Human-readable list of differences between two nested config dicts."""
    out = []
    for k in sorted(set(expected) | set(found)):
        key = f"{prefix}{k}"
        if k not in found:
            out.append(f"{key}: expected {expected[k]!r}, missing")
        elif k not in expected:
            out.append(f"{key}: unexpected {found[k]!r}")
        elif isinstance(expected[k], dict) and isinstance(found[k], dict):
            out.extend(config_diff(expected[k], found[k], key + "."))
        elif expected[k] != found[k]:
            out.append(f"{key}: expected {expected[k]!r}, found {found[k]!r}")
    return out
