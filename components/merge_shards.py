"""Merge-shards microjob (CPU): a cell's shards -> each condition's episodes.jsonl + summary.json (missing,
overlapping or inconsistent shards refused), uploaded where an unsharded evaluation goes; the same results
and metrics as evaluate_cell, so the report collects either."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("cpu"), install_kfp_package=False)
def merge_shards(cell: dict, shards: list, done: list, workdir: str, model: Input[Model], results: Output[Artifact],
                 metrics: Output[Metrics]):
    import json

    from vla_core.experiments import eval_shards

    summaries = eval_shards.merge_cell_shards(cell, shards, workdir, reported=done)
    results.metadata.update({"uri": model.metadata["uri"], "cell": model.metadata["cell"]})
    with open(results.path, "w") as f:
        json.dump({name: s["overall"] for name, s in summaries.items()}, f, indent=2)
    for name, s in summaries.items():
        metrics.log_metric(f"success/{name}", s["overall"]["success_rate"])
