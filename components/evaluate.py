"""Evaluate microjob (GPU pool, EGL): one trained cell in closed loop under its own rollout memory (E2 also
with zero / random / shuffled memory). Episodes are uploaded as recorded; a retried pod continues them."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("eval"), install_kfp_package=False)
def evaluate_cell(cell: dict, workdir: str, dataset: Input[Dataset], model: Input[Model], results: Output[Artifact],
                  metrics: Output[Metrics]):
    import json

    from vla_core.experiments import cells

    summaries = cells.evaluate_cell(cell, dataset.metadata["uri"], workdir)
    results.metadata.update({"uri": model.metadata["uri"], "cell": model.metadata["cell"]})
    with open(results.path, "w") as f:
        json.dump({name: s["overall"] for name, s in summaries.items()}, f, indent=2)
    for name, s in summaries.items():
        metrics.log_metric(f"success/{name}", s["overall"]["success_rate"])
