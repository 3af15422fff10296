"""A cell's evaluation fanned out in shards and merged (vla_core.experiments.eval_shards, components/
evaluate_shard.py, merge_shards.py), run for real through kfp.local against a real S3 server: the merged
result equals an unsharded evaluation of the same episodes, and a lost shard pod resumes from the bucket."""


import dataclasses
import json
import os
import shutil
import warnings

import pytest

from vla_core.utils import WmvlaError

os.environ.setdefault("MUJOCO_GL", "egl")

TASK = "button-press-topdown"


def test_auto_sizing_and_refusals():
    from vla_core.experiments import cells
    from vla_core.experiments.eval_shards import LIBERO_WAVES_PER_SHARD, auto_num_shards, plan_shards

    # LIBERO: no shard runs more than LIBERO_WAVES_PER_SHARD waves of `workers` episodes
    assert auto_num_shards("libero", 500, 16) == 4 and 500 / 4 <= LIBERO_WAVES_PER_SHARD * 16
    assert auto_num_shards("libero", 2000, 16) == 14
    assert auto_num_shards("metaworld", 2000, 16) == 1
    settings = cells.matrix_settings("demo", env="metaworld", tasks=f"{TASK},drawer-close", episodes=2, workers=1)
    (item,) = cells.plan(settings, ["E0-mse"], [0], "/tmp/unused/run")
    assert plan_shards(item, 0, "metaworld") == [{**item, "shard": 0, "num_shards": 1}]
    assert plan_shards(item, 3, "metaworld")[2] == {**item, "shard": 2, "num_shards": 3}
    with pytest.raises(WmvlaError, match="more than the 4 episodes"):
        plan_shards(item, 5, "metaworld")
    with pytest.raises(WmvlaError, match=">= 0"):
        plan_shards(item, -1, "metaworld")


def _pipeline():
    """dataset -> plan -> cells: train -> ParallelFor shards (evaluate_shard) -> merge (Collected shard outputs)."""
    from kfp import dsl

    from components.dataset import prepare_dataset
    from components.evaluate_shard import evaluate_shard
    from components.merge_shards import merge_shards
    from components.plan import plan_matrix
    from components.plan_shards import plan_shards
    from components.train import train_cell

    @dsl.pipeline(name="shards-test")
    def shards_test(results_uri: str, workdir: str, eval_shards: int):
        plan = plan_matrix(preset="demo", backbone="", world_encoder="", window=0, steps=3, batch_size=8,
                           cells=["E0-mse"], seeds=[0], eval_env="", eval_suite="", eval_tasks="", episodes=3,
                           workers=1, ablations=[], results_uri=results_uri, run_name="sharded", job_name="x",
                           device="cpu", render_backend="egl", gpus_per_cell="0",
                           compiled_gpus_per_cell=1)
        data = prepare_dataset(source="metaworld", results_uri=results_uri, workdir=workdir, metaworld_tasks=TASK,
                               metaworld_episodes=2, image_size=64, workers=1, render_backend="egl")
        with dsl.ParallelFor(plan.output) as cell:
            # E0 reads no latents (train_cell skips them), so the latents task is left out to save time
            train = train_cell(cell=cell, workdir=workdir, gpus="0", dataset=data.outputs["dataset"],
                               latents=data.outputs["dataset"])
            shards = plan_shards(cell=cell, eval_shards=eval_shards, dataset=data.outputs["dataset"])
            with dsl.ParallelFor(shards.output) as shard:
                one = evaluate_shard(shard=shard, workdir=workdir, dataset=data.outputs["dataset"],
                                     model=train.outputs["model"])
            merge_shards(cell=cell, shards=shards.output, done=dsl.Collected(one.output), workdir=workdir,
                         model=train.outputs["model"])

    return shards_test


def test_sharded_evaluation_through_kfp_local_equals_unsharded(tmp_path, s3_env, capsys):
    from kfp import local

    from vla_core.eval.cli import run_eval
    from vla_core.experiments import cells, eval_shards
    from vla_core.storage import open_store
    from vla_core.utils import read_jsonl

    results = s3_env.create_bucket("eval-shards") + "/runs"
    work = tmp_path / "work"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _pipeline()(results_uri=results, workdir=str(work), eval_shards=2)

    settings = cells.matrix_settings("demo", steps=3, batch_size=8, episodes=3, workers=1, ablations=[],
                                     device="cpu")
    (item,) = cells.plan(settings, ["E0-mse"], [0], f"{results}/sharded")
    _, _, uri = cells.cell_paths(settings, cells._unpack(item)[0], item["run"], str(work))
    store = open_store(uri)
    (folder,) = {o.key.split("/")[1] for o in store.list("eval/")}
    merged = open_store(f"{uri}/eval/{folder}")
    merged_records = [json.loads(line) for line in merged.get_bytes("episodes.jsonl").decode().splitlines()]
    merged_summary = json.loads(merged.get_bytes("summary.json"))
    assert merged_summary["config"]["sharding"]["num_shards"] == 2
    # each shard ran some of the 3 episodes, in its own prefix
    per_shard = [len(list(read_jsonl_bytes(open_store(eval_shards.shard_uri(uri, folder, i, 2)),
                                           f"shards/shard-0{i}-of-02.jsonl"))) for i in range(2)]
    assert sorted(per_shard) == [1, 2]

    dataset_uri = next(o.key for o in open_store(f"{results}/cache").list() if o.key.endswith("_manifest.json"))
    dataset_uri = f"{results}/cache/{dataset_uri.rsplit('/', 1)[0]}"
    # a lost shard pod: the retry starts on an empty work folder (same path, as on every pod), restores the
    # shard's records and evaluates nothing again
    shutil.rmtree(work)
    capsys.readouterr()
    before = open_store(eval_shards.shard_uri(uri, folder, 0, 2)).get_bytes("shards/shard-00-of-02.jsonl")
    eval_shards.evaluate_shard({**item, "shard": 0, "num_shards": 2}, dataset_uri, str(work))
    said = capsys.readouterr().out
    assert "restored" in said, said[-2000:]
    after = open_store(eval_shards.shard_uri(uri, folder, 0, 2)).get_bytes("shards/shard-00-of-02.jsonl")
    assert after == before, "a recorded episode was evaluated again"

    # the same episodes unsharded, in this process, with the configs the pipeline's evaluate step uses
    _, _, _, conditions = eval_shards._conditions(item, dataset_uri, str(work), "plain")
    ((condition, ecfg),) = conditions
    assert condition == "E0-mse-none" and ecfg.out.name == folder
    plain = tmp_path / "unsharded"
    run_eval(dataclasses.replace(ecfg, out=plain))
    plain_records = read_jsonl(plain / "episodes.jsonl")

    def same(r):  # the wall time of an episode is the one field that may differ
        return {k: v for k, v in r.items() if k != "wall_s"}

    assert [same(r) for r in merged_records] == [same(r) for r in plain_records] and len(plain_records) == 3
    plain_summary = json.loads((plain / "summary.json").read_text())
    assert merged_summary["overall"] == plain_summary["overall"]
    assert merged_summary["per_task"] == plain_summary["per_task"]
    assert {k: v for k, v in merged_summary["config"].items() if k != "sharding"} == plain_summary["config"]

    # what the report collects: the merge task's results, in evaluate_cell's format
    (res,) = (tmp_path / "kfp").glob("*/*/merge-shards/results")
    assert json.loads(res.read_text()) == {"E0-mse-none": plain_summary["overall"]}

    # the merge refuses a shard plan the shards were not run with
    with pytest.raises(WmvlaError, match="expected one evaluation folder"):
        eval_shards.merge_cell_shards(item, [{**item, "shard": i, "num_shards": 3} for i in range(3)], str(tmp_path / "m"))


def read_jsonl_bytes(store, key):
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines() if line.strip()]
