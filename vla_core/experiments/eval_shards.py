"""A cell's closed-loop evaluation fanned out in shards (pipeline pods on different nodes), then merged.

What the pipeline's shard components call (plain functions, testable without kfp):

    plan_shards(item, eval_shards, dataset_uri)          -> [{**item, "shard": i, "num_shards": n}, ...]
    evaluate_shard(shard_item, dataset_uri, workdir)      one shard of every condition of one cell
    merge_cell_shards(item, shards, workdir)              -> {condition: summary}, as cells.evaluate_cell

Each shard runs `wmvla eval --num-shards n --shard-index i` (vla_core.eval.shards: episode (task, k) belongs to
shard (crc32(task) + k) mod n) into its own local folder, mirrored to its own prefix of the store:

    <cell>/eval-shards/<condition folder>/shard-II-of-NN/shards/shard-II-of-NN.{jsonl,json,run_config.json}

A shard pod that is lost and retried restores that prefix and continues from its records; shards never
write to one object, so no shard can overwrite another's records with an older copy. The merge downloads
every shard's files into the condition's usual folder, merges them with the rules of
`vla_core.eval.shards.merge_shards` (refusing missing, overlapping or inconsistent shards) and uploads the
folder to the same place an unsharded evaluation goes (`<cell>/eval/<condition folder>/`): episodes.jsonl and
summary.json as usual (plus shards/), which the report reads as it reads an unsharded evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from vla_core.utils import WmvlaError

SHARDS_PREFIX = "eval-shards"  # beside the cell's eval/ (not under it: the report reads eval/ only)
LIBERO_WAVES_PER_SHARD = 9
"""Auto sizing for LIBERO: one shard runs at most this many waves of `workers` episodes. 9 waves of the 2B E2
policy at 16 workers (38.8 s per 220-step wave, measured on the H100 machine) + ~36 s startup ~ 6.4 min, under the
7-minute goal (docs/benchmarks.md, "Sharded evaluation on the cluster")."""


def auto_num_shards(env: str, episodes_total: int, workers: int) -> int:
    """Shards for one condition when the pipeline's eval_shards is 0: MetaWorld (fast, CPU-rendered, minutes
    on one pod) 1; LIBERO enough that no shard runs more than LIBERO_WAVES_PER_SHARD waves of `workers`."""
    if env != "libero":
        return 1
    return max(1, math.ceil(episodes_total / (LIBERO_WAVES_PER_SHARD * max(1, workers))))


def resolved_env(settings: dict, dataset_uri: str) -> str:
    """The evaluation env as `matrix.eval_plan` resolves it: the configured one, else MetaWorld for a dataset
    written by `wmvla data generate metaworld` (it has meta/wmvla_generation.json), else LIBERO."""
    from vla_core.experiments.cells import METAWORLD, load_settings

    cfg = load_settings(settings)
    if cfg.env:
        return cfg.env
    if dataset_uri == METAWORLD:
        return "metaworld"
    if dataset_uri.startswith("s3://"):
        from vla_core.storage import open_store

        return "metaworld" if open_store(dataset_uri).exists("meta/wmvla_generation.json") else "libero"
    return "metaworld" if (Path(dataset_uri) / "meta" / "wmvla_generation.json").is_file() else "libero"


def plan_shards(item: dict, eval_shards: int, dataset_uri: str) -> list[dict]:
    """The inner loop's items for one loop item of cells.plan: [{**item, "shard": i, "num_shards": n}] for
    i < n, self-contained (a shard task needs no other loop variable: kfp.local 2.17 hands a task in a nested
    ParallelFor the inner loop's item for the outer one). eval_shards 0 = auto_num_shards. More shards than
    episodes would leave shards with nothing to do: refused."""
    from vla_core.envs.registry import EnvConfig, resolve_tasks
    from vla_core.experiments.cells import _integral, load_settings

    item = _integral(dict(item))
    settings = item["settings"]
    cfg = load_settings(settings)
    eval_shards = int(eval_shards)
    if eval_shards < 0:
        raise WmvlaError(f"eval_shards must be >= 0 (0 = sized for the suite), got {eval_shards}")
    env = resolved_env(settings, dataset_uri)
    if env == "libero":
        n_tasks = len(resolve_tasks(EnvConfig(env="libero", suite=cfg.suite), cfg.tasks))
    else:  # MetaWorld: the dataset's tasks unless set; counted only to refuse more shards than episodes
        n_tasks = len([t for t in (cfg.tasks or "").split(",") if t.strip()]) or 1
    total = n_tasks * int(cfg.episodes)
    n = eval_shards or auto_num_shards(env, total, int(cfg.workers))
    if n > total:
        raise WmvlaError(f"eval_shards={n} is more than the {total} episodes per condition ({n_tasks} tasks x "
                         f"{cfg.episodes}); use at most {total}, or 0 to size it for the suite")
    return [{**item, "shard": i, "num_shards": n} for i in range(n)]


def _shard_index(shard: dict) -> tuple[int, int]:
    from vla_core.experiments.cells import _integral

    shard = _integral(dict(shard))
    i, n = int(shard["shard"]), int(shard["num_shards"])
    if not (n >= 1 and 0 <= i < n):
        raise WmvlaError(f"shard {shard}: expected 0 <= shard < num_shards")
    return i, n


def _conditions(item: dict, dataset_uri: str, workdir: str, scope: str):
    """-> (cell, cell URI, run_dir, [(condition, its unsharded EvalConfig)]): exactly the configs
    cells.evaluate_cell runs, so a shard evaluates its episodes as the unsharded step would."""
    import torch

    from vla_core.eval.checkpoint_policy import eval_dir_for
    from vla_core.experiments.cells import (_unpack, cell_paths, eval_config_for, fetch_checkpoint_for_eval,
                                            local_dataset, load_settings)
    from vla_core.experiments.matrix import eval_plan, rollout_memories
    from vla_core.train.checkpoint import resolve_checkpoint

    cell, settings, run = _unpack(item)
    cfg = load_settings(settings)
    _, run_dir, uri = cell_paths(settings, cell, run, workdir)
    # every shard of a cell downloads into the same path (the checkpoint's path is part of the evaluation's
    # config, which must match across shards); downloads land in per-process temp files, then rename
    fetch_checkpoint_for_eval(uri, run_dir)  # the evaluated weights and small files, not the optimizer state
    ckpt = resolve_checkpoint(run_dir)
    plan = eval_plan(cfg, str(local_dataset(dataset_uri, workdir, scope)))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for mode in rollout_memories(cell["experiment"], cfg.ablations):
        condition = f"{cell['experiment']}-{cell['head']}-{mode}"
        folder = eval_dir_for(ckpt, plan.env_cfg.env, plan.env_cfg.resolved_suite, mode)
        out.append((condition, eval_config_for(cfg, plan, ckpt, mode, condition, folder, "", device)))
    return cell, uri, run_dir, out


def shard_uri(cell_uri: str, condition_folder: str, index: int, num_shards: int) -> str:
    from vla_core.eval.shards import shard_name

    return f"{cell_uri.rstrip('/')}/{SHARDS_PREFIX}/{condition_folder}/{shard_name(index, num_shards)}"


def evaluate_shard(shard: dict, dataset_uri: str, workdir: str) -> dict:
    """One item of plan_shards: that shard of every condition of one trained cell. Records go to the
    shard's own prefix as they are written; a re-run (a retried pod, empty workdir) restores them and
    evaluates only the episodes not recorded yet. Returns {condition: {"shard", "num_shards", "uri"}}."""
    import torch

    from vla_core.eval.cli import EPISODES_FILE, SUMMARY_FILE, run_eval
    from vla_core.eval.remote import UPLOAD_EVERY_S, restore_eval
    from vla_core.experiments.cells import _local_root, load_settings
    from vla_core.storage.sync import DirMirror

    index, n = _shard_index(shard)
    item = shard
    cell, uri, _, conditions = _conditions(item, dataset_uri, workdir, f"{_cell_name(item)}-shard{index}")
    cfg = load_settings(dict(item)["settings"])
    threads = torch.get_num_threads()
    device = conditions[0][1].device if conditions else "cpu"
    torch.set_num_threads(cfg.eval_threads or (1 if device == "cpu" and cfg.workers >= 2 else threads))
    # a shard never uploads a merged episodes.jsonl / summary.json (n = 1 merges itself): the merge step
    # writes those to the condition's folder, and the report must find each evaluation exactly once
    merged = {EPISODES_FILE, SUMMARY_FILE}
    results = {}
    try:
        for condition, ecfg in conditions:
            remote = shard_uri(uri, ecfg.out.name, index, n)
            local = _local_root(workdir, remote)  # its own folder: shards of one cell may share a disk
            restore_eval(local, remote)
            with DirMirror(local, remote, interval_s=UPLOAD_EVERY_S, exclude=lambda rel: rel in merged, log=print):
                run_eval(dataclasses.replace(ecfg, out=local, num_shards=n, shard_index=index))
            results[condition] = {"shard": index, "num_shards": n, "uri": remote}
    finally:
        torch.set_num_threads(threads)
    return results


def _cell_name(item: dict) -> str:
    from vla_core.experiments.cells import _unpack

    return _unpack(item)[0]["name"]


def merge_cell_shards(item: dict, shards: list[dict], workdir: str, reported: list[dict] | None = None) -> dict:
    """Merge the shards (plan_shards' list) of every condition of one cell into the condition's episodes.jsonl +
    summary.json (vla_core.eval.shards.merge_shards: refuses missing, overlapping or inconsistent shards) and
    upload the folder where an unsharded evaluation goes. Returns {condition: summary} like
    cells.evaluate_cell. Needs no checkpoint and no dataset: the shards' prefixes say everything. `reported`:
    the shard tasks' return values (the pipeline's fan-in), checked to cover every shard once."""
    from vla_core.eval.checkpoint_policy import _safe
    from vla_core.eval.shards import merge_shards, shard_name
    from vla_core.experiments.cells import _unpack, cell_paths, load_settings
    from vla_core.experiments.matrix import rollout_memories
    from vla_core.storage import open_store, sync_down, sync_up

    cell, settings, run = _unpack(item)
    counts = {_shard_index(s)[1] for s in shards}
    if len(counts) != 1 or sorted(_shard_index(s)[0] for s in shards) != list(range(len(shards))):
        raise WmvlaError(f"shard plan {shards}: expected shards 0..n-1 of one n (the output of plan_shards)")
    n = counts.pop()
    if reported is not None:
        got = sorted(r["shard"] for done in reported for r in list(done.values())[:1])
        if got != list(range(n)):
            raise WmvlaError(f"cell {cell['name']}: shard tasks reported shards {got}, expected 0..{n - 1}")
    cfg = load_settings(settings)
    _, run_dir, uri = cell_paths(settings, cell, run, workdir)
    store = open_store(f"{uri}/{SHARDS_PREFIX}")
    tail = f"/{shard_name(0, n)}/"
    folders = sorted({o.key.split("/", 1)[0] for o in store.list() if tail in f"/{o.key.split('/', 1)[-1]}"})
    results = {}
    for mode in rollout_memories(cell["experiment"], cfg.ablations):
        condition = f"{cell['experiment']}-{cell['head']}-{mode}"
        mine = [f for f in folders if f.endswith(f"__mem-{_safe(mode)}")]
        if len(mine) != 1:
            raise WmvlaError(f"{store.uri}: expected one evaluation folder of rollout memory {mode!r} with shard 0 of "
                             f"{n}, found {mine or 'none'}; did every shard task of cell {cell['name']} run with "
                             f"{n} shards?")
        local = run_dir / "eval" / mine[0]
        for i in range(n):
            src = open_store(shard_uri(uri, mine[0], i, n))
            # the shard's own files only (a shard of n = 1 also holds its self-merge, never uploaded)
            sync_down(src, local, objects=[o for o in src.list() if o.key.startswith(("shards/", "videos/"))])
        summary = merge_shards(local)
        sync_up(local, f"{uri}/eval/{mine[0]}")
        results[condition] = json.loads(json.dumps(summary))
    return results
