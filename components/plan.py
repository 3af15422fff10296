"""Plan microjob (CPU): pipeline parameters -> the loop items, one per cell x seed (cell, seed, run URI, settings).

Runs in seconds before any GPU pod (every other task but the pre-flight starts after it), so a typo in a cell
name or a preset, a bad GPU count (not a whole number, or more GPUs than the train pods were compiled for:
`compiled_gpus_per_cell`, a constant of the compiled pipeline) or a missing results location fails here. Returns
List[dict], so the loop items are typed STRUCT in the compiled pipeline, as the tasks that take them declare (a
bare `list` would give STRING items, which the KFP backend's driver refuses for a dict input:
pipelines/conformance.py)."""

from typing import List

from kfp import dsl

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("cpu"), install_kfp_package=False)
def plan_matrix(preset: str, backbone: str, world_encoder: str, window: int, steps: int, batch_size: int,
                cells: list, seeds: list, eval_env: str, eval_suite: str, eval_tasks: str, episodes: int,
                workers: int, ablations: list, results_uri: str, run_name: str, job_name: str, device: str,
                render_backend: str, gpus_per_cell: str, compiled_gpus_per_cell: int) -> List[dict]:
    from vla_core.experiments import cells as matrix_cells

    # refused here, not as a train pod without a GPU limit or with too little CPU / memory for its GPUs
    matrix_cells.gpu_count(gpus_per_cell, sized_for=compiled_gpus_per_cell)
    settings = matrix_cells.matrix_settings(
        preset, backbone=backbone, world_encoder=world_encoder, window=window, steps=steps, batch_size=batch_size,
        env=eval_env, suite=eval_suite, tasks=eval_tasks, episodes=episodes, workers=workers, ablations=ablations,
        device=device, render_backend=render_backend)
    run = matrix_cells.run_uri(results_uri, matrix_cells.run_prefix(run_name, job_name))
    print(f"plan: results of this run go to {run}")
    return matrix_cells.plan(settings, cells, seeds, run)
