"""The shared bottom layer: atomic writes, JSONL logs, config round trips, the CLI dispatcher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vla_core import cli
from vla_core.utils import (
    WmvlaError,
    append_jsonl,
    atomic_path,
    atomic_write_json,
    config_diff,
    from_dict,
    read_jsonl,
    to_jsonable,
)


@dataclasses.dataclass
class Inner:
    m: int = 4
    key: str | None = None


@dataclasses.dataclass
class Outer:
    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)
    dims: tuple[int, ...] = (1, 2)
    path: Path = Path("a/b")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_jsonl_drops_torn_last_line_only(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"a": 1})
    append_jsonl(log, {"a": 2})
    with open(log, "a") as f:
        f.write('{"a": 3')  # a write interrupted mid-line
    assert read_jsonl(log) == [{"a": 1}, {"a": 2}]
    log.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(WmvlaError, match="line 2"):
        read_jsonl(log)


def test_config_round_trip_and_unknown_field():
    cfg = Outer(name="y", inner=Inner(m=1, key="k"), dims=(3,), path=Path("p"))
    data = json.loads(json.dumps(to_jsonable(cfg)))
    assert from_dict(Outer, data) == cfg
    with pytest.raises(WmvlaError, match="unknown fields"):
        from_dict(Outer, {**data, "bogus": 1})


def test_config_diff_names_the_differences():
    diff = config_diff({"a": 1, "w": {"m": 4}}, {"a": 1, "w": {"m": 1}, "b": 2})
    assert diff == ["b: unexpected 2", "w.m: expected 4, found 1"]


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "data inspect", "latents", "train", "eval", "matrix", "report"):
        assert name in out
    with pytest.raises(SystemExit, match="unknown command"):
        cli.main(["bogus"])


def test_atomic_files_get_umask_permissions(tmp_path):
    import os
    import stat

    target = tmp_path / "shared.json"
    atomic_write_json(target, {})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_cli_config_print_and_reload_round_trip(tmp_path):
    """--print-config yaml|json shows the resolved config; --config FILE reloads it; flags still override.

    Each call is a fresh `python -m vla_core.cli` process, as a user runs it: stdout must hold the config and
    nothing else (in one long pytest process, output of other tests' leftover threads could land in it)."""
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vla_core.cli", "train", *args], capture_output=True,
                              text=True, timeout=300)

    out = cli("--preset", "tiny", "--seed", "5", "--print-config", "yaml")
    assert out.returncode == 0, out.stderr
    (tmp_path / "run.yaml").write_text(out.stdout)
    out = cli("--preset", "tiny", "--seed", "5", "--print-config", "json")
    reference = json.loads(out.stdout)
    assert reference["seed"] == 5 and reference["policy"]["backbone"] == "tiny"

    out = cli("--config", str(tmp_path / "run.yaml"), "--print-config=json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == reference
    (tmp_path / "run.json").write_text(json.dumps(reference))
    out = cli("--config", str(tmp_path / "run.json"), "--seed", "9", "--print-config", "json")
    # --seed also re-seeds the new modules' init (policy.init_seed follows the run seed)
    assert json.loads(out.stdout) == {**reference, "seed": 9, "policy": {**reference["policy"], "init_seed": 9}}

    bad = dict(reference, no_such_field=1)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = cli("--config", str(tmp_path / "bad.json"))
    assert out.returncode == 2 and "no_such_field" in out.stderr
    out = cli("--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "no such file" in out.stderr
    assert cli("--preset", "tiny", "--config", str(tmp_path / "run.json")).returncode == 2
