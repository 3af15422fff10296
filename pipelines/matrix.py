"""The experiment matrix as a Kubeflow pipeline: the graph only.

    pre-flight (CPU: results writable, dataset reachable, model cache filled; fails in seconds)
      -> plan (CPU) -> prepare dataset (CPU, cached) -> cache latents (1 GPU, cached)
      -> ParallelFor cell in cells x seeds:  train cell (GPU pool, `gpus_per_cell` GPUs, retried)
                                             -> plan shards -> ParallelFor shard: evaluate shard (GPU pool,
                                                EGL, retried, resumes from its prefix) -> merge shards (CPU)
      -> report (CPU): Collected results -> HTML + Markdown + Metrics in the KFP UI, published to the bucket

Every step is a component in components/ (a thin call into vla_core.experiments.cells); where it runs
(image, node pool, GPUs, secrets, volumes) is `components.platform.apply_platform`. `build(platform)`
returns the pipeline for one install (registry, tag, node label: `wmvla pipeline compile`);
`matrix` is the one compiled into pipelines/matrix.yaml.
"""

from kfp import dsl

from components.dataset import prepare_dataset
from components.evaluate_shard import evaluate_shard
from components.latents import cache_latents
from components.merge_shards import merge_shards
from components.plan import plan_matrix
from components.plan_shards import plan_shards
from components.platform import DEFAULT, Platform, apply_platform
from components.preflight import preflight
from components.report import report
from components.train import train_cell
from vla_core.experiments.cells import DEFAULT_CELLS

# Retries of train / evaluate / merge (Argo retryStrategy, made by the KFP backend from the IR's retryPolicy):
# a pod that FAILS (the process died: OOM kill, a crash, a lost connection to the bucket) is retried and resumes
# from the bucket. Argo counts backoff_max_duration from the FIRST attempt's start and gives each retry pod that
# deadline (argo-workflows workflow/controller/operator.go, processNodeRetries), so it must cover every attempt
# of the longest training (libero-2b: 13-18 h per cell on one L40S, docs/pipeline.md): a week. kfp's default,
# 1 h, would never retry a training that ran longer. A DELETED or EVICTED pod ends in Argo's Error phase, which
# the backend's retryStrategy (kubeflow/pipelines argocompiler/container.go getTaskRetryStrategyFromInput sets no
# retryPolicy: Argo's default OnFailure, argo-workflows RetryPolicyActual) does not retry, and the IR cannot ask
# for more: such a run is retried as a whole (KFP UI "Retry", or resubmitted with the same run_name), and its
# pods resume from the bucket the same way (docs/pipeline.md, "What a retry covers").
RETRIES = 2
RETRY_BACKOFF = "60s"
RETRY_MAX_DURATION = "168h"


def build(platform: Platform = DEFAULT):
    @dsl.pipeline(name="wmvla-matrix",
                  description="World memory for VLA policies: E0/E2 x MSE/flow cells trained and evaluated in "
                              "closed loop, with the report (Wilson CIs, paired McNemar tests, verdict).")
    def matrix(
        dataset: str = "HuggingFaceVLA/libero",
        results_uri: str = "",
        run_name: str = "",
        preset: str = "libero-2b",
        backbone: str = "",
        world_encoder: str = "",
        window: int = 0,
        cells: list = list(DEFAULT_CELLS),
        seeds: list = [0],
        steps: int = 0,
        batch_size: int = 0,
        gpus_per_cell: str = str(platform.gpus_per_cell),
        eval_env: str = "libero",
        eval_suite: str = "libero_spatial",
        eval_tasks: str = "",
        episodes: int = 50,
        workers: int = 16,
        eval_shards: int = 0,
        ablations: list = ["zero", "random", "shuffle"],
        metaworld_tasks: str = "button-press-topdown,drawer-close,window-open",
        metaworld_episodes: int = 20,
        image_size: int = 64,
        device: str = "",
        render_backend: str = "egl",
        workdir: str = "/tmp/wmvla",
    ):
        """"" / 0 = the preset's value. dataset: s3:// URI, hub id (in the model cache), folder, or "metaworld"
        (expert data generated from metaworld_tasks / metaworld_episodes / image_size). results_uri: "" = the
        install's (WMVLA_RESULTS_URI of the chart's ConfigMap). run_name: "" = the KFP run's name made a path
        segment; results land in <results_uri>/<run>/. gpus_per_cell: a whole number as text ("2"): the KFP
        driver sets the GPU limit from a string parameter only; at most what the pipeline was compiled for
        (`wmvla pipeline compile --gpus-per-cell N`, its default), which sizes the train pods' CPU / memory. eval_shards: pods each cell's evaluation is split
        into (0 = sized for the suite: MetaWorld 1, LIBERO at most 9 waves of `workers` episodes per shard)."""
        # first, on a CPU pod with the pods' own environment: nothing else starts until it passed
        check = preflight(results_uri=results_uri, dataset=dataset, preset=preset, backbone=backbone,
                          world_encoder=world_encoder, window=window)
        apply_platform(check, platform, "preflight").set_caching_options(False)

        plan = plan_matrix(
            preset=preset, backbone=backbone, world_encoder=world_encoder, window=window, steps=steps,
            batch_size=batch_size, cells=cells, seeds=seeds, eval_env=eval_env, eval_suite=eval_suite,
            eval_tasks=eval_tasks, episodes=episodes, workers=workers, ablations=ablations, results_uri=results_uri,
            run_name=run_name, job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, device=device,
            render_backend=render_backend, gpus_per_cell=gpus_per_cell,
            compiled_gpus_per_cell=platform.gpus_per_cell)  # what the train pods are sized for
        apply_platform(plan, platform, "plan").set_caching_options(False).after(check)

        data = prepare_dataset(
            source=dataset, results_uri=results_uri, workdir=workdir, metaworld_tasks=metaworld_tasks,
            metaworld_episodes=metaworld_episodes, image_size=image_size, workers=workers,
            render_backend=render_backend)
        apply_platform(data, platform, "dataset").set_caching_options(True)
        data.after(plan)  # bad arguments (cells, preset, results location) fail in plan, before any other pod

        latents = cache_latents(preset=preset, world_encoder=world_encoder, window=window, results_uri=results_uri,
                                workdir=workdir, device=device, dataset=data.outputs["dataset"])
        apply_platform(latents, platform, "latents").set_caching_options(True)

        with dsl.ParallelFor(plan.output, name="cells") as cell:
            train = train_cell(cell=cell, workdir=workdir, gpus=gpus_per_cell, dataset=data.outputs["dataset"],
                               latents=latents.outputs["latents"])
            apply_platform(train, platform, "train", gpus=gpus_per_cell)
            train.set_caching_options(False).set_retry(RETRIES, backoff_duration=RETRY_BACKOFF,
                                                       backoff_max_duration=RETRY_MAX_DURATION)

            # evaluation fanned out: shard items carry their cell (kfp.local 2.17 hands a task in a nested loop
            # the inner loop's item for the outer one), each shard a GPU pod resuming from its own prefix
            shards = plan_shards(cell=cell, eval_shards=eval_shards, dataset=data.outputs["dataset"])
            apply_platform(shards, platform, "plan-shards").set_caching_options(False)
            with dsl.ParallelFor(shards.output, name="shards") as shard:
                evaluate = evaluate_shard(shard=shard, workdir=workdir, dataset=data.outputs["dataset"],
                                          model=train.outputs["model"])
                apply_platform(evaluate, platform, "evaluate")
                evaluate.set_caching_options(False).set_retry(RETRIES, backoff_duration=RETRY_BACKOFF,
                                                              backoff_max_duration=RETRY_MAX_DURATION)
            merge = merge_shards(cell=cell, shards=shards.output, done=dsl.Collected(evaluate.output), workdir=workdir,
                                 model=train.outputs["model"])
            apply_platform(merge, platform, "merge").set_caching_options(False).set_retry(
                RETRIES, backoff_duration=RETRY_BACKOFF, backoff_max_duration=RETRY_MAX_DURATION)

        summary = report(cells=plan.output, workdir=workdir, results=dsl.Collected(merge.outputs["results"]),
                         kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        apply_platform(summary, platform, "report").set_caching_options(False)

    return matrix


matrix = build()
