"""Plan-shards microjob (CPU): into how many shards one cell's evaluation is split (0 = sized for the suite)
-> the inner loop's items, each carrying its cell (List[dict]: STRUCT items, as evaluate_shard declares). Runs in
seconds, before the cell's evaluation pods."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("eval"), install_kfp_package=False)
def plan_shards(cell: dict, eval_shards: int, dataset: Input[Dataset]) -> List[dict]:
    from vla_core.experiments import eval_shards as shards

    return shards.plan_shards(cell, eval_shards, dataset.metadata["uri"])
