"""pipelines/conformance.py: the compiled pipeline checked by the open-source KFP backend's rules. The committed
YAML and compiles with the chart's example values pass; small pipelines compiled here that break each rule are
caught (where kfp's own compiler already refuses a pattern, the compiled IR is edited the way that pattern would
look, since a hand-written or other-SDK YAML can still carry it)."""

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "matrix.yaml"


def _compile(pipeline, tmp_path) -> list[dict]:
    from kfp import compiler

    out = tmp_path / f"{pipeline.name}.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    return [d for d in yaml.safe_load_all(out.read_text()) if d]


def _rules(violations) -> list[str]:
    return [v.rule for v in violations]


def test_committed_pipeline_conforms_and_needs_the_stated_backend():
    from pipelines.conformance import FEATURES, MIN_BACKEND, check, features_used

    assert check(COMMITTED) == []
    used = features_used(COMMITTED)
    # what makes 2.16 the minimum: Collected out of the named `cells` / `shards` loops, optional env entries
    assert {"collected", "collected-named-loop", "env-optional", "retry", "empty-dir", "name-parameters"} <= set(used)
    assert max(FEATURES[f][0] for f in used) == MIN_BACKEND
    # one number, stated where users read it
    stated = f"{MIN_BACKEND[0]}.{MIN_BACKEND[1]}"
    for doc in ("README.md", "docs/pipeline.md"):
        text = (ROOT / doc).read_text()
        assert re.search(rf"Kubeflow Pipelines[^.\n]*>= {re.escape(stated)}", text), f"{doc} must state >= {stated}"
    # a backend older than a feature the pipeline uses is named, with the release that added it
    old = check(COMMITTED, min_backend=(2, 14))
    assert {"CHANGELOG 2.15.0", "CHANGELOG 2.16.0"} <= set(_rules(old)), old


@pytest.mark.parametrize("values", sorted((ROOT / "charts" / "wmvla" / "examples").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_compile_with_chart_values_conforms(values, tmp_path):
    from pipelines.cli import CompileConfig, compile_pipeline, platform_for
    from pipelines.conformance import check

    out = compile_pipeline(platform_for(CompileConfig(values=values)), tmp_path / "m.yaml")
    assert check(out) == []
    out = compile_pipeline(platform_for(CompileConfig(values=values, cpu_only=True)), tmp_path / "cpu.yaml")
    assert check(out) == []


def test_checker_does_not_import_kfp():
    code = "import sys, pipelines.conformance as c; c.check(sys.argv[1]); assert 'kfp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code, str(COMMITTED)], check=True, cwd=ROOT)


def test_loop_over_a_bare_list_into_a_dict_input_is_caught(tmp_path):
    """The bug the first compile had: a `list` return gives STRING loop items; the driver turns the item into
    JSON text for the loop DAG and then refuses it for the task's STRUCT input. kfp.local runs it."""
    from kfp import dsl

    from pipelines.conformance import check

    @dsl.component(install_kfp_package=False)
    def plan() -> list:
        return [{"a": 1}]

    @dsl.component(install_kfp_package=False)
    def use(item: dict):
        print(item)

    @dsl.pipeline(name="bare-list")
    def bare():
        p = plan()
        with dsl.ParallelFor(p.output) as item:
            use(item=item)

    (v,) = check(_compile(bare, tmp_path))
    assert v.rule == "resolve.go handleParamTypeValidationAndConversion" and "expect STRUCT, got string" in v.message

    @dsl.component(install_kfp_package=False)
    def plan_typed() -> List[dict]:
        return [{"a": 1}]

    @dsl.pipeline(name="typed-list")
    def typed():
        p = plan_typed()
        with dsl.ParallelFor(p.output) as item:
            use(item=item)

    assert check(_compile(typed, tmp_path)) == []


def test_string_into_a_typed_input_is_caught_and_anything_into_a_string_passes(tmp_path):
    """kfp's compiler refuses a str argument for an int input, so the IR is edited as another tool could write
    it: the driver converts anything to a STRING input, nothing from STRING to another type."""
    from kfp import dsl

    from pipelines.conformance import check

    @dsl.component(install_kfp_package=False)
    def take(n: int, text: str):
        print(n, text)

    @dsl.pipeline(name="types")
    def types(count: int = 1, name: str = "x"):
        take(n=count, text=name)

    docs = _compile(types, tmp_path)
    assert check(docs) == []
    bad = copy.deepcopy(docs)
    bad[0]["root"]["inputDefinitions"]["parameters"]["count"]["parameterType"] = "STRING"
    (v,) = check(bad)
    assert "root/take.n" in v.where and "expect NUMBER_INTEGER, got string" in v.message
    fine = copy.deepcopy(docs)  # a number into a STRING input: converted to its text
    fine[0]["root"]["inputDefinitions"]["parameters"]["name"]["parameterType"] = "NUMBER_INTEGER"
    assert check(fine) == []


def test_gpu_count_from_an_integer_parameter_is_caught(tmp_path):
    """The train pod's silent missing GPU: an int parameter as the accelerator count reaches the driver's
    GetStringValue() as a number -> "" -> no nvidia.com/gpu limit. A str parameter resolves."""
    from kfp import dsl

    from pipelines.conformance import check

    @dsl.component(install_kfp_package=False)
    def work():
        pass

    @dsl.pipeline(name="gpu-int")
    def gpu_int(gpus: int = 1):
        work().set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    (v,) = check(_compile(gpu_int, tmp_path))
    assert v.rule.endswith("(GetStringValue)") and "accelerator.resourceCount" in v.where
    assert "NUMBER_INTEGER" in v.message

    @dsl.pipeline(name="gpu-str")
    def gpu_str(gpus: str = "1"):
        work().set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    assert check(_compile(gpu_str, tmp_path)) == []

    @dsl.component(install_kfp_package=False)
    def work_n(n: int):
        print(n)

    # the same rule inside a loop DAG: the count crosses the loop boundary as what the pipeline declared
    @dsl.pipeline(name="gpu-loop")
    def gpu_loop(gpus: int = 1):
        with dsl.ParallelFor([1, 2]):
            work_n(n=gpus).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    assert any(r.endswith("(GetStringValue)") for r in _rules(check(_compile(gpu_loop, tmp_path))))

    # kfp 2.17 does not hand a parameter used only in a pod field of a task in a loop to the loop's DAG: the
    # loop reads an input nobody passes, which the backend cannot resolve
    @dsl.pipeline(name="gpu-loop-unwired")
    def gpu_loop_unwired(gpus: str = "1"):
        with dsl.ParallelFor([1, 2]):
            work().set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    (v,) = check(_compile(gpu_loop_unwired, tmp_path))
    assert v.rule == "resolve.go resolveInputParameter" and "pipelinechannel--gpus" in v.message

    docs = _compile(gpu_str, tmp_path)
    res = docs[0]["deploymentSpec"]["executors"]["exec-work"]["container"]["resources"]
    res["resourceMemoryLimit"] = "lots"  # kfp validates this itself; a hand-edited file may not
    res["accelerator"]["resourceCount"] = "{{$.inputs.parameters['nope']}}"
    rules = _rules(check(docs))
    assert "driver.go getPodResource (k8sres.ParseQuantity)" in rules
    assert "resolve.go resolvePodSpecInputRuntimeParameter" in rules


def test_collected_lists_and_features_by_version(tmp_path):
    """dsl.Collected: a LIST of parameters / a list of artifacts (an artifact consumer must declare a list);
    Collected needs 2.14, out of a named loop 2.16; kfp-kubernetes `optional` env entries 2.15."""
    from kfp import dsl, kubernetes
    from kfp.dsl import Artifact, Input, Output

    from pipelines.conformance import check, features_used

    @dsl.component(install_kfp_package=False)
    def one(i: int, out: Output[Artifact]) -> dict:
        return {"i": i}

    @dsl.component(install_kfp_package=False)
    def gather(values: list, arts: Input[List[Artifact]]):
        print(values, arts)

    @dsl.pipeline(name="collect")
    def collect():
        with dsl.ParallelFor([1, 2], name="items") as i:
            t = one(i=i)
            kubernetes.use_secret_as_env(t, "s", {"K": "K"}, optional=True)
        gather(values=dsl.Collected(t.outputs["Output"]), arts=dsl.Collected(t.outputs["out"]))

    docs = _compile(collect, tmp_path)
    assert check(docs) == []
    assert {"collected", "collected-named-loop", "env-optional"} <= set(features_used(docs))
    assert set(_rules(check(docs, min_backend=(2, 14)))) == {"CHANGELOG 2.15.0", "CHANGELOG 2.16.0"}
    assert set(_rules(check(docs, min_backend=(2, 5)))) == {"CHANGELOG 2.14.0", "CHANGELOG 2.15.0", "CHANGELOG 2.16.0"}

    bad = copy.deepcopy(docs)
    bad[0]["components"]["comp-gather"]["inputDefinitions"]["artifacts"]["arts"].pop("isArtifactList")
    assert _rules(check(bad)) == ["resolve.go resolveUpstreamArtifacts"]
    bad = copy.deepcopy(docs)  # a collected parameter declared as anything but a LIST
    loop = next(c for n, c in bad[0]["components"].items() if n.startswith("comp-for-loop"))
    for p in loop["outputDefinitions"]["parameters"].values():
        p["parameterType"] = "STRUCT"
    assert "resolve.go resolveUpstreamParameters" in _rules(check(bad))


def test_local_runs_refuse_what_the_backend_refuses(tmp_path):
    """`wmvla pipeline run --local` and `wmvla demo` run a compiled YAML and check it first: the bare-list loop
    that kfp.local alone would run is refused before any task starts."""
    from kfp import dsl

    from pipelines.cli import run_local
    from vla_core.utils import WmvlaError

    @dsl.component(install_kfp_package=False)
    def plan() -> list:
        return [{"a": 1}]

    @dsl.component(install_kfp_package=False)
    def use(item: dict):
        print(item)

    @dsl.pipeline(name="refused")
    def refused():
        with dsl.ParallelFor(plan().output) as item:
            use(item=item)

    from kfp import compiler

    package = tmp_path / "refused.yaml"
    compiler.Compiler().compile(refused, str(package))
    with pytest.raises(WmvlaError, match="expect STRUCT, got string"):
        run_local({}, tmp_path / "kfp", package)
    assert not (tmp_path / "kfp").exists()  # nothing ran


def test_cli_check_and_compile_refuse(tmp_path, capsys):
    from vla_core.cli import main

    assert main(["pipeline", "check", str(COMMITTED)]) == 0
    docs = list(yaml.safe_load_all(COMMITTED.read_text()))
    docs[0]["components"]["comp-for-loop-1"]["inputDefinitions"]["parameters"][
        "pipelinechannel--plan-matrix-Output-loop-item"]["parameterType"] = "STRING"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    assert main(["pipeline", "check", str(bad)]) == 1
    assert "expect STRUCT, got string" in capsys.readouterr().err
