"""Pre-flight microjob (CPU, first in the graph): with this pod's own environment and credentials, the results
location is writable, the dataset is reachable and the model cache holds what the run needs; fails in seconds
naming the fix, before any GPU pod is scheduled (vla_core.experiments.preflight)."""

from kfp import dsl

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("cpu"), install_kfp_package=False)
def preflight(results_uri: str, dataset: str, preset: str, backbone: str, world_encoder: str, window: int) -> str:
    import json

    from vla_core.experiments.preflight import preflight as run_preflight

    return json.dumps(run_preflight(results_uri, dataset, preset, backbone=backbone, world_encoder=world_encoder,
                                    window=window).to_dict())
