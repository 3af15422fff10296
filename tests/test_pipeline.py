"""The compiled Kubeflow pipeline (pipelines/matrix.yaml): current, shaped as PLATFORM.md says, and every
microjob on the right pool with the right platform settings; the plan functions behind its loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_EXECUTORS = ("exec-cache-latents", "exec-train-cell", "exec-evaluate-shard")
CPU_EXECUTORS = ("exec-preflight", "exec-plan-matrix", "exec-prepare-dataset", "exec-report", "exec-plan-shards", "exec-merge-shards")


@pytest.fixture(scope="module")
def compiled():
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "matrix.yaml").read_text()))
    assert len(docs) == 2, "expected the pipeline spec and its platform (kubernetes) spec"
    spec, platform = docs
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_current():
    from vla_core.cli import main

    assert main(["pipeline", "compile", "--check"]) == 0, "pipelines/matrix.yaml is stale: run `wmvla pipeline compile`"


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    from vla_core.cli import main

    stale = tmp_path / "matrix.yaml"
    stale.write_text((ROOT / "pipelines" / "matrix.yaml").read_text().replace("NVIDIA-L40S", "NVIDIA-A10G"))
    assert main(["pipeline", "compile", "--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err


def test_graph_loop_over_the_four_cells_collected_into_the_report(compiled):
    spec, _ = compiled
    root = spec["root"]
    params = root["inputDefinitions"]["parameters"]
    assert params["cells"]["defaultValue"] == ["E0-mse", "E2-mse", "E0-flow", "E2-flow"]
    assert params["seeds"]["defaultValue"] == [0]
    tasks = root["dag"]["tasks"]
    assert {"plan-matrix", "prepare-dataset", "cache-latents", "report"} <= set(tasks)
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-matrix-Output"
    body = spec["components"][loop["componentRef"]["name"]]["dag"]
    assert set(body["tasks"]) == {"train-cell", "plan-shards", "for-loop-2", "merge-shards"}
    # the evaluation fanned out: a nested loop over the cell's shards, then the merge collecting them
    assert params["eval_shards"]["defaultValue"] == 0  # sized for the suite
    shard_loop = body["tasks"]["for-loop-2"]
    assert shard_loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-shards-Output"
    inner = spec["components"][shard_loop["componentRef"]["name"]]["dag"]
    assert set(inner["tasks"]) == {"evaluate-shard"}
    assert inner["tasks"]["evaluate-shard"]["retryPolicy"]["maxRetryCount"] == 2
    assert set(body["tasks"]["merge-shards"]["dependentTasks"]) == {"for-loop-2", "plan-shards", "train-cell"}
    assert body["tasks"]["merge-shards"]["inputs"]["parameters"]["done"]["taskOutputParameter"]["producerTask"] == \
        "for-loop-2"
    # dsl.Collected: the loop's output is every iteration's merge-shards results, and the report reads it
    selector = body["outputs"]["artifacts"]["pipelinechannel--merge-shards-results"]["artifactSelectors"]
    assert selector == [{"outputArtifactKey": "results", "producerSubtask": "merge-shards"}]
    assert tasks["report"]["inputs"]["artifacts"]["results"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    # retries where a lost pod resumes from the bucket; caching only where the output is a pure function
    for name in ("train-cell", "merge-shards"):
        assert body["tasks"][name]["retryPolicy"]["maxRetryCount"] == 2
        assert not body["tasks"][name]["cachingOptions"].get("enableCache")
    for name in ("prepare-dataset", "cache-latents"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True
    for name in ("plan-matrix", "report"):
        assert not tasks[name]["cachingOptions"].get("enableCache")


def test_gpu_microjobs_on_the_l40s_pool_cpu_microjobs_off_it(compiled):
    from components.platform import DEFAULT

    spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    for name in GPU_EXECUTORS:
        res = executors[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", name
        assert k8s[name]["nodeSelector"]["labels"] == {DEFAULT.gpu_node_label: DEFAULT.gpu_node_value}, name
        assert k8s[name]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert k8s[name]["pvcMount"][0]["constant"] == DEFAULT.model_cache_pvc
        assert {"mountPath": "/dev/shm", "medium": "Memory"}.items() <= k8s[name]["emptyDirMounts"][0].items()
        secrets = {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in k8s[name]["secretAsEnv"]}
        assert secrets == {DEFAULT.store_secret: {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           DEFAULT.hf_secret: {"HF_TOKEN"}}, name
    # the train task's GPU count is the gpus_per_cell parameter, a STRING all the way to the pod (the driver
    # reads a resource placeholder with GetStringValue(): an integer parameter would set no GPU limit at all)
    assert executors["exec-train-cell"]["container"]["resources"]["accelerator"]["resourceCount"] == \
        "{{$.inputs.parameters['pipelinechannel--gpus_per_cell']}}"
    gpus = spec["root"]["inputDefinitions"]["parameters"]["gpus_per_cell"]
    assert (gpus["defaultValue"], gpus["parameterType"]) == ("1", "STRING")
    loop = spec["components"]["comp-for-loop-1"]
    assert loop["inputDefinitions"]["parameters"]["pipelinechannel--gpus_per_cell"]["parameterType"] == "STRING"
    assert loop["dag"]["tasks"]["train-cell"]["inputs"]["parameters"]["pipelinechannel--gpus_per_cell"] == \
        {"componentInputParameter": "pipelinechannel--gpus_per_cell"}
    assert executors["exec-evaluate-shard"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert float(executors["exec-evaluate-shard"]["container"]["resources"]["cpuRequest"]) >= 16  # LIBERO env workers
    for name in CPU_EXECUTORS:
        assert "accelerator" not in executors[name]["container"].get("resources", {}), name
        assert "nodeSelector" not in k8s[name] and "tolerations" not in k8s[name], name
        secrets = {s["secretName"] for s in k8s[name]["secretAsEnv"]}
        # the object store; the HF token only where the model cache is checked (pre-flight), never elsewhere
        assert secrets == {DEFAULT.store_secret} | ({DEFAULT.hf_secret} if name == "exec-preflight" else set()), name
    for name in GPU_EXECUTORS + CPU_EXECUTORS:
        labels = k8s[name]["podMetadata"]["labels"]
        assert labels[DEFAULT.part_of_label] == DEFAULT.part_of_value
        assert labels[DEFAULT.microjob_label]
        maps = {m["configMapName"] for m in k8s[name]["configMapAsEnv"]}
        assert maps == {DEFAULT.store_config, DEFAULT.metrics_config}


def test_images_follow_the_platform_and_install_nothing(compiled, tmp_path):
    from components.platform import DEFAULT

    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    kinds = {"exec-plan-matrix": "cpu", "exec-report": "cpu", "exec-prepare-dataset": "eval",
             "exec-cache-latents": "train", "exec-train-cell": "train", "exec-evaluate-shard": "eval",
             "exec-plan-shards": "eval", "exec-merge-shards": "cpu"}
    for name, kind in kinds.items():
        container = executors[name]["container"]
        assert container["image"] == DEFAULT.image(kind)
        assert "pip install" not in " ".join(container["command"]), name  # kfp is in the images

    from pipelines.cli import compile_pipeline

    out = compile_pipeline(DEFAULT.replace(registry="registry.example.com/lab", tag="abc123"), tmp_path / "m.yaml")
    images = {e["container"]["image"] for e in yaml.safe_load_all(out.read_text()).__next__()["deploymentSpec"]
              ["executors"].values()}
    assert images == {f"registry.example.com/lab/wmvla-{k}:abc123" for k in ("cpu", "train", "eval")}


def test_compile_from_chart_values(tmp_path):
    from components.platform import Platform
    from pipelines.cli import CompileConfig, compile_pipeline, platform_for
    from vla_core.utils import WmvlaError

    values = tmp_path / "values.yaml"
    values.write_text("gpuPool:\n  nodeValue: NVIDIA-H100-80GB-HBM3\n  gpusPerCell: 2\nobjectStore:\n"
                      "  credentials:\n    source: workloadIdentity\n")
    platform = platform_for(CompileConfig(values=values, tag="t1"))
    assert isinstance(platform, Platform) and platform.tag == "t1"
    assert platform.gpu_node_value == "NVIDIA-H100-80GB-HBM3" and platform.store_secret == ""
    assert platform.gpus_per_cell == 2 and platform_for(CompileConfig(values=values, gpus_per_cell=4)).gpus_per_cell == 4
    out = compile_pipeline(platform, tmp_path / "m.yaml")
    spec, k8s = yaml.safe_load_all(out.read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["gpus_per_cell"]["defaultValue"] == "2"
    train = k8s["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-cell"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [s["secretName"] for s in train["secretAsEnv"]] == [platform.hf_secret]  # no static store keys
    values.write_text("gpuPool:\n  gpusPerCell: two\n")
    with pytest.raises(WmvlaError, match=r"--values .*gpuPool\.gpusPerCell should be a int, found str"):
        platform_for(CompileConfig(values=values))


def test_arguments_are_checked():
    """Arguments are typed by the compiled file's parameters: what the backend would refuse is refused here."""
    from pipelines.cli import parse_arguments
    from vla_core.utils import WmvlaError

    assert parse_arguments(("seeds=[0,1]", "steps=20", "run_name=2024", "cells=E2-flow", "gpus_per_cell=2")) == {
        "seeds": [0, 1], "steps": 20, "run_name": "2024", "cells": ["E2-flow"], "gpus_per_cell": "2"}
    # the README's example: a JSON list, as the kfp CLI and the UI need it
    assert parse_arguments(('cells=["E0-mse","E2-mse"]',)) == {"cells": ["E0-mse", "E2-mse"]}
    with pytest.raises(WmvlaError, match="unknown"):
        parse_arguments(("stepz=3",))
    with pytest.raises(WmvlaError, match="KEY=VALUE"):
        parse_arguments(("steps",))
    with pytest.raises(WmvlaError, match="steps='many': expected integer, found str"):
        parse_arguments(("steps=many",))
    with pytest.raises(WmvlaError, match="expected integer, found float"):
        parse_arguments(("episodes=2.5",))


def test_submission_follows_the_install(tmp_path, monkeypatch):
    """The run's service account comes from the values file the chart was installed with, the namespace from
    --namespace or $KFP_NAMESPACE; the package is checked by the backend's rules first."""
    from components.platform import DEFAULT
    from pipelines.cli import SMOKE_ARGUMENTS, SubmitConfig, submission
    from vla_core.utils import WmvlaError

    values = ROOT / "charts" / "wmvla" / "examples" / "aws-s3-irsa.yaml"
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    args, account, namespace = submission(SubmitConfig(endpoint="http://kfp", values=values, args=("steps=5",)))
    assert (args, account, namespace) == ({"steps": 5}, "wmvla-runner", None)
    monkeypatch.setenv("KFP_NAMESPACE", "ml-research")
    assert submission(SubmitConfig(endpoint="http://kfp"))[1:] == (DEFAULT.service_account, "ml-research")
    assert submission(SubmitConfig(endpoint="http://kfp", namespace="other", service_account="sa"))[1:] == (
        "sa", "other")
    smoke, _, _ = submission(SubmitConfig(endpoint="http://kfp", smoke=True, args=("run_name=ci-1",)))
    assert smoke == {**SMOKE_ARGUMENTS, "run_name": "ci-1"}
    bad = tmp_path / "bad.yaml"
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "matrix.yaml").read_text()))
    docs[0]["components"]["comp-for-loop-2"]["inputDefinitions"]["parameters"][
        "pipelinechannel--plan-shards-Output-loop-item"]["parameterType"] = "STRING"
    bad.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(WmvlaError, match="would refuse"):
        submission(SubmitConfig(endpoint="http://kfp", package=bad))
    with pytest.raises(WmvlaError, match="--values"):
        submission(SubmitConfig(endpoint="http://kfp", values=tmp_path / "missing.yaml"))


def test_plan_cells_and_settings():
    from vla_core.experiments import cells
    from vla_core.utils import WmvlaError

    items = cells.plan(cells.matrix_settings("demo", steps=5), ["E0-mse", "E2-flow"], [0, 1], "s3://b/r/x")
    assert [i["name"] for i in items] == ["E0-mse-seed0", "E2-flow-seed0", "E0-mse-seed1", "E2-flow-seed1"]
    assert items[0]["settings"]["steps"] == 5 and "backbone" not in items[0]["settings"]  # unset: left out
    # KFP hands numbers back as doubles
    floated = {**items[3], "seed": 1.0, "settings": {**items[3]["settings"], "steps": 5.0}}
    cell, settings, run = cells._unpack(floated)
    assert cell["seed"] == 1 and cells.load_settings(settings).steps == 5 and run == "s3://b/r/x"
    with pytest.raises(WmvlaError, match="EXPERIMENT-HEAD"):
        cells.plan_cells(["E5-mse"], [0])
    with pytest.raises(WmvlaError, match="empty"):
        cells.plan_cells([], [0])
    with pytest.raises(WmvlaError, match="unknown training preset"):
        cells.matrix_settings("nope")
    assert cells.torchrun_command(Path("c.json"), 4)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                             "--nproc_per_node=4"]


def test_loop_items_are_typed_struct(compiled):
    """plan_matrix and plan_shards return List[dict], so both loops' items are STRUCT, as train_cell, plan_shards,
    merge_shards and evaluate_shard declare (a bare `list` gave STRING items the backend's driver refuses)."""
    spec, _ = compiled
    comps = spec["components"]
    assert comps["comp-plan-matrix"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "LIST"
    assert comps["comp-plan-shards"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "LIST"
    for loop, item in (("comp-for-loop-1", "pipelinechannel--plan-matrix-Output-loop-item"),
                       ("comp-for-loop-2", "pipelinechannel--plan-shards-Output-loop-item")):
        assert comps[loop]["inputDefinitions"]["parameters"][item]["parameterType"] == "STRUCT"
    for comp, name in (("comp-train-cell", "cell"), ("comp-plan-shards", "cell"), ("comp-merge-shards", "cell"),
                       ("comp-evaluate-shard", "shard")):
        assert comps[comp]["inputDefinitions"]["parameters"][name]["parameterType"] == "STRUCT"


def test_retries_outlast_a_long_training(compiled):
    """Argo counts backoff_max_duration from the first attempt and makes it every retry pod's deadline: it must
    cover the longest training's attempts (kfp's default, 3600 s, would never retry a training longer than 1 h)."""
    from pipelines.matrix import RETRIES

    spec, _ = compiled
    body = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    inner = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    for task in (body["train-cell"], body["merge-shards"], inner["evaluate-shard"]):
        policy = task["retryPolicy"]
        assert policy["maxRetryCount"] == RETRIES
        # libero-2b: up to ~18.3 h per attempt on one L40S (docs/pipeline.md); every attempt must fit
        assert int(policy["backoffMaxDuration"].rstrip("s")) >= (RETRIES + 1) * 18.3 * 3600


def test_results_location_follows_the_install(compiled, monkeypatch):
    """results_uri "" = the install's WMVLA_RESULTS_URI (the chart's ConfigMap, in every pod, plan included);
    neither set: a clear error from the plan step, which every other task waits for."""
    from vla_core import env_names
    from vla_core.experiments import cells
    from vla_core.utils import WmvlaError

    spec, k8s = compiled
    assert spec["root"]["inputDefinitions"]["parameters"]["results_uri"]["defaultValue"] == ""
    keys = {e["envVar"] for m in k8s["exec-plan-matrix"]["configMapAsEnv"] for e in m["keyToEnv"]}
    assert env_names.RESULTS_URI in keys
    # nothing starts before the plan: the dataset task waits for it, the rest wait for the dataset
    assert "plan-matrix" in spec["root"]["dag"]["tasks"]["prepare-dataset"]["dependentTasks"]

    monkeypatch.setenv(env_names.RESULTS_URI, "s3://install-bucket/wmvla/results/")
    assert cells.run_uri("", "r1") == "s3://install-bucket/wmvla/results/r1"
    assert cells.run_uri("s3://given/x", "r1") == "s3://given/x/r1"
    monkeypatch.delenv(env_names.RESULTS_URI)
    with pytest.raises(WmvlaError, match="results_uri=s3://bucket/prefix.*WMVLA_RESULTS_URI"):
        cells.run_uri("", "r1")
    with pytest.raises(WmvlaError, match="WMVLA_RESULTS_URI"):
        cells.prepare_dataset("metaworld", "", "/tmp/unused", tasks="drawer-close", episodes=1, image_size=64)


def test_plan_refuses_bad_gpu_counts_and_run_names():
    from vla_core.experiments import cells
    from vla_core.utils import WmvlaError

    assert cells.gpu_count("4") == 4 and cells.gpu_count(" 1 ") == 1 and cells.gpu_count("0") == 0
    for bad in ("two", "1.5", "-1", "", True):
        with pytest.raises(WmvlaError, match="gpus_per_cell"):
            cells.gpu_count(bad)
    # the KFP run's display name becomes one clean path segment; an explicit run_name must already be one
    assert cells.run_prefix("", "wmvla matrix 2026-12-04 10:00:01") == "wmvla-matrix-2026-12-04-10-00-01"
    assert cells.run_prefix("", "a/b c") == "a-b-c"
    assert cells.run_prefix("try-1", "ignored name") == "try-1"
    with pytest.raises(WmvlaError, match="one path segment.*'my-run'"):
        cells.run_prefix("my run", "")
    with pytest.raises(WmvlaError, match="run_name"):
        cells.run_prefix("", " / ")


def test_train_pods_are_sized_for_the_compiled_gpus_per_cell(compiled, tmp_path):
    """CPU, memory and /dev/shm of a train pod are MICROJOBS' one-GPU sizes times Platform.gpus_per_cell (fixed at
    compile time: the backend cannot compute a resource from a parameter nor size an emptyDir from one); the
    gpus_per_cell parameter defaults to that number and still sets the GPU limit; other microjobs stay as they are."""
    from components.platform import DEFAULT, MICROJOBS
    from pipelines.cli import CompileConfig, compile_pipeline, platform_for
    from vla_core.utils import WmvlaError

    one = MICROJOBS["train"].resources
    assert (one.cpu, one.memory, one.shm, one.scratch) == ("12", "96Gi", "32Gi", "150Gi")
    two = compile_pipeline(platform_for(CompileConfig(gpus_per_cell=2)), tmp_path / "m2.yaml")
    for n, (spec, k8s) in ((1, compiled), (2, yaml.safe_load_all(two.read_text()))):
        if n == 2:
            k8s = k8s["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        res = spec["deploymentSpec"]["executors"]["exec-train-cell"]["container"]["resources"]
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == \
            (str(12 * n), f"{96 * n}Gi", f"{96 * n}Gi"), n
        mounts = {m["mountPath"]: m for m in k8s["exec-train-cell"]["emptyDirMounts"]}
        assert mounts["/dev/shm"]["sizeLimit"] == f"{32 * n}Gi" and mounts["/tmp/wmvla"]["sizeLimit"] == "150Gi", n
        # the GPU limit is the run's parameter (a STRING), whose default is the compiled number
        assert res["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_cell']}}"
        gpus = spec["root"]["inputDefinitions"]["parameters"]["gpus_per_cell"]
        assert (gpus["defaultValue"], gpus["parameterType"]) == (str(n), "STRING"), n
        # the plan step gets the compiled number as a constant, to refuse a run asking for more
        plan = spec["root"]["dag"]["tasks"]["plan-matrix"]["inputs"]["parameters"]["compiled_gpus_per_cell"]
        assert plan == {"runtimeValue": {"constant": n}}, n
        # one GPU microjob that is not per cell keeps its one-GPU sizes
        latents = spec["deploymentSpec"]["executors"]["exec-cache-latents"]["container"]["resources"]
        assert latents["resourceCpuRequest"] == MICROJOBS["latents"].resources.cpu, n
    from pipelines.conformance import check

    assert check(two) == []
    assert DEFAULT.gpus_per_cell == 1
    with pytest.raises(WmvlaError, match="gpus_per_cell 0: expected a whole number >= 1.*--gpus-per-cell N"):
        platform_for(CompileConfig(gpus_per_cell=0))


def test_plan_refuses_more_gpus_than_the_pipeline_was_compiled_for():
    from components.platform import chart_key
    from vla_core.experiments import cells
    from vla_core.utils import WmvlaError

    assert cells.gpu_count("2", sized_for=2) == 2 and cells.gpu_count("1", sized_for=4) == 1  # fewer is fine
    assert cells.gpu_count("2", sized_for=2.0) == 2  # a pipeline constant may arrive as a double
    with pytest.raises(WmvlaError) as refused:
        cells.gpu_count("4", sized_for=2)
    message = str(refused.value)
    assert "sized (CPU, memory, /dev/shm) for at most 2 GPU(s)" in message
    assert "`wmvla pipeline compile --gpus-per-cell 4`" in message and f"{chart_key('gpus_per_cell')}: 4" in message


def test_plan_step_refuses_a_run_asking_for_more_gpus(tmp_path):
    """The plan component's code (what its pod runs) with the compiled number as its constant input: more GPUs
    than compiled fails there, before any GPU pod; as many or fewer plan the cells."""
    from components.plan import plan_matrix
    from vla_core.utils import WmvlaError

    args = dict(preset="demo", backbone="", world_encoder="", window=0, steps=0, batch_size=0, cells=["E0-mse"],
                seeds=[0], eval_env="", eval_suite="", eval_tasks="", episodes=1, workers=1, ablations=[],
                results_uri=str(tmp_path / "results"), run_name="r1", job_name="j", device="cpu",
                render_backend="egl", compiled_gpus_per_cell=2)
    assert [item["name"] for item in plan_matrix.python_func(gpus_per_cell="2", **args)] == ["E0-mse-seed0"]
    assert len(plan_matrix.python_func(gpus_per_cell="1", **args)) == 1
    with pytest.raises(WmvlaError, match="at most 2 GPU.*--gpus-per-cell 3"):
        plan_matrix.python_func(gpus_per_cell="3", **args)


def test_image_pull_secrets_from_the_values_are_compiled_in(tmp_path):
    from components.platform import Platform
    from pipelines.cli import compile_pipeline

    values = yaml.safe_load((ROOT / "charts" / "wmvla" / "examples" / "onprem-seaweedfs.yaml").read_text())
    platform = Platform.from_chart_values(values)
    assert platform.image_pull_secrets == ("harbor-pull",)
    _, k8s = yaml.safe_load_all(compile_pipeline(platform, tmp_path / "m.yaml").read_text())
    executors = k8s["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(GPU_EXECUTORS + CPU_EXECUTORS)
    for name, cfg in executors.items():
        assert [s["secretName"] for s in cfg["imagePullSecret"]] == ["harbor-pull"], name
    with pytest.raises(ValueError, match="pullSecrets"):
        Platform.from_chart_values({"images": {"pullSecrets": [""]}})


def test_cpu_only_compile_has_no_gpu_settings(tmp_path):
    """The CI smoke run's pipeline (scripts/kind_smoke.sh): no accelerator, GPU selector or toleration; small
    requests a CI runner's kind node can schedule."""
    from components.platform import CPU_ONLY_RESOURCES, DEFAULT
    from pipelines.cli import compile_pipeline

    spec, k8s = yaml.safe_load_all(compile_pipeline(DEFAULT.replace(cpu_only=True), tmp_path / "m.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    k8s = k8s["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in GPU_EXECUTORS + CPU_EXECUTORS:
        res = executors[name]["container"]["resources"]
        assert "accelerator" not in res and "nodeSelector" not in k8s[name] and "tolerations" not in k8s[name], name
        assert res["resourceCpuRequest"] == CPU_ONLY_RESOURCES.cpu and res["resourceMemoryLimit"] == \
            CPU_ONLY_RESOURCES.memory, name
    # two images to pull on a CI node: the eval image runs latents and training too (it has the train extra)
    assert {e["container"]["image"] for e in executors.values()} == {DEFAULT.image("cpu"), DEFAULT.image("eval")}


def test_apply_platform_refuses_a_number_gpu_parameter():
    """The platform's one place refuses a GPU count the driver would drop (a number parameter -> no GPU limit)."""
    from kfp import dsl

    from components.platform import DEFAULT, apply_platform

    @dsl.component(install_kfp_package=False, base_image="python:3.11")
    def work():
        pass

    def gpus_int(gpus=1):
        apply_platform(work(), DEFAULT, "train", gpus=gpus)

    gpus_int.__annotations__ = {"gpus": int}  # this module's `from __future__ import annotations` makes them text
    with pytest.raises(TypeError, match="str pipeline parameter"):
        dsl.pipeline(name="gpus-int")(gpus_int)
