"""The compiled pipeline (KFP IR YAML) checked against the rules of the open-source Kubeflow Pipelines backend.

kfp.local runs pipelines the backend refuses (it passes Python values between tasks as they are); the backend's
driver converts and checks every parameter at every DAG boundary, and reads pod settings from the executor
input in its own way. The rules below are read from the backend's source (github.com/kubeflow/pipelines, `backend/src/v2/driver/...`, the
same at tags 2.16.0, 2.16.1 and main 7b70c7b of 2026-08-21) and its CHANGELOG.md; each check cites the function
it mirrors.
A compiled pipeline that passes here is one whose parameters the backend can hand from task to task.

Reads plain YAML (no kfp import), so the same check runs on `wmvla pipeline compile`'s output, on the file a
user uploads, and before every local run (`wmvla pipeline run --local`, `wmvla demo`).

    python -m pipelines.conformance pipelines/matrix.yaml      # exit 1 and one line per violation
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vla_core.utils import WmvlaError

# The oldest open-source KFP backend this project's pipeline runs on (README.md, docs/pipeline.md state it;
# tests/test_conformance.py checks they agree). Why 2.16: FEATURES below.
MIN_BACKEND = (2, 16)

# Feature of the IR -> (the first backend version that runs it, why: the backend's CHANGELOG.md entry)
FEATURES: dict[str, tuple[tuple[int, int], str]] = {
    "image-pull-secrets": ((2, 1), "2.1.0: backend support for ImagePullSecrets (#10427)"),
    "empty-dir": ((2, 3), "2.3.0: backend support for EmptyDir volumes (#10913)"),
    "retry": ((2, 5), "2.5.0: execution-level retry fixed on the Argo backend (#11673)"),
    "name-parameters": ((2, 5), "2.5.0: input-parameter form of secret / config-map / PVC / pull-secret names "
                                "(secretNameParameter ...; #11621), which kfp-kubernetes 2.17 always writes"),
    "collected": ((2, 14), "2.14.0: dsl.Collected for parameters and artifacts (#11725)"),
    "env-optional": ((2, 15), "2.15.0: `optional` field of secret / config-map env entries (#12216); older "
                              "backends refuse the unknown field when the run is created"),
    "collected-named-loop": ((2, 16), "2.16.0: mismatched task name in a named ParallelFor fixed (#12808, "
                                      "issue #11964): Collected out of `ParallelFor(name=...)` fails before"),
}

STRING = "STRING"
_NUMBERS = {"NUMBER_INTEGER", "NUMBER_DOUBLE"}
_PLACEHOLDER = re.compile(r"^\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}$")
# a Kubernetes resource.Quantity (k8s.io/apimachinery/pkg/api/resource ParseQuantity), as written by hand
_QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkMGTPE]|n|u)?$")


@dataclass(frozen=True)
class Violation:
    where: str  # component / task / field
    rule: str  # the backend function or release the rule comes from
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message} [{self.rule}]"


def load_ir(source) -> tuple[dict, dict]:
    """(pipeline spec, platform spec or {}) from a path, YAML text, or the parsed documents."""
    import yaml

    if isinstance(source, (str, Path)) and not (isinstance(source, str) and "\n" in source):
        path = Path(source)
        if not path.is_file():
            raise WmvlaError(f"compiled pipeline {path}: no such file; expected the YAML `wmvla pipeline compile` "
                             f"writes")
        source = path.read_text()
    docs = list(yaml.safe_load_all(source)) if isinstance(source, str) else list(source)
    docs = [d for d in docs if d]
    if not docs or "root" not in docs[0] or "components" not in docs[0]:
        raise WmvlaError("compiled pipeline: expected a KFP pipeline spec (keys root, components, deploymentSpec) as "
                         "the first YAML document; found " + (f"keys {sorted(docs[0])}" if docs else "nothing"))
    platform = docs[1] if len(docs) > 1 else {}
    return docs[0], platform


def _value_type(value) -> str:
    """The parameter type a constant has for the driver (structpb kind)."""
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, (int, float)):
        return "NUMBER_DOUBLE"
    if isinstance(value, str):
        return STRING
    if isinstance(value, list):
        return "LIST"
    if isinstance(value, dict):
        return "STRUCT"
    return "NULL"


def _accepts(spec_type: str, value_type: str) -> bool:
    """resolve.go, resolveInputs -> handleParamTypeValidationAndConversion: a STRING input takes any value
    (converted to JSON text, metadata.PbValueToText); any other type takes only its own kind: a string value
    is refused ("type mismatch: expect STRUCT, got string"), numbers go to NUMBER_INTEGER or NUMBER_DOUBLE."""
    if spec_type == STRING:
        return True
    if spec_type in _NUMBERS:
        return value_type in _NUMBERS
    if spec_type == "STRUCT":
        return value_type in ("STRUCT", "TASK_FINAL_STATUS", "TASK_CONFIG")
    return spec_type == value_type


class _Checker:
    def __init__(self, spec: dict, platform: dict):
        self.spec = spec
        self.components = spec.get("components", {})
        self.executors = spec.get("deploymentSpec", {}).get("executors", {})
        self.k8s = ((platform.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec", {}).get(
            "executors", {})
        self.out: list[Violation] = []
        self.features: dict[str, str] = {}  # feature -> where first used
        # executor label -> for each task running it: input name -> the type of the value the pod receives
        self.pod_inputs: dict[str, list[tuple[str, dict]]] = {}

    def add(self, where: str, rule: str, message: str) -> None:
        self.out.append(Violation(where, rule, message))

    def use(self, feature: str, where: str) -> None:
        self.features.setdefault(feature, where)

    def param_defs(self, component: dict, kind: str) -> dict:
        return (component.get(kind) or {}).get("parameters") or {}

    # ------------------------------------------------------------------- parameters across DAG boundaries

    def source_type(self, parent: dict, tasks: dict, source: dict, where: str) -> str | None:
        """The declared type of what feeds one task input (None: not checkable statically, e.g. a selector)."""
        if "componentInputParameter" in source:
            name = source["componentInputParameter"]
            defs = self.param_defs(parent, "inputDefinitions")
            if name not in defs:
                self.add(where, "resolve.go resolveInputParameter",
                         f"reads the enclosing DAG's input {name!r}, which the DAG does not declare")
                return None
            return defs[name].get("parameterType")
        if "taskOutputParameter" in source:
            ref = source["taskOutputParameter"]
            producer = tasks.get(ref.get("producerTask"))
            if producer is None:
                self.add(where, "resolve.go resolveUpstreamParameters",
                         f"reads task {ref.get('producerTask')!r}, which is not in the same DAG")
                return None
            comp = self.components.get(producer["componentRef"]["name"], {})
            defs = self.param_defs(comp, "outputDefinitions")
            key = ref.get("outputParameterKey")
            if key not in defs:
                self.add(where, "resolve.go resolveUpstreamParameters",
                         f"reads output {key!r} of task {ref.get('producerTask')!r}, which declares no such output")
                return None
            return defs[key].get("parameterType")
        if "runtimeValue" in source:
            return _value_type((source["runtimeValue"] or {}).get("constant"))
        return None  # taskFinalStatus and the like: set by the backend itself

    def check_dag(self, name: str, component: dict) -> None:
        tasks = component["dag"].get("tasks") or {}
        for task_name, task in tasks.items():
            where = f"{name}/{task_name}"
            child = self.components.get(task["componentRef"]["name"])
            if child is None:
                self.add(where, "compiler", f"component {task['componentRef']['name']!r} is missing")
                continue
            child_inputs = self.param_defs(child, "inputDefinitions")
            iterator = task.get("parameterIterator")
            if iterator:
                self.check_loop(where, component, tasks, task, child, iterator)
            received: dict[str, str | None] = {}
            for param, source in ((task.get("inputs") or {}).get("parameters") or {}).items():
                if source.get("parameterExpressionSelector"):
                    received[param] = None  # a selector's result type is not declared in the IR
                    continue
                have = self.source_type(component, tasks, source, f"{where}.{param}")
                if param not in child_inputs:
                    # resolveInputs hands every task input to the pod, but converts only the declared ones (the
                    # SDK adds undeclared pipelinechannel-- inputs for placeholders in pod fields): as it comes
                    received[param] = have
                    continue
                want = child_inputs[param].get("parameterType")
                received[param] = want
                if have is not None and not _accepts(want, have):
                    self.add(f"{where}.{param}", "resolve.go handleParamTypeValidationAndConversion",
                             f"a {have} value is handed to an input declared {want}: the driver refuses it "
                             f"(\"type mismatch: expect {want}, got {have.lower()}\"); only a STRING input converts "
                             f"what it gets. Declare matching types (e.g. return List[dict] from a task whose "
                             f"list feeds a loop over dict items)")
            if child.get("executorLabel"):
                self.pod_inputs.setdefault(child["executorLabel"], []).append((where, received))
            if task.get("retryPolicy"):
                self.use("retry", where)
            self.check_dag_outputs(where, task, child)

    def check_loop(self, where: str, parent: dict, tasks: dict, task: dict, loop: dict, iterator: dict) -> None:
        """driver/dag.go + resolve.go (iteration driver) and util.go getItems: the items come from a LIST (or a
        STRING holding a JSON list); item i is put into the iteration DAG's `itemInput` and then converted and
        checked like any input, against the type the loop DAG declares for it."""
        item_name = iterator.get("itemInput")
        item_type = self.param_defs(loop, "inputDefinitions").get(item_name, {}).get("parameterType")
        items = iterator.get("items") or {}
        if "inputParameter" in items:
            source = ((task.get("inputs") or {}).get("parameters") or {}).get(items["inputParameter"])
            have = self.source_type(parent, tasks, source, where) if source else None
            if have is not None and have not in ("LIST", STRING):
                self.add(where, "util.go getItems", f"loops over a {have}; the driver iterates a LIST (or a STRING "
                                                    f"holding a JSON list)")
        elif "raw" in items:
            import json

            try:
                raw = json.loads(items["raw"])
            except ValueError:
                raw = None
            if not isinstance(raw, list):
                self.add(where, "util.go getItems", f"raw loop items {items['raw']!r} are not a JSON list")
            elif item_type:
                for value in raw:
                    if not _accepts(item_type, _value_type(value)):
                        self.add(where, "resolve.go handleParamTypeValidationAndConversion",
                                 f"loop item {value!r} is a {_value_type(value)}, the loop declares {item_type}")
                        break

    def check_dag_outputs(self, where: str, task: dict, child: dict) -> None:
        """dsl.Collected: a loop DAG's outputs gather every iteration's value (resolve.go
        resolveUpstreamParameters / resolveUpstreamArtifacts, CollectInputs): a parameter arrives as a LIST, an
        artifact as a list of artifacts."""
        if "dag" not in child:
            return
        outputs = child["dag"].get("outputs") or {}
        is_loop = bool(task.get("parameterIterator") or task.get("artifactIterator"))
        collected = [k for k, v in (outputs.get("parameters") or {}).items() if "valueFromParameter" in v]
        collected += list((outputs.get("artifacts") or {}))
        if not (is_loop and collected):
            return
        self.use("collected", where)
        name = (task.get("taskInfo") or {}).get("name")
        task_key = where.rsplit("/", 1)[-1]
        if name and name != task_key:
            self.use("collected-named-loop", where)
        defs = self.param_defs(child, "outputDefinitions")
        for key in (outputs.get("parameters") or {}):
            if key in defs and defs[key].get("parameterType") != "LIST":
                self.add(f"{where}.{key}", "resolve.go resolveUpstreamParameters",
                         f"a loop's collected output is a LIST, declared {defs[key].get('parameterType')}")

    def check_artifact_lists(self) -> None:
        """resolve.go resolveUpstreamArtifacts: a loop DAG's artifact output is a list; its consumer must declare
        a list input (Input[List[Artifact]]), and a list input must be fed by a loop."""
        for cname, comp in [("root", self.spec["root"]), *self.components.items()]:
            if "dag" not in comp:
                continue
            tasks = comp["dag"].get("tasks") or {}
            for task_name, task in tasks.items():
                child = self.components.get(task["componentRef"]["name"], {})
                want = (child.get("inputDefinitions") or {}).get("artifacts") or {}
                for art, source in ((task.get("inputs") or {}).get("artifacts") or {}).items():
                    ref = source.get("taskOutputArtifact")
                    if not ref or art not in want:
                        continue
                    producer = tasks.get(ref.get("producerTask"), {})
                    from_loop = bool(producer.get("parameterIterator") or producer.get("artifactIterator"))
                    is_list = bool(want[art].get("isArtifactList"))
                    if from_loop != is_list:
                        self.add(f"{cname}/{task_name}.{art}", "resolve.go resolveUpstreamArtifacts",
                                 "a loop's collected artifacts need an Input[List[...]] input" if from_loop else
                                 "an artifact list input is fed by a task that is not a loop")

    # ----------------------------------------------------------------------------------------- pod fields

    def check_executors(self) -> None:
        """driver.go initPodSpecPatch + getPodResource and resolve.go resolvePodSpecInputRuntimeParameter: the
        image, CPU / memory requests and limits and the accelerator type and count may be placeholders of a
        component input; the driver reads them with GetStringValue(), which gives "" for a number, a list or a
        struct: the limit is then silently not set (no GPU), or the quantity fails to parse. So a placeholder must
        name an input whose value reaches the pod as a STRING (a declared STRING input, which the driver converts
        to, or an undeclared one fed from a STRING); a constant must be a Kubernetes quantity."""
        for exec_name, executor in self.executors.items():
            container = executor.get("container") or {}
            resources = container.get("resources") or {}
            fields = {f: resources.get(f) for f in ("resourceCpuLimit", "resourceCpuRequest", "resourceMemoryLimit",
                                                    "resourceMemoryRequest")}
            accelerator = resources.get("accelerator") or {}
            fields["accelerator.resourceType"] = accelerator.get("resourceType")
            fields["accelerator.resourceCount"] = accelerator.get("resourceCount")
            fields["image"] = container.get("image")
            for field, value in fields.items():
                if not isinstance(value, str) or not value:
                    continue
                where = f"{exec_name}.{field}"
                match = _PLACEHOLDER.match(value)
                if match:
                    for task_where, received in self.pod_inputs.get(exec_name, []):
                        if match.group(1) not in received:
                            self.add(f"{task_where} -> {where}", "resolve.go resolvePodSpecInputRuntimeParameter",
                                     f"{value}: the task passes no such input (\"executorInput did not contain\" it)")
                        elif received[match.group(1)] not in (STRING, None):
                            self.add(f"{task_where} -> {where}",
                                     "resolve.go resolvePodSpecInputRuntimeParameter (GetStringValue)",
                                     f"{value} reaches the pod as a {received[match.group(1)]}: the driver reads it as "
                                     f"\"\" and the field is not set (a GPU limit: no GPU). Feed it from a STRING "
                                     f"parameter, or compile a constant")
                elif "{{" in value:
                    self.add(where, "resolve.go isInputParameterChannel",
                             f"{value!r}: only a whole `{{{{$.inputs.parameters['NAME']}}}}` is resolved")
                elif field not in ("image", "accelerator.resourceType") and not _QUANTITY.match(value):
                    self.add(where, "driver.go getPodResource (k8sres.ParseQuantity)",
                             f"{value!r} is not a Kubernetes quantity")

    # -------------------------------------------------------------------------------- platform features

    def check_platform(self) -> None:
        for exec_name, cfg in self.k8s.items():
            for key in ("secretAsEnv", "configMapAsEnv"):
                if any("optional" in entry for entry in cfg.get(key) or []):
                    self.use("env-optional", f"{exec_name}.{key}")
            for key in ("secretAsEnv", "configMapAsEnv", "pvcMount", "imagePullSecret", "secretAsVolume",
                        "configMapAsVolume"):
                if any(isinstance(e, dict) and any(k.endswith("NameParameter") for k in e) for e in cfg.get(key) or []):
                    self.use("name-parameters", f"{exec_name}.{key}")
            if cfg.get("imagePullSecret"):
                self.use("image-pull-secrets", exec_name)
            if cfg.get("emptyDirMounts"):
                self.use("empty-dir", exec_name)

    def check_versions(self, min_backend: tuple[int, int]) -> None:
        for feature, where in sorted(self.features.items()):
            need, why = FEATURES[feature]
            if need > min_backend:
                self.add(where, f"CHANGELOG {why.split(':')[0]}",
                         f"uses {feature}, which needs backend >= {need[0]}.{need[1]} ({why}); the stated minimum "
                         f"is {min_backend[0]}.{min_backend[1]}")

    def run(self, min_backend: tuple[int, int]) -> list[Violation]:
        root = self.spec["root"]
        if "dag" in root:
            self.check_dag("root", root)
        for name, comp in self.components.items():
            if "dag" in comp:
                self.check_dag(name, comp)
        self.check_artifact_lists()
        self.check_executors()
        self.check_platform()
        self.check_versions(min_backend)
        return self.out


def check(source, min_backend: tuple[int, int] = MIN_BACKEND) -> list[Violation]:
    """Every rule the backend would break on (empty list: none). `source`: a path, YAML text or parsed docs."""
    spec, platform = load_ir(source)
    return _Checker(spec, platform).run(min_backend)


def features_used(source) -> dict[str, str]:
    """feature -> where it is first used (the features of FEATURES found in the IR)."""
    spec, platform = load_ir(source)
    checker = _Checker(spec, platform)
    checker.run((99, 0))
    return dict(checker.features)


def require_conformant(source, what: str = "compiled pipeline", min_backend: tuple[int, int] = MIN_BACKEND) -> None:
    """Raise a WmvlaError naming every violation (before anything runs)."""
    violations = check(source, min_backend)
    if violations:
        lines = "\n  ".join(str(v) for v in violations)
        raise WmvlaError(f"{what}: the Kubeflow Pipelines backend (>= {min_backend[0]}.{min_backend[1]}) would refuse "
                         f"or mis-run it ({len(violations)} problem(s); rules: pipelines/conformance.py):\n  {lines}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = args or [str(Path(__file__).resolve().parent / "matrix.yaml")]
    bad = 0
    for path in paths:
        violations = check(path)
        for v in violations:
            print(f"{path}: {v}", file=sys.stderr)
        bad += len(violations)
        if not violations:
            print(f"{path}: conforms to the KFP backend's rules (>= {MIN_BACKEND[0]}.{MIN_BACKEND[1]})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
