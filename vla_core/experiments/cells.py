"""The matrix one microjob at a time: what the Kubeflow pipeline's components (components/) call.

Each function here is one pipeline step as a plain function (testable without kfp); a component only
translates its KFP inputs and outputs. The in-process `wmvla matrix` and these steps share the same
plan (`base_train_config`, `cell_config`, `eval_plan`, `rollout_memories`), so a cell trains and
evaluates exactly as it does there.

Heavy data lives in the object store (vla_core.storage: `s3://bucket/prefix` or a folder); a task keeps
local copies under `workdir` and passes URIs on. Layout under `results_uri`:

    cache/dataset-<key>/                    a generated dataset, keyed by its settings (a re-run reuses it)
    cache/latents-<key>/                    a latent cache, keyed by dataset URI + encoder spec
    <run>/<E>/<tag>/seed<k>/                a cell's training run: checkpoints uploaded as they are saved
                                            (TrainConfig.remote), logs at the end
    <run>/<E>/<tag>/seed<k>/eval/<cond>/    its evaluations: episodes uploaded as written (EvalConfig.remote)
    <run>/report.md, summary.json, plots/   the report, published with `_manifest.json` last

Dataset and latents are keyed by content, not by run, so pipeline caching (on for those two steps) and
re-runs find them; everything a cell produces is under its run. A re-run of a lost train or evaluate
pod resumes from the store: the local folder is empty on a new pod, and training/evaluation download
the newest checkpoint / the episodes already recorded before continuing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from vla_core.experiments.matrix import (
    MatrixConfig,
    base_train_config,
    cell_config,
    eval_plan,
    rollout_memories,
)
from vla_core import env_names
from vla_core.utils import WmvlaError, atomic_write_json, from_dict, to_jsonable

DEFAULT_CELLS = ("E0-mse", "E2-mse", "E0-flow", "E2-flow")
METAWORLD = "metaworld"  # the dataset "URI" that asks for generated MetaWorld expert data
REPORT_FILES = ("train_log.jsonl", "val_log.jsonl", "done.json", "config.json", "summary.json", "episodes.jsonl",
                "run_config.json")


# ------------------------------------------------------------------------------------------- plan


def parse_cell(name: str) -> tuple[str, str]:
    """"E2-flow" -> ("E2", "flow")."""
    from vla_core.train.config import EXPERIMENTS

    experiment, _, head = str(name).partition("-")
    if experiment not in EXPERIMENTS or head not in ("mse", "flow"):
        raise WmvlaError(f"cell {name!r}: expected EXPERIMENT-HEAD with EXPERIMENT in {list(EXPERIMENTS)} and HEAD "
                         f"mse or flow, e.g. {', '.join(DEFAULT_CELLS)}")
    return experiment, head


def cell_spec(cell: str, seed: int) -> dict:
    """("E2-flow", 1) -> {"experiment": "E2", "head": "flow", "seed": 1, "name": "E2-flow-seed1"}."""
    experiment, head = parse_cell(cell)
    return {"experiment": experiment, "head": head, "seed": int(seed), "name": f"{cell}-seed{int(seed)}"}


def plan_cells(cells: list[str], seeds: list[int]) -> list[dict]:
    """Cells x seeds -> one dict per training run, seed-major (the order `wmvla matrix` runs them)."""
    if not cells or not seeds:
        raise WmvlaError(f"the matrix is empty: cells={list(cells)}, seeds={list(seeds)}; give at least one of each")
    out = [cell_spec(name, seed) for seed in seeds for name in cells]
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        raise WmvlaError(f"duplicate cells: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return out


def matrix_settings(preset: str, *, backbone: str = "", world_encoder: str = "", window: int = 0, steps: int = 0,
                    batch_size: int = 0, env: str = "", suite: str = "", tasks: str = "", episodes: int = 10,
                    workers: int = 2, ablations: list[str] = ("zero", "random", "shuffle"), device: str = "",
                    render_backend: str = "egl", progress: bool = False) -> dict:
    """Pipeline parameters -> a checked MatrixConfig as a JSON dict. Pipeline parameters cannot be None, so
    "" and 0 mean "the preset's value" (KFP's UI shows every parameter with a typed default)."""
    cfg = MatrixConfig(
        preset=preset, backbone=backbone or None, world_encoder=world_encoder or None, window=window or None,
        steps=steps or None, batch_size=batch_size or None, env=env or None, suite=suite or None,
        tasks=tasks or None, episodes=episodes, workers=workers, ablations=tuple(ablations),
        device=device or None, render_backend=render_backend, progress=progress)
    base_train_config(cfg)  # an unknown preset fails here, before any pod starts
    # unset fields are left out (their default is None; a KFP parameter value cannot be null)
    return {k: v for k, v in to_jsonable(cfg).items() if v is not None}


def load_settings(settings: dict) -> MatrixConfig:
    # KFP passes dicts as protobuf Structs, whose numbers are all doubles: 300 arrives as 300.0
    return from_dict(MatrixConfig, _integral(settings))


def _integral(obj):
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, dict):
        return {k: _integral(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_integral(v) for v in obj]
    return obj


def plan(settings: dict, cells: list[str], seeds: list[int], run: str) -> list[dict]:
    """The pipeline's loop items: one self-contained dict per training run (cell, seed, the run's URI and
    the matrix settings), so a train or evaluate task needs nothing else to know what to do."""
    return [{**c, "run": run, "settings": settings} for c in plan_cells(cells, seeds)]


def results_location(results_uri: str) -> str:
    """The pipeline's results root: `results_uri`, else the install's WMVLA_RESULTS_URI (the chart's ConfigMap,
    in every pod); a clear error when neither is set (raised in the plan step, before any GPU pod)."""
    from vla_core.storage.cli import results_uri_or_env

    return results_uri_or_env(results_uri, "pass the pipeline parameter results_uri=s3://bucket/prefix, or install "
                                           "the chart (charts/wmvla: its ConfigMap sets it in every pod)")


_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def run_prefix(run_name: str, job_name: str = "") -> str:
    """The run's folder name under the results root. An explicit run_name must already be one clean path
    segment (it is also how a run is resumed: the same name finds the same folder); the KFP run's name (a
    display name: spaces, colons, slashes) is made one: other characters become '-'."""
    if run_name:
        if not _SEGMENT.fullmatch(run_name):
            raise WmvlaError(f"run_name {run_name!r}: expected one path segment of letters, digits, '.', '_' and '-' "
                             f"(it becomes <results_uri>/<run>), e.g. {re.sub(r'[^A-Za-z0-9._-]+', '-', run_name)!r}")
        return run_name
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", job_name).strip("-._")
    if not clean:
        raise WmvlaError(f"the KFP run's name {job_name!r} gives no usable folder name; pass run_name=...")
    return clean


def run_uri(results_uri: str, run_name: str) -> str:
    if not run_name:
        raise WmvlaError(f"need a run name, got run={run_name!r}")
    if "/" in run_name.strip("/"):
        raise WmvlaError(f"run name {run_name!r}: expected one path segment (it becomes <results_uri>/<run>)")
    return f"{results_location(results_uri)}/{run_name.strip('/')}"


def gpu_count(value, sized_for: int | None = None) -> int:
    """The pipeline's gpus_per_cell: a whole number >= 0, given as text (the KFP driver sets a pod's GPU limit
    only from a string parameter) or as a number. sized_for: the GPUs per cell the compiled pipeline's train pods
    are sized for (CPU, memory, /dev/shm are fixed at compile time: the backend can neither compute a resource
    from a parameter nor size an emptyDir from one), so a run asking for more is refused; fewer is fine."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise WmvlaError(f"gpus_per_cell {value!r}: expected a whole number of GPUs per training pod, e.g. \"1\" or "
                         f"\"4\"")
    count = int(text)
    sized_for = None if sized_for is None else int(sized_for)  # a pipeline constant may arrive as 1.0
    if sized_for is not None and count > sized_for:
        raise WmvlaError(
            f"gpus_per_cell {value!r}: this pipeline's train pods are sized (CPU, memory, /dev/shm) for at most "
            f"{sized_for} GPU(s) per cell. Fix: compile it for {count} (`wmvla pipeline compile --gpus-per-cell "
            f"{count}`, or gpuPool.gpusPerCell: {count} in the chart values file you compile with `--values`), "
            f"upload that pipeline and run it; or run with gpus_per_cell <= {sized_for}")
    return count


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(parts), sort_keys=True).encode()).hexdigest()[:12]


def _local_root(workdir: str | os.PathLike, uri: str) -> Path:
    """Where a task keeps its copy of `uri` (the same path on every pod, so a resumed run's config matches)."""
    text = str(uri)
    rel = text.split("://", 1)[1] if "://" in text else Path(text).resolve().as_posix().lstrip("/")
    return Path(workdir) / "store" / rel


# ---------------------------------------------------------------------------------------- dataset


def prepare_dataset(source: str, results_uri: str, workdir: str, *, tasks: str, episodes: int, image_size: int,
                    workers: int = 2, render_backend: str = "egl") -> str:
    """The dataset's URI for the other steps. `source`: s3:// URI or folder of a LeRobot dataset (checked),
    a hub id (resolved from the Hugging Face cache by the steps that read it), or "metaworld": scripted
    expert data is generated once per settings and stored under results_uri/cache/."""
    from vla_core.storage import open_store, publish_run

    if source != METAWORLD:
        if source.startswith("s3://"):
            if not open_store(source).exists("meta/info.json"):
                raise WmvlaError(f"dataset {source}: no meta/info.json under this prefix; expected a LeRobot "
                                 "dataset folder uploaded as it is (meta/info.json last, so a half upload is refused)")
        elif Path(source).exists() and not (Path(source) / "meta" / "info.json").is_file():
            raise WmvlaError(f"dataset {source}: a folder without meta/info.json; expected a LeRobot dataset")
        return str(Path(source).resolve()) if Path(source).exists() else source
    from vla_core.envs.generate import GenerateConfig, load_generation_record, run_generate

    gen = GenerateConfig(env="metaworld", out=Path("."), tasks=tasks, episodes=episodes, image_size=image_size,
                         workers=workers, render_backend=render_backend)
    key = _key({k: v for k, v in to_jsonable(gen).items() if k not in ("out", "workers")})
    uri = f"{results_location(results_uri)}/cache/dataset-metaworld-{key}"
    store = open_store(uri)
    if store.exists("_manifest.json"):
        print(f"dataset: {uri} exists (same generation settings); reusing it", flush=True)
        return uri
    local = _local_root(workdir, uri)
    if load_generation_record(local) is None:
        run_generate(dataclasses.replace(gen, out=local, overwrite=local.exists()))
    publish_run(local, uri)
    return uri


def local_dataset(uri: str, workdir: str, scope: str) -> Path:
    """A local folder holding the dataset (synced from the store; local paths and hub ids as they are).
    `scope` (the cell's name) gives each task its own copy: a sync briefly hides meta/info.json, so tasks
    that share a disk (kfp.local runs two loop iterations at once) must not share the folder."""
    from vla_core.storage import sync_dataset

    return Path(sync_dataset(uri, Path(workdir) / "datasets" / scope))


# ---------------------------------------------------------------------------------------- latents


def latents_spec(preset: str, world_encoder: str = "", window: int = 0):
    """The world encoder spec a matrix with these settings trains against ("" / 0: the preset's)."""
    return base_train_config(MatrixConfig(preset=preset, world_encoder=world_encoder or None,
                                          window=window or None)).world


def cache_latents(preset: str, world_encoder: str, window: int, dataset_uri: str, results_uri: str, workdir: str,
                  device: str = "") -> str:
    """World latents of every frame for the preset's (or overridden) encoder spec -> results_uri/cache/...;
    returns the URI of the folder holding the .npy and its .json (the .json is uploaded last). Takes only
    what the latents depend on, so the pipeline's cache key is exactly that."""
    from vla_core.storage import open_store, sync_up
    from vla_core.world.cache import LatentCache, LatentsConfig, cache_filename, meta_path, run_latents

    spec = latents_spec(preset, world_encoder, window)
    name = cache_filename(spec)
    uri = f"{results_location(results_uri)}/cache/latents-{_key(dataset_uri, spec)}"
    store = open_store(uri)
    if store.exists(meta_path(Path(name)).name):
        print(f"latents: {uri}/{name} exists; reusing it", flush=True)
        return uri
    ds = local_dataset(dataset_uri, workdir, "latents")
    local = _local_root(workdir, uri)
    npy = local / name
    try:
        LatentCache.open(npy, expect=spec, check_finite=False)
    except WmvlaError:
        run_latents(LatentsConfig(dataset=str(ds), encoder=spec.encoder, revision=spec.revision, window=spec.window,
                                  camera_key=spec.camera_key, image_size=spec.image_size, pooling=spec.pooling,
                                  precision=spec.precision, seed=spec.seed, out=local, num_workers=0,
                                  device=device or "auto"))
    # the array first, the spec last: a reader never sees a spec without its finished array
    sync_up(local, store, files=[name])
    sync_up(local, store, files=[meta_path(Path(name)).name])
    return uri


def local_latents(uri: str, settings: dict, workdir: str) -> Path:
    from vla_core.storage import sync_down
    from vla_core.world.cache import cache_filename

    name = cache_filename(base_train_config(load_settings(settings)).world)
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://")) / name
    local = _local_root(workdir, uri)
    sync_down(uri, local)
    return local / name


# ------------------------------------------------------------------------------------------ train


def _unpack(item: dict) -> tuple[dict, dict, str]:
    """A loop item -> (cell, settings, run URI); KFP hands dicts over with every number a double."""
    item = _integral(dict(item))
    return cell_spec(f"{item['experiment']}-{item['head']}", item["seed"]), item["settings"], item["run"]


def label_job(item: dict) -> None:
    """Label this process's metrics with the loop item's run (its folder name under the results URI, i.e. the
    KFP run) and cell, unless the environment already says otherwise (vla_core.telemetry reads them). Called
    by the per-pod components, once per process: it sets process-wide environment variables."""
    cell, _, run = _unpack(item)
    os.environ.setdefault(env_names.RUN_ID, run.rstrip("/").rsplit("/", 1)[-1])
    os.environ.setdefault(env_names.CELL, f"{cell['experiment']}-{cell['head']}-s{cell['seed']}")


def cell_train_config(settings: dict, cell: dict, dataset: str, latents: str, out_root: Path):
    cfg = dataclasses.replace(load_settings(settings), dataset=dataset, latents=latents, out=out_root)
    return cell_config(base_train_config(cfg), cell["experiment"], cell["head"], int(cell["seed"]))


def cell_paths(settings: dict, cell: dict, run: str, workdir: str) -> tuple[Path, Path, str]:
    """-> (local run root, the cell's local run folder, the cell's URI in the store)."""
    from vla_core.train.loop import resolve_run_dir

    root = _local_root(workdir, run)
    tcfg = cell_train_config(settings, cell, "", "", root)
    run_dir = resolve_run_dir(tcfg)
    return root, run_dir, f"{run.rstrip('/')}/{run_dir.relative_to(root).as_posix()}"


def torchrun_command(config_file: Path, nproc: int) -> list[str]:
    """One training run over `nproc` local GPUs: torchrun (DDP / FSDP as the config says) on `wmvla train`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "vla_core.cli", "train", "--config", str(config_file)]


def train_cell(item: dict, dataset_uri: str, latents_uri: str, workdir: str, gpus: int | None = None) -> dict:
    """Train one loop item of `plan`; checkpoints go to the store as they are saved, so a re-run on a new
    pod resumes. gpus: processes to launch (None: every visible GPU; torchrun when > 1). Returns done.json
    plus "uri" (the cell's run folder in the store) and "cell"."""
    from vla_core.train.loop import train

    cell, settings, run = _unpack(item)
    root, run_dir, uri = cell_paths(settings, cell, run, workdir)
    ds = local_dataset(dataset_uri, workdir, cell["name"])
    latents = local_latents(latents_uri, settings, workdir) if cell["experiment"] != "E0" else ""
    tcfg = dataclasses.replace(cell_train_config(settings, cell, str(ds), str(latents), root), remote=uri)
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus > 1:
        config_file = root / "configs" / f"{cell['name']}.json"
        atomic_write_json(config_file, tcfg)
        cmd = torchrun_command(config_file, gpus)
        print("train: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        summary = json.loads((run_dir / "done.json").read_text())
    else:
        summary = train(tcfg)
    # nothing to upload here: with `remote` the loop itself mirrors checkpoints, logs and done.json
    return {**summary, "uri": uri, "cell": cell}


# --------------------------------------------------------------------------------------- evaluate


def checkpoint_objects(store, use_ema: bool = True) -> tuple[list, dict[str, str]]:
    """What evaluating a trained run reads from the store -> (objects, their sha256 where the manifest has them):
    of its newest checkpoint (named by checkpoints/latest) only the weights evaluation loads (the EMA +
    buffers files when the checkpoint has them, `vla_core.train.checkpoint.evaluated_files`) and the small
    files, never train_state.pt (the optimizer state, half of a 2B checkpoint) nor older checkpoints; plus the
    run's top-level files. Checked against the checkpoint's manifest: a checkpoint whose upload did not finish
    is refused."""
    from vla_core.storage import read_manifest
    from vla_core.storage.store import ObjectInfo
    from vla_core.train.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, evaluated_files
    from vla_core.train.rundir import CKPT_DIR, LATEST

    if not store.exists(f"{CKPT_DIR}/{LATEST}"):
        raise WmvlaError(f"{store.describe(CKPT_DIR)}: no {LATEST} checkpoint; has the cell's training finished?")
    name = store.get_bytes(f"{CKPT_DIR}/{LATEST}").decode().strip()
    manifest = read_manifest(store.child(f"{CKPT_DIR}/{name}"))
    if manifest is None:
        raise WmvlaError(f"{store.describe(f'{CKPT_DIR}/{name}')}: no manifest: the checkpoint's upload did not "
                         "finish (the manifest is written last); re-run the cell's training step to upload it")
    files = manifest["files"]
    weights = set(evaluated_files(set(files), use_ema))
    skip = {MODEL_FILE, EMA_FILE, STATE_FILE} - weights
    prefix = f"{CKPT_DIR}/{name}/"
    objects = [o for o in store.list() if "/" not in o.key or o.key == f"{CKPT_DIR}/{LATEST}"]
    objects += [ObjectInfo(prefix + rel, files[rel]["size"]) for rel in sorted(files) if rel not in skip]
    return objects, {prefix + rel: files[rel]["sha256"] for rel in files if rel not in skip}


def fetch_checkpoint_for_eval(uri: str, run_dir: str | Path, log=print) -> dict:
    """Download what evaluating the cell's run at `uri` reads (`checkpoint_objects`) into `run_dir`, verified
    against the checkpoint's manifest. Returns {"bytes", "files", "seconds"}."""
    import time

    from vla_core.storage import open_store, sync_down

    t = time.perf_counter()
    objects, expected = checkpoint_objects(open_store(uri))
    res = sync_down(uri, run_dir, objects=objects, expected_sha256=expected)
    out = {"bytes": res.bytes, "files": len(objects), "seconds": round(time.perf_counter() - t, 2)}
    log(f"eval: fetched {out['files']} files of the newest checkpoint ({res.bytes / 1e9:.2f} GB downloaded, "
        f"{len(res.skipped)} already here) in {out['seconds']} s from {uri}")
    return out


def eval_config_for(cfg: MatrixConfig, plan, ckpt: Path, mode: str, condition: str, out: Path, remote: str,
                    device: str):
    """The `wmvla eval` config of one condition, with exactly the env settings `wmvla matrix` uses."""
    from vla_core.eval.cli import EvalConfig

    env = plan.env_cfg
    return EvalConfig(
        out=out, env=env.env, suite=env.resolved_suite, tasks=",".join(plan.tasks), episodes=len(plan.init_indices),
        first_init=plan.init_indices[0], workers=cfg.workers, checkpoint=ckpt, rollout_memory=mode, device=device,
        condition=condition, replan_steps=cfg.replan_steps, max_steps=env.max_steps, seed=env.seed,
        policy_seed=cfg.policy_seed, image_size=env.image_size, wrist_camera=env.wrist_camera,
        render_backend=env.render_backend, progress=cfg.progress, metaworld=env.metaworld, libero=env.libero,
        remote=remote)


def evaluate_cell(item: dict, dataset_uri: str, workdir: str) -> dict:
    """Closed-loop evaluation of one trained cell under its own rollout memory (E2: also the ablations).
    Episodes go to the store as they are recorded, so a re-run resumes. Returns {condition: summary}."""
    import torch

    from vla_core.eval.checkpoint_policy import eval_dir_for
    from vla_core.eval.cli import SUMMARY_FILE, run_eval
    from vla_core.storage import sync_up
    from vla_core.train.checkpoint import resolve_checkpoint

    cell, settings, run = _unpack(item)
    cfg = load_settings(settings)
    root, run_dir, uri = cell_paths(settings, cell, run, workdir)
    fetch_checkpoint_for_eval(uri, run_dir)
    ckpt = resolve_checkpoint(run_dir)
    plan = eval_plan(cfg, str(local_dataset(dataset_uri, workdir, cell["name"])))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    # as `wmvla matrix`: one policy thread on CPU leaves the cores to the env renderers
    torch.set_num_threads(cfg.eval_threads or (1 if device == "cpu" and cfg.workers >= 2 else threads))
    results = {}
    try:
        for mode in rollout_memories(cell["experiment"], cfg.ablations):
            condition = f"{cell['experiment']}-{cell['head']}-{mode}"
            out = eval_dir_for(ckpt, plan.env_cfg.env, plan.env_cfg.resolved_suite, mode)
            remote = f"{uri}/{out.relative_to(run_dir).as_posix()}"
            run_eval(eval_config_for(cfg, plan, ckpt, mode, condition, out, remote, device))
            sync_up(out, remote)
            results[condition] = json.loads((out / SUMMARY_FILE).read_text())
    finally:
        torch.set_num_threads(threads)
    return results


# ----------------------------------------------------------------------------------------- report


def report(items: list[dict], workdir: str, kfp_run: str = "", kfp_run_id: str = "") -> tuple[str, Path, dict]:
    """Pull what the report reads (logs and evaluations, no checkpoints) from the run's prefix, write the
    report, publish the run (manifest last). The report names the run by its URI and the KFP run (`kfp_run`
    name, `kfp_run_id`), not by the pod's local copy. Returns (run URI, local run folder, the report's summary)."""
    from vla_core.experiments.report import ReportConfig, run_report
    from vla_core.storage import open_store, publish_run, sync_down

    cells = [_unpack(item)[0] for item in items]
    runs = {_integral(item)["run"] for item in items}
    if len(runs) != 1:
        raise WmvlaError(f"the loop items name {len(runs)} runs ({sorted(runs)}); expected the one run of a pipeline")
    run = runs.pop()

    store = open_store(run)
    objects = [o for o in store.list() if Path(o.key).name in REPORT_FILES and "/checkpoints/" not in f"/{o.key}"
               and o.key.count("/") > 0]
    if not objects:
        raise WmvlaError(f"{run}: no training logs or evaluations to report on (did the cells run?)")
    local = _local_root(workdir, run.rstrip("/") + "-report")
    sync_down(store, local, objects=objects)
    if cells:
        # <E>/<tag ending in _head>/seed<k>/eval/<condition>/summary.json (vla_core.train.rundir's layout)
        missing = [c["name"] for c in cells if not any(
            o.key.startswith(f"{c['experiment']}/") and f"_{c['head']}/seed{int(c['seed'])}/eval/" in o.key
            and o.key.endswith("/summary.json") for o in objects)]
        if missing:
            raise WmvlaError(f"{run}: no results for cells {missing}")
    kfp = f"{kfp_run} ({kfp_run_id})" if kfp_run and kfp_run_id and kfp_run_id != kfp_run else kfp_run or kfp_run_id
    run_report(ReportConfig(run_root=local, print_table=False, run_uri=run, kfp_run=kfp))
    publish_run(local, store)
    # the run's last step: its jobs' groups leave the Pushgateway (Prometheus keeps what it scraped); the run
    # label as label_job gives every job of this run
    from vla_core import telemetry

    telemetry.end_run(os.environ.get(env_names.RUN_ID) or run.rstrip("/").rsplit("/", 1)[-1])
    return run, local, json.loads((local / "summary.json").read_text())


def success_metrics(summary: dict) -> dict[str, float]:
    """Per-condition success rates (the KFP Metrics artifact: runs compare side by side in the UI)."""
    return {f"success/{name}": float(c["success_rate"]) for name, c in summary.get("conditions", {}).items()}


def report_html(run_root: Path) -> str:
    """report.md as one self-contained HTML page: tables rendered, plots inlined as base64 PNG (the KFP UI
    shows HTML artifacts in a sandboxed frame that cannot fetch files)."""
    import base64
    import html

    from markdown_it import MarkdownIt

    md = (run_root / "report.md").read_text()

    def inline(path: str) -> str:
        p = run_root / path
        return f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" if p.is_file() else path

    parser = MarkdownIt("commonmark").enable("table")
    tokens = parser.parse(md)
    for tok in tokens:
        for child in tok.children or []:
            if child.type == "image" and child.attrs.get("src"):
                child.attrs["src"] = inline(str(child.attrs["src"]))
    body = parser.renderer.render(tokens, parser.options, {})
    style = ("body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}")
    title = json.loads((run_root / "summary.json").read_text()).get("run_uri") or run_root.name
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def report_markdown(run_root: Path) -> str:
    """report.md with the plots inlined as data URIs (a KFP Markdown artifact is one file)."""
    import base64
    import re

    def inline(m: re.Match) -> str:
        p = run_root / m.group(2)
        if not p.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, (run_root / "report.md").read_text())
