"""Train microjob (GPU pool, `gpus` GPUs through torchrun): one cell of the matrix. `gpus` is text, as the
pipeline's gpus_per_cell that also sets the pod's GPU limit. Checkpoints are uploaded as they are saved, so a
retried pod resumes from the newest one instead of starting over."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("train"), install_kfp_package=False)
def train_cell(cell: dict, workdir: str, gpus: str, dataset: Input[Dataset], latents: Input[Artifact],
               model: Output[Model]):
    import json

    from vla_core.experiments import cells

    cells.label_job(cell)  # this pod's metrics: run and cell labels
    done = cells.train_cell(cell, dataset.metadata["uri"], latents.metadata["uri"], workdir,
                             gpus=cells.gpu_count(gpus) or None)
    model.metadata.update({"uri": done["uri"], "cell": done["cell"]["name"], "step": done.get("step")})
    with open(model.path, "w") as f:
        json.dump(done, f, indent=2, default=str)
