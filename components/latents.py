"""Latents microjob (1 GPU): world-encoder latents of every frame, stored beside the dataset in the bucket."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("train"), install_kfp_package=False)
def cache_latents(preset: str, world_encoder: str, window: int, results_uri: str, workdir: str, device: str,
                  dataset: Input[Dataset], latents: Output[Artifact]):
    import json

    from vla_core.experiments import cells

    uri = cells.cache_latents(preset, world_encoder, window, dataset.metadata["uri"], results_uri, workdir, device)
    latents.metadata["uri"] = uri
    with open(latents.path, "w") as f:
        json.dump({"uri": uri}, f)
