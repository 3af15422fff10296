"""Sharded `wmvla eval`: two processes split the episodes, the merge equals a single-process evaluation.

Also: resume of one shard, the automatic merge by the last shard, and the merge's refusals (missing
shard, missing episodes, overlapping shards, mixed shard counts, different flags, mixed folders).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest

from vla_core.cli import main
from vla_core.eval import shards
from vla_core.eval.engine import EpisodeSpec
from vla_core.utils import WmvlaError, append_jsonl, read_jsonl

# reach / push with the expert and a 60-step limit: a mix of successes and failures (push needs ~63 steps)
FLAGS = ["--env", "metaworld", "--suite", "core5", "--tasks", "reach,push", "--episodes", "4", "--workers", "0",
         "--scripted", "expert", "--no-progress", "--image-size", "32", "--max-steps", "60"]


def _key_success(path: Path) -> set[tuple]:
    return {(r["task"], r["init_index"], r["condition"], r["success"], r["steps"]) for r in read_jsonl(path)}


def test_two_shards_merge_to_the_single_process_result(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["eval", *FLAGS, "--out", str(single)]) == 0

    # two processes at once: one with explicit flags, one as torchrun would start it (RANK / WORLD_SIZE)
    cmd = [sys.executable, "-m", "vla_core.cli", "eval", *FLAGS, "--out", str(sharded)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen(cmd + ["--num-shards", "2", "--shard-index", "0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(cmd, env={**env, "RANK": "1", "WORLD_SIZE": "2"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "evaluating shard 1 of 2" in outs[1]
    assert any("merged into" in o for o in outs)  # the last one to finish merged

    merged = read_jsonl(sharded / "episodes.jsonl")
    keys = [(r["task"], r["init_index"], r["condition"]) for r in merged]
    assert len(keys) == len(set(keys)) == 8  # every episode exactly once
    assert _key_success(sharded / "episodes.jsonl") == _key_success(single / "episodes.jsonl")
    assert {r["success"] for r in merged} == {True, False}  # the comparison is not trivially all-equal
    # each shard wrote only its own file, and the two files are disjoint and non-empty
    f0, f1 = (sharded / "shards" / f"shard-0{i}-of-02.jsonl" for i in (0, 1))
    k0 = {(r["task"], r["init_index"]) for r in read_jsonl(f0)}
    k1 = {(r["task"], r["init_index"]) for r in read_jsonl(f1)}
    assert k0 and k1 and not k0 & k1 and len(k0) + len(k1) == 8
    assert all(shards.shard_of(t, k, 2) == 0 for t, k in k0) and all(shards.shard_of(t, k, 2) == 1 for t, k in k1)
    s_single = json.loads((single / "summary.json").read_text())
    s_sharded = json.loads((sharded / "summary.json").read_text())
    assert s_sharded["overall"] == s_single["overall"] and s_sharded["per_task"] == s_single["per_task"]
    assert s_sharded["config"]["sharding"]["num_shards"] == 2
    assert s_sharded["config"]["init_indices"] == s_single["config"]["init_indices"] == [0, 1, 2, 3]

    # resume per shard: lose shard 1's last episode, re-run shard 1 -> only that episode runs again
    lines = f1.read_text().splitlines(keepends=True)
    f1.write_text("".join(lines[:-1]) + lines[-1][:10])  # and a torn line, as if killed mid-write
    kept = read_jsonl(f1)
    with pytest.raises(WmvlaError, match="1 of 8 episodes are not recorded yet"):
        shards.merge_shards(sharded)
    assert main(["eval", *FLAGS, "--out", str(sharded), "--num-shards", "2", "--shard-index", "1"]) == 0
    again = read_jsonl(f1)
    assert len(again) == len(kept) + 1 and again[: len(kept)] == kept  # the others were not re-run
    assert _key_success(sharded / "episodes.jsonl") == _key_success(single / "episodes.jsonl")

    # the merge by hand gives the same; an unsharded run into a sharded folder (and vice versa) is refused
    assert main(["eval", "--merge", str(sharded)]) == 0
    assert _key_success(sharded / "episodes.jsonl") == _key_success(single / "episodes.jsonl")
    with pytest.raises(WmvlaError, match="holds a sharded evaluation"):
        main_raise(["eval", *FLAGS, "--out", str(sharded)])
    with pytest.raises(WmvlaError, match="holds an unsharded evaluation"):
        main_raise(["eval", *FLAGS, "--out", str(single), "--num-shards", "2", "--shard-index", "0"])


def main_raise(argv: list[str]) -> int:
    """`wmvla` without the CLI's error handling (to see the WmvlaError)."""
    import tyro

    from vla_core.eval.cli import EvalConfig, run_eval

    return run_eval(tyro.cli(EvalConfig, args=argv[1:]))


# ------------------------------------------------------------------------ merge refusals (no envs)


CONFIG = {"env": "metaworld", "suite": "core5", "seeds": {"env": 1000, "policy": 0}, "condition": "c",
          "engine": {"workers": 2, "batch_wait_s": None}, "tasks": ["reach-v3", "push-v3"], "max_steps_per_task": {}}


def _episodes(n_init: int = 3) -> list[EpisodeSpec]:
    return [EpisodeSpec(t, k, "c") for t in ("reach-v3", "push-v3") for k in range(n_init)]


def _fake_shards(out: Path, n: int = 2, n_init: int = 3, skip: tuple = (), config=CONFIG) -> None:
    """Manifests + records as `wmvla eval --num-shards n` would write them (success = init index is even)."""
    eps = _episodes(n_init)
    keys = shards.episode_keys(config, eps)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shards.write_manifest(out, i, n, config, keys)
        for e in eps:
            if shards.shard_of(e.task, e.init_index, n) == i and (e.task, e.init_index) not in skip:
                _record(out, i, n, e.task, e.init_index)


def _record(out: Path, shard: int, n: int, task: str, k: int) -> None:
    append_jsonl(out / shards.shard_paths(out, shard, n)["episodes"], {
        "env": "metaworld", "suite": "core5", "task": task, "init_index": k, "seed": 1000, "condition": "c",
        "success": k % 2 == 0, "steps": 10, "wall_s": 0.1, "error": None})


def test_merge_writes_every_episode_once_in_order(tmp_path):
    _fake_shards(tmp_path, n=3)
    summary = shards.merge_shards(tmp_path)
    rows = read_jsonl(tmp_path / "episodes.jsonl")
    assert [(r["task"], r["init_index"]) for r in rows] == [(e.task, e.init_index) for e in _episodes()]
    assert summary["overall"]["n"] == 6 and summary["overall"]["successes"] == 4
    assert summary["config"]["sharding"] == {"num_shards": 3, "shards_dir": "shards"}


def test_merge_refuses_missing_and_overlapping_shards(tmp_path, capsys):
    # a shard that never ran
    a = tmp_path / "a"
    _fake_shards(a)
    (a / "shards" / "shard-01-of-02.json").unlink()
    with pytest.raises(shards.ShardsIncomplete, match=r"shard\(s\) \[1\] of 2 have not run yet.*--shard-index 1"):
        shards.merge_shards(a)
    assert shards.merge_shards(a, quiet_if_incomplete=True) is None  # what a finishing shard does
    assert not (a / "episodes.jsonl").exists()
    # a shard that did not finish
    b = tmp_path / "b"
    task, k = next((e.task, e.init_index) for e in _episodes() if shards.shard_of(e.task, e.init_index, 2) == 1)
    _fake_shards(b, skip=((task, k),))
    with pytest.raises(shards.ShardsIncomplete, match=r"1 of 6 episodes are not recorded yet \(shard 1: 1 missing\)"):
        shards.merge_shards(b)
    # the same episode in two shard files (e.g. a copied file): refused, never silently de-duplicated
    c = tmp_path / "c"
    _fake_shards(c)
    _record(c, 0, 2, task, k)
    with pytest.raises(WmvlaError, match=rf"recorded more than once: {task} init {k} \(c\) in shards \[0, 1\]"):
        shards.merge_shards(c)
    # leftovers of another shard count
    d = tmp_path / "d"
    _fake_shards(d, n=2)
    _fake_shards(d, n=3)
    with pytest.raises(WmvlaError, match=r"split \[2, 3\] ways"):
        shards.merge_shards(d)
    # shards run with different flags (more episodes, another seed)
    e = tmp_path / "e"
    _fake_shards(e)
    shards.write_manifest(e, 1, 2, CONFIG, shards.episode_keys(CONFIG, _episodes(4)))
    with pytest.raises(WmvlaError, match="another episode list"):
        shards.merge_shards(e)
    f = tmp_path / "f"
    _fake_shards(f)
    other = {**CONFIG, "max_steps_per_task": {"reach-v3": 99}, "engine": {"workers": 8, "batch_wait_s": 0}}
    shards.write_manifest(f, 1, 2, other, shards.episode_keys(CONFIG, _episodes()))
    with pytest.raises(WmvlaError, match="other settings than shard 0") as err:
        shards.merge_shards(f)
    assert "max_steps_per_task" in str(err.value) and "workers" not in str(err.value)  # engine speed may differ
    # nothing to merge; through the CLI: a message and exit code 2
    with pytest.raises(WmvlaError, match="no shards to merge"):
        shards.merge_shards(tmp_path / "empty")
    assert main(["eval", "--merge", str(a)]) == 2
    assert "have not run yet" in capsys.readouterr().err


def test_shard_assignment_is_stable_and_resolved_from_flags_or_torchrun():
    eps = [(t, k) for t in ("reach-v3", "push-v3", "pick-place-v3") for k in range(50)]
    for n in (2, 3, 8):
        sizes = [sum(shards.shard_of(t, k, n) == i for t, k in eps) for i in range(n)]
        assert max(sizes) - min(sizes) <= 3  # balanced within a task (consecutive init indices alternate)
    # a pure function of the episode: more episodes or tasks never move a recorded one
    assert [shards.shard_of("push-v3", k, 4) for k in range(10)] == [shards.shard_of("push-v3", k, 4) for k in range(10)]
    assert shards.resolve_shard(None, None, {}) is None
    assert shards.resolve_shard(None, None, {"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert shards.resolve_shard(None, None, {"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert shards.resolve_shard(1, 2, {"RANK": "3", "WORLD_SIZE": "4"}) == (1, 2)  # flags win
    assert shards.resolve_shard(None, 4, {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    with pytest.raises(WmvlaError, match="needs --num-shards"):
        shards.resolve_shard(0, None, {})
    with pytest.raises(WmvlaError, match="without --shard-index"):
        shards.resolve_shard(None, 2, {})
    with pytest.raises(WmvlaError, match="out of range"):
        shards.resolve_shard(2, 2, {})
