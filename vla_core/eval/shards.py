"""Sharded evaluation: the episodes of one `wmvla eval` split over N processes, then merged.

    wmvla eval FLAGS --out DIR --num-shards 4 --shard-index 0      # one command per shard (any machines sharing DIR)
    torchrun --nproc_per_node 4 -m vla_core.cli eval FLAGS --out DIR  # the same: RANK / WORLD_SIZE give the shard
    wmvla eval --merge DIR                                         # merge by hand (also done by the last shard)

Layout of DIR:
    shards/shard-00-of-04.jsonl             shard 0's episodes (written by its process only; resumable)
    shards/shard-00-of-04.run_config.json   the settings of its first run (a resume must match them)
    shards/shard-00-of-04.json              manifest: shard, num_shards, the evaluation's config and its full
                                            episode list (every shard of one evaluation writes the same)
    episodes.jsonl, summary.json            the merge: every episode exactly once, in the usual format and order
    videos/                                 shared (names are unique per episode)

Assignment: episode (task, init index k) belongs to shard (crc32(task) + k) mod N, a pure function of the
episode: adding episodes or tasks to a sharded evaluation never moves a recorded episode to another shard,
so re-running a shard's command resumes its own file. Each shard runs the same rollout engine as an
unsharded evaluation (same per-episode seeding: an episode's result does not depend on the shard it ran in).

The merge refuses, saying what to run: shards that have not run or not finished (missing episodes),
an episode recorded by two shards (or twice), shards run with different flags or shard counts.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Mapping

from vla_core.utils import WmvlaError, atomic_write_json, atomic_write_text, config_diff, read_jsonl, to_jsonable

SHARDS_DIR = "shards"


class ShardsIncomplete(WmvlaError):
    """Some shards have not run or not finished yet (the merge can be retried later)."""

# config keys that may differ between the shards of one evaluation (speed only)
SHARD_FREE_KEYS = ("engine",)


def shard_name(index: int, num_shards: int) -> str:
    width = max(2, len(str(num_shards - 1)))
    return f"shard-{index:0{width}d}-of-{num_shards:0{width}d}"


def shard_of(task: str, init_index: int, num_shards: int) -> int:
    """The shard an episode belongs to (stable under adding tasks or episodes)."""
    return (zlib.crc32(task.encode("utf-8")) + int(init_index)) % num_shards


def resolve_shard(shard_index: int | None, num_shards: int | None,
                  environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(index, count) of this process's shard, or None for an unsharded evaluation.

    Explicit flags win; without them a process started by torchrun / accelerate launch (RANK and
    WORLD_SIZE > 1 in the environment) takes shard RANK of WORLD_SIZE, so N launched processes never
    write to one file.
    """
    rank, world = environ.get("RANK"), environ.get("WORLD_SIZE")
    if num_shards is None:
        if shard_index is not None:
            raise WmvlaError("--shard-index needs --num-shards N (the total number of shards)")
        if rank is not None and world is not None and int(world) > 1:
            print(f"eval: launched as process {rank} of {world} (RANK / WORLD_SIZE): evaluating shard {rank} of "
                  f"{world}", flush=True)
            return int(rank), int(world)
        return None
    if num_shards < 1:
        raise WmvlaError(f"--num-shards must be >= 1, got {num_shards}")
    if shard_index is None:
        if rank is None or world is None or int(world) != num_shards:
            raise WmvlaError(f"--num-shards {num_shards} without --shard-index: pass --shard-index 0..{num_shards - 1}, "
                             f"or launch {num_shards} processes with torchrun (RANK / WORLD_SIZE; found RANK={rank}, "
                             f"WORLD_SIZE={world})")
        shard_index = int(rank)
    if not 0 <= shard_index < num_shards:
        raise WmvlaError(f"--shard-index {shard_index} is out of range for --num-shards {num_shards} "
                         f"(expected 0..{num_shards - 1})")
    return shard_index, num_shards


def shard_paths(out: Path, index: int, num_shards: int) -> dict[str, str]:
    """Paths relative to `out` of one shard's files (episodes, run config, manifest)."""
    base = f"{SHARDS_DIR}/{shard_name(index, num_shards)}"
    return {"episodes": f"{base}.jsonl", "run_config": f"{base}.run_config.json", "manifest": f"{base}.json"}


def check_out_dir(out: Path, sharded: bool) -> None:
    """One folder holds either an unsharded evaluation or a sharded one, never both."""
    shards = out / SHARDS_DIR
    if sharded and (out / "episodes.jsonl").exists() and not shards.is_dir():
        raise WmvlaError(f"{out} holds an unsharded evaluation (episodes.jsonl without {SHARDS_DIR}/); a sharded run "
                         "would replace it at the merge. Use another --out, or resume it without --num-shards.")
    if not sharded and shards.is_dir():
        raise WmvlaError(f"{out} holds a sharded evaluation ({shards}); resume it with the same --num-shards (one "
                         "process per --shard-index), or merge the finished shards with `wmvla eval --merge "
                         f"{out}`. Use another --out for an unsharded evaluation.")


def episode_keys(config: dict, episodes) -> list[list]:
    """Full record keys (env, suite, task, init_index, seed, condition) of EpisodeSpecs, in order."""
    return [[config["env"], config["suite"], e.task, int(e.init_index), int(config["seeds"]["env"]), e.condition]
            for e in episodes]


def write_manifest(out: Path, index: int, num_shards: int, config: dict, keys: list[list]) -> None:
    mine = [k for k in keys if shard_of(k[2], k[3], num_shards) == index]
    atomic_write_json(out / shard_paths(out, index, num_shards)["manifest"], {
        "shard": index, "num_shards": num_shards, "config": to_jsonable(config), "episodes": keys,
        "shard_episodes": len(mine)})


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in SHARD_FREE_KEYS}


def collect_shards(out: str | os.PathLike) -> tuple[list[dict], dict, int]:
    """Check the shards in out/shards and return (every episode's record in the evaluation's order,
    the evaluation's config, number of shards). Raises WmvlaError naming what is missing or inconsistent."""
    out = Path(out)
    folder = out / SHARDS_DIR
    manifests = sorted(folder.glob("shard-*-of-*.json")) if folder.is_dir() else []
    manifests = [m for m in manifests if not m.name.endswith(".run_config.json")]
    if not manifests:
        raise WmvlaError(f"{out}: no shards to merge (expected {folder}/shard-II-of-NN.json, written by "
                         "`wmvla eval ... --num-shards N --shard-index I`)")
    docs = {m: json.loads(m.read_text(encoding="utf-8")) for m in manifests}
    counts = sorted({d["num_shards"] for d in docs.values()})
    if len(counts) > 1:
        raise WmvlaError(f"{folder} holds shards of evaluations split {counts} ways; one evaluation must use one "
                         "--num-shards. Move the stale shard files away (or evaluate into another --out).")
    n = counts[0]
    by_index = {d["shard"]: (m, d) for m, d in docs.items()}
    absent = [i for i in range(n) if i not in by_index]
    if absent:
        raise ShardsIncomplete(f"{out}: shard(s) {absent} of {n} have not run yet (no {SHARDS_DIR}/"
                         f"{shard_name(absent[0], n)}.json). Run `wmvla eval` with the same flags and "
                         f"--num-shards {n} --shard-index {absent[0]}, then merge.")
    _, first = by_index[0]
    for i in range(1, n):
        m, d = by_index[i]
        if d["episodes"] != first["episodes"]:
            raise WmvlaError(f"{out}: shard {i} was run with another episode list than shard 0 ({len(d['episodes'])} "
                             f"vs {len(first['episodes'])} episodes): run every shard with the same flags "
                             "(re-running a shard with the new flags resumes it).")
        diff = config_diff(_strip(first["config"]), _strip(d["config"]))
        if diff:
            raise WmvlaError(f"{out}: shard {i} was run with other settings than shard 0:\n  - " + "\n  - ".join(diff[:10])
                             + "\nRun every shard with the same flags.")
    wanted = [tuple(k) for k in first["episodes"]]
    wanted_set = set(wanted)
    found: dict[tuple, list[tuple[int, dict]]] = {}
    for i in range(n):
        path = out / shard_paths(out, i, n)["episodes"]
        for r in read_jsonl(path):
            key = (r["env"], r["suite"], r["task"], int(r["init_index"]), int(r["seed"]), r["condition"])
            if key in wanted_set:
                found.setdefault(key, []).append((i, r))
    dups = {k: [i for i, _ in v] for k, v in found.items() if len(v) > 1}
    if dups:
        shown = "; ".join(f"{k[2]} init {k[3]} ({k[5]}) in shards {v}" for k, v in list(dups.items())[:5])
        raise WmvlaError(f"{out}: {len(dups)} episode(s) are recorded more than once: {shown}. Shards must not overlap "
                         "(two processes ran the same shard, or shard files were copied); keep one record per "
                         "episode (or start over in a new --out).")
    missing = [k for k in wanted if k not in found]
    if missing:
        per_shard: dict[int, int] = {}
        for k in missing:
            s = shard_of(k[2], k[3], n)
            per_shard[s] = per_shard.get(s, 0) + 1
        todo = ", ".join(f"shard {s}: {c} missing" for s, c in sorted(per_shard.items()))
        raise ShardsIncomplete(f"{out}: {len(missing)} of {len(wanted)} episodes are not recorded yet ({todo}). Those shards "
                         "are still running or were interrupted: re-run them with the same flags (they resume), "
                         "then merge.")
    return [found[k][0][1] for k in wanted], first["config"], n


def merge_shards(out: str | os.PathLike, quiet_if_incomplete: bool = False) -> dict | None:
    """Write out/episodes.jsonl (every episode once, in the evaluation's order) and out/summary.json.

    quiet_if_incomplete: return None instead of raising while shards are still missing (the automatic
    merge at the end of each shard: the last one to finish merges). Inconsistent shards always raise.
    The merged files are a pure function of the shard files, so two shards finishing at once write the
    same bytes (atomic replace)."""
    from vla_core.eval.cli import write_summary

    out = Path(out)
    try:
        records, config, n = collect_shards(out)
    except ShardsIncomplete as e:
        if quiet_if_incomplete:
            print(f"eval: not merged yet: {e}", flush=True)
            return None
        raise
    atomic_write_text(out / "episodes.jsonl", "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
    config = {**config, "sharding": {"num_shards": n, "shards_dir": SHARDS_DIR}}
    return write_summary(out, records, config)
