"""Plan microjob (CPU): pipeline parameters -> the loop items, one per cell x seed (cell, seed, run URI, settings).

Runs first and in seconds, so a typo in a cell name or a preset fails before any GPU pod is scheduled."""

from kfp import dsl

from components.platform import DEFAULT


@dsl.component(base_image=DEFAULT.image("cpu"), install_kfp_package=False)
def plan_matrix(preset: str, backbone: str, world_encoder: str, window: int, steps: int, batch_size: int,
                cells: list, seeds: list, eval_env: str, eval_suite: str, eval_tasks: str, episodes: int,
                workers: int, ablations: list, results_uri: str, run_name: str, job_name: str, device: str,
                render_backend: str) -> list:
    from vla_core.experiments import cells as matrix_cells

    settings = matrix_cells.matrix_settings(
        preset, backbone=backbone, world_encoder=world_encoder, window=window, steps=steps, batch_size=batch_size,
        env=eval_env, suite=eval_suite, tasks=eval_tasks, episodes=episodes, workers=workers, ablations=ablations,
        device=device, render_backend=render_backend)
    run = matrix_cells.run_uri(results_uri, run_name or job_name)
    return matrix_cells.plan(settings, cells, seeds, run)
