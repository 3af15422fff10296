"""Evaluate-shard microjob (GPU pool, EGL): shard i of n of every condition of one trained cell (an item of
plan_shards, which carries the cell). Its records go to the shard's own prefix as they are written; a
retried pod continues from them."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("eval"), install_kfp_package=False)
def evaluate_shard(shard: dict, workdir: str, dataset: Input[Dataset], model: Input[Model]) -> dict:
    from vla_core.experiments import cells, eval_shards

    cells.label_job(shard)  # this pod's metrics: run and cell labels
    return eval_shards.evaluate_shard(shard, dataset.metadata["uri"], workdir)
