"""`wmvla data inspect` prints a correct summary for each fixture layout and fails clearly on problems."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from vla_core.cli import main
from vla_core.data.fixtures import LIBERO_TASKS, episode_lengths, make_libero_like

EPISODES = 5


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    return {layout: make_libero_like(base / layout, layout=layout, episodes=EPISODES, image_size=16, seed=2)
            for layout in ("v3_png", "v3_mp4", "v2.1")}


def _row(out: str, first: str) -> list[str]:
    """Cells of the table row whose first cell is `first`."""
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{out}")


@pytest.mark.parametrize("layout", ["v3_png", "v3_mp4", "v2.1"])
def test_inspect_summary(roots, layout, capsys):
    assert main(["data", "inspect", str(roots[layout])]) == 0
    out = capsys.readouterr().out
    lengths = episode_lengths(EPISODES, 2, 8, 20)
    assert _row(out, "codebase_version")[1] == ("v2.1" if layout == "v2.1" else "v3.0")
    assert _row(out, "fps")[1] == "10"
    assert _row(out, "episodes")[1] == str(EPISODES)
    assert _row(out, "frames")[1] == str(sum(lengths))
    assert _row(out, "tasks")[1] == "3"
    storage = "PNG in parquet" if layout == "v3_png" else "mp4"
    dtype = "image" if layout == "v3_png" else "video"
    assert _row(out, "observation.images.image")[1:5] == [dtype, "[16, 16, 3]", storage, "image_key"]
    assert _row(out, "observation.images.image2")[1:5] == [dtype, "[16, 16, 3]", storage, "wrist_image_key"]
    assert _row(out, "observation.state")[1:3] == ["float32", "[8]"]
    assert _row(out, "action")[1:3] == ["float32", "[7]"]
    # tasks with episode and frame counts
    eps, frames = Counter(), Counter()
    for e, n in enumerate(lengths):
        eps[e % 3] += 1
        frames[e % 3] += n
    for i in range(3):
        assert _row(out, str(i))[1:4] == [LIBERO_TASKS[i], str(eps[i]), str(frames[i])]
    # key check
    assert _row(out, "instruction_key")[1:] == ["task", "ok (meta/tasks via task_index)"]
    assert _row(out, "state_key")[2].startswith("ok")
    assert "configured keys match" in out


def test_inspect_missing_key_exits_nonzero(roots, capsys):
    rc = main(["data", "inspect", str(roots["v3_png"]), "--keys.instruction-key", "instruction",
               "--keys.wrist-image-key", "None"])
    assert rc != 0
    captured = capsys.readouterr()
    assert _row(captured.out, "instruction_key")[1:] == ["instruction", "MISSING"]
    assert _row(captured.out, "wrist_image_key")[1:] == ["None", "not used"]
    assert "instruction_key='instruction'" in captured.err and "under `task`" in captured.err


def test_inspect_without_key_check(roots, capsys):
    rc = main(["data", "inspect", str(roots["v3_png"]), "--keys.image-key", "cam", "--no-check-keys"])
    assert rc == 0
    assert _row(capsys.readouterr().out, "image_key")[1:] == ["cam", "MISSING"]


def test_inspect_bad_dataset_exits_nonzero(roots, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta").mkdir()
    info = json.loads((roots["v3_png"] / "meta/info.json").read_text())
    info["codebase_version"] = "v9.9"
    (bad / "meta/info.json").write_text(json.dumps(info))
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "info.json" in err and "'v9.9' is not supported" in err
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
