"""The one place that says where each microjob runs: image, node pool, GPUs, CPU/memory, secrets,
volumes and labels; and the names it shares with the Helm chart (charts/wmvla).

`Platform()` holds the defaults; the chart's values.yaml carries the same defaults and
tests/test_chart.py renders the chart and checks every shared name against this class.
`Platform.from_chart_values(values)` maps a values file an admin installed the chart with onto these
fields, so `wmvla pipeline compile --values my-values.yaml` compiles a pipeline that matches that install.
Image references are set at compile time (registry, tag); the images themselves are the targets of
images/Dockerfile (one per kind in IMAGE_KINDS). `python -m components.platform images --registry R --tag T`
prints them for the build script and the CI workflow, so no other file spells an image name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import vla_core
from vla_core import env_names


@dataclass(frozen=True)
class Resources:
    """What one microjob's pod asks for. cpu/memory are requests (limits for memory), gpus a limit."""

    cpu: str
    memory: str
    gpus: int = 0
    shm: str = ""  # a memory-backed /dev/shm of this size ("" = none): DataLoader workers, env workers
    # the work folder (WORKDIR) on an emptyDir of at most this size rather than the container layer: what a
    # pod downloads and writes there is bounded by the volume's sizeLimit (kfp-kubernetes 2.17 cannot set an
    # ephemeral-storage request; the limit names the volume when the kubelet evicts a pod past it)
    scratch: str = "20Gi"

    def times(self, n: int) -> "Resources":
        """These requests for n GPUs' worth of work (CPU, memory, /dev/shm x n): a train pod with n GPUs runs n
        ranks, each with its own DataLoader workers and batches in shared memory. Scratch stays: a pod keeps one
        copy of the dataset and of its checkpoints whatever its GPU count."""
        return dataclasses.replace(self, cpu=_times(self.cpu, n), memory=_times(self.memory, n),
                                   shm=_times(self.shm, n) if self.shm else "")


def _times(quantity: str, n: int) -> str:
    """A whole-number Kubernetes quantity ("12", "96Gi", "500m") times n, in the same unit."""
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    if not match:
        raise ValueError(f"resource quantity {quantity!r}: expected a whole number with an optional unit "
                         f"(\"12\", \"96Gi\", \"500m\") to scale per GPU")
    return f"{int(match[1]) * n}{match[2]}"


# the user and group every image runs as (images/Dockerfile USER) and the chart's pods run as (the model-cache
# fill Job leaves HF_HOME owned by it, and the GPU pods write there): tests/test_chart.py checks all three agree
IMAGE_UID = 10001
# the pipeline's default work folder (pipelines/matrix.py `workdir`), mounted as an emptyDir in every pod
WORKDIR = "/tmp/wmvla"
# Istio (Kubeflow profile namespaces inject sidecars): a task pod with a sidecar does not complete while the
# proxy runs, and under STRICT mTLS a sidecar-less Pushgateway is the only thing both can reach
ISTIO_INJECT_LABEL = "sidecar.istio.io/inject"

# the kinds of microjob image = the build targets of images/Dockerfile (tests/test_images.py checks both agree)
IMAGE_KINDS = ("cpu", "train", "eval")


@dataclass(frozen=True)
class Platform:
    # images: <registry>/<name>:<tag>, one per kind of microjob (a target of images/Dockerfile)
    registry: str = "ghcr.io/wmvla"
    tag: str = vla_core.__version__
    image_cpu: str = "wmvla-cpu"
    image_train: str = "wmvla-train"
    image_eval: str = "wmvla-eval"

    # identity and names shared with the chart
    service_account: str = "wmvla-pipeline"
    store_secret: str = "wmvla-object-store"  # keys: env_names.AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    store_config: str = "wmvla-object-store"  # ConfigMap: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, WMVLA_RESULTS_URI
    hf_secret: str = "wmvla-hf-token"  # key: env_names.HF_TOKEN
    model_cache_pvc: str = "wmvla-model-cache"
    model_cache_mount: str = "/models"  # HF_HOME inside GPU pods
    metrics_config: str = "wmvla-metrics"  # ConfigMap: WMVLA_PUSHGATEWAY_URL, WMVLA_METRICS_PORT
    metrics_port: int = 9400
    part_of_label: str = "app.kubernetes.io/part-of"  # = "wmvla" on every pod (the PodMonitor selects it)
    part_of_value: str = "wmvla"
    microjob_label: str = "wmvla.io/microjob"
    eval_priority_class: str = "wmvla-eval"

    # the GPU node pool
    gpu_node_label: str = "nvidia.com/gpu.product"
    gpu_node_value: str = "NVIDIA-L40S"
    gpu_resource: str = "nvidia.com/gpu"
    gpu_toleration_key: str = "nvidia.com/gpu"
    gpu_toleration_effect: str = "NoSchedule"  # "" = every effect of the key
    # the GPUs per train pod this install's pipeline is sized for: the train microjob's CPU, memory and /dev/shm
    # are MICROJOBS' one-GPU sizes times this, and it is the gpus_per_cell parameter's default. A compile-time
    # setting because the KFP backend takes a resource from a parameter only verbatim (no arithmetic) and an
    # emptyDir size never; a run asking for more GPUs than this is refused by the plan step (fewer is fine).
    gpus_per_cell: int = 1

    # image pull secrets of the namespace (chart: images.pullSecrets), compiled into every task: a run submitted
    # with another service account than the chart's (which carries them too) still pulls from a private registry
    image_pull_secrets: tuple[str, ...] = ()
    # no GPU pool (CI on kind, scripts/kind_smoke.sh): GPU microjobs get no accelerator, selector or toleration,
    # and every microjob asks for CPU_ONLY_RESOURCES (a CI runner has a few cores, not a GPU node's)
    cpu_only: bool = False

    # env names the pods get (defined in vla_core; listed here so the chart test can check its keys)
    secret_env: tuple[str, ...] = (env_names.AWS_ACCESS_KEY_ID, env_names.AWS_SECRET_ACCESS_KEY)
    hf_env: str = env_names.HF_TOKEN

    def __post_init__(self):
        n = self.gpus_per_cell
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"gpus_per_cell {n!r}: expected a whole number >= 1 of GPUs per train pod "
                             f"(`wmvla pipeline compile --gpus-per-cell N`, chart values {chart_key('gpus_per_cell')})")

    def image(self, kind: str) -> str:
        names = {"cpu": self.image_cpu, "train": self.image_train, "eval": self.image_eval}
        if kind not in names:
            raise ValueError(f"unknown image kind {kind!r}; expected one of {list(IMAGE_KINDS)}")
        return f"{self.registry}/{names[kind]}:{self.tag}"

    def replace(self, **changes) -> "Platform":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_chart_values(cls, values: dict) -> "Platform":
        """The Platform that matches an install of charts/wmvla with `values` (the values file the admin
        installed with, or all of `helm get values RELEASE --all -o yaml`). A setting the file does not give
        keeps the chart's default, which is this class's default (tests/test_chart.py checks both agree).
        Two names can be "": store_secret under workload identity (objectStore.credentials.source:
        workloadIdentity, no static keys: pods get credentials from the service account) and hf_secret with
        huggingface.token.source: none (public models only); the pods then get no such secret."""
        if not isinstance(values, dict):
            raise TypeError(f"chart values: expected a mapping (a parsed values.yaml), found {type(values).__name__}")
        changes = {name: value for name, path, kind in _CHART_FIELDS
                   if (value := _chart_value(values, path, kind)) is not None}
        source = _chart_value(values, "objectStore.credentials.source", str)
        if source == "workloadIdentity":
            changes["store_secret"] = ""
        hf_source = _chart_value(values, "huggingface.token.source", str)
        if hf_source == "none":
            changes["hf_secret"] = ""
        pull = _chart_value(values, "images.pullSecrets", list)
        if pull is not None:
            if not all(isinstance(name, str) and name for name in pull):
                raise ValueError(f"chart values: images.pullSecrets should be a list of secret names, found {pull!r}")
            changes["image_pull_secrets"] = tuple(pull)
        return cls(**changes)


DEFAULT = Platform()

# Platform field <- dotted path in charts/wmvla/values.yaml, and the type the value must have there.
_CHART_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("registry", "images.registry", str),
    ("tag", "images.tag", str),
    ("image_cpu", "images.cpu", str),
    ("image_train", "images.train", str),
    ("image_eval", "images.eval", str),
    ("service_account", "serviceAccount.name", str),
    ("store_secret", "objectStore.credentials.secretName", str),
    ("store_config", "objectStore.configMapName", str),
    ("hf_secret", "huggingface.token.secretName", str),
    ("model_cache_pvc", "modelCache.claimName", str),
    ("model_cache_mount", "modelCache.mountPath", str),
    ("metrics_config", "metrics.configMapName", str),
    ("metrics_port", "metrics.port", int),
    ("part_of_label", "partOf.label", str),
    ("part_of_value", "partOf.value", str),
    ("microjob_label", "microjobLabel", str),
    ("eval_priority_class", "priorityClass.name", str),
    ("gpu_node_label", "gpuPool.nodeLabel", str),
    ("gpu_node_value", "gpuPool.nodeValue", str),
    ("gpu_resource", "gpuPool.resource", str),
    ("gpu_toleration_key", "gpuPool.tolerationKey", str),
    ("gpu_toleration_effect", "gpuPool.tolerationEffect", str),
    ("gpus_per_cell", "gpuPool.gpusPerCell", int),
)


def chart_key(field_name: str) -> str:
    """The values.yaml path of a Platform field (for messages that name the fix)."""
    return next(path for name, path, _ in _CHART_FIELDS if name == field_name)


def _chart_value(values: dict, path: str, kind: type):
    """values[a][b]... for path "a.b", None when a level is absent or null; a clear error on a wrong type."""
    node = values
    keys = path.split(".")
    for depth, key in enumerate(keys):
        if node is None:
            return None
        if not isinstance(node, dict):
            where = ".".join(keys[:depth])
            raise ValueError(f"chart values: {where} should be a mapping, found {type(node).__name__} {node!r}")
        node = node.get(key)
    if node is None:
        return None
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        hint = " (quote it in YAML: \"0.1\" is a string, 0.1 a number)" if kind is str else ""
        raise ValueError(f"chart values: {path} should be a {kind.__name__}, found {type(node).__name__} "
                         f"{node!r}{hint}")
    return node


@dataclass(frozen=True)
class Microjob:
    image: str  # a kind of IMAGE_KINDS
    resources: Resources
    model_cache: bool = False  # mounts the chart's model-cache volume as HF_HOME (and gets the HF token)
    per_cell_gpus: bool = False  # runs on Platform.gpus_per_cell GPUs: its resources are per GPU (Resources.times)


# What each microjob of pipelines/matrix.py asks for. GPU jobs are sized for one GPU of an L40S node
# (typically 4 GPUs, 48-64 cores, 512 GiB): LIBERO's evaluation runs ~16 env worker processes (CPU physics +
# EGL render) beside the policy, so it gets 16 cores; training gets DataLoader workers and a large /dev/shm
# (worker batches travel through shared memory). CPU jobs stay off the GPU pool (no selector, no toleration).
MICROJOBS: dict[str, Microjob] = {
    "plan": Microjob("cpu", Resources(cpu="500m", memory="1Gi")),
    # checks the results store, the dataset and the model cache with a pod's own environment before any GPU pod
    "preflight": Microjob("cpu", Resources(cpu="250m", memory="1Gi", scratch="1Gi"), model_cache=True),
    "dataset": Microjob("eval", Resources(cpu="4", memory="16Gi", shm="2Gi")),  # MetaWorld experts render
    "latents": Microjob("train", Resources(cpu="8", memory="64Gi", gpus=1, shm="16Gi", scratch="100Gi"), model_cache=True),
    # per GPU: a train pod gets Platform.gpus_per_cell times this (its GPU limit is the run's gpus_per_cell)
    "train": Microjob("train", Resources(cpu="12", memory="96Gi", gpus=1, shm="32Gi", scratch="150Gi"), model_cache=True,
                      per_cell_gpus=True),
    "evaluate": Microjob("eval", Resources(cpu="16", memory="64Gi", gpus=1, shm="8Gi", scratch="100Gi"), model_cache=True),
    "report": Microjob("cpu", Resources(cpu="1", memory="4Gi")),
    # evaluation shards: plan (needs LIBERO's task lists: eval image, CPU pool) and merge (records only)
    "plan-shards": Microjob("eval", Resources(cpu="500m", memory="2Gi")),
    "merge": Microjob("cpu", Resources(cpu="1", memory="4Gi")),
}
# what every microjob asks for when compiled with Platform.cpu_only (tiny preset on a CI runner's kind node)
CPU_ONLY_RESOURCES = Resources(cpu="100m", memory="3Gi", shm="1Gi")


def apply_platform(task, platform: Platform, microjob: str, gpus=None):
    """Image, pool, resources, secrets, volumes and labels of one pipeline task (kfp-kubernetes). `gpus`
    overrides the microjob's GPU count: an int, or a STRING pipeline parameter (the KFP driver reads a resource
    placeholder with GetStringValue(): a number parameter would give "" and no GPU limit; pipelines/conformance.py
    checks it). Returns the task."""
    from kfp import kubernetes  # lazily: this module is also read before kfp is installed (image builds)

    job = MICROJOBS[microjob]
    r = job.resources.times(platform.gpus_per_cell) if job.per_cell_gpus else job.resources
    image = job.image
    if platform.cpu_only:
        r = dataclasses.replace(CPU_ONLY_RESOURCES, shm=CPU_ONLY_RESOURCES.shm if r.shm else "")
        # the eval image holds everything the train image does (extras train,sim): a CI node pulls two images
        image = "eval" if image == "train" else image
    task.set_container_image(platform.image(image))
    if platform.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(platform.image_pull_secrets))
    task.set_cpu_request(r.cpu).set_memory_request(r.memory).set_memory_limit(r.memory)
    task.set_env_variable(env_names.MICROJOB, microjob)
    kubernetes.add_pod_label(task, platform.part_of_label, platform.part_of_value)
    kubernetes.add_pod_label(task, platform.microjob_label, microjob)
    kubernetes.add_pod_label(task, ISTIO_INJECT_LABEL, "false")
    # the object store: credentials from the Secret, endpoint / region / results URI from the ConfigMap
    if platform.store_secret:  # "" under workload identity: credentials come with the service account
        kubernetes.use_secret_as_env(task, platform.store_secret, {k: k for k in platform.secret_env})
    kubernetes.use_config_map_as_env(task, platform.store_config, {
        env_names.AWS_REGION: env_names.AWS_REGION, env_names.RESULTS_URI: env_names.RESULTS_URI})
    # absent on AWS S3 itself (the chart writes it only when an endpoint is set)
    kubernetes.use_config_map_as_env(task, platform.store_config,
                                     {env_names.AWS_ENDPOINT_URL: env_names.AWS_ENDPOINT_URL}, optional=True)
    kubernetes.use_config_map_as_env(task, platform.metrics_config, {
        env_names.PUSHGATEWAY_URL: env_names.PUSHGATEWAY_URL, env_names.METRICS_PORT: env_names.METRICS_PORT})
    if r.shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=r.shm)
    kubernetes.empty_dir_mount(task, volume_name="work", mount_path=WORKDIR, size_limit=r.scratch)
    if r.gpus:  # (never under cpu_only: CPU_ONLY_RESOURCES has none)
        if gpus is not None and not isinstance(gpus, int) and getattr(gpus, "channel_type", "String") != "String":
            raise TypeError(f"apply_platform({microjob!r}): the GPU count parameter must be a str pipeline parameter "
                            f"(the KFP driver resolves resource placeholders as strings), found {gpus.channel_type}")
        task.set_accelerator_type(platform.gpu_resource).set_accelerator_limit(gpus if gpus is not None else r.gpus)
        kubernetes.add_node_selector(task, platform.gpu_node_label, platform.gpu_node_value)
        kubernetes.add_toleration(task, key=platform.gpu_toleration_key, operator="Exists",
                                  effect=platform.gpu_toleration_effect or None)
    if job.model_cache:
        if platform.hf_secret:  # "" = public models only
            kubernetes.use_secret_as_env(task, platform.hf_secret, {platform.hf_env: platform.hf_env}, optional=True)
        kubernetes.mount_pvc(task, platform.model_cache_pvc, platform.model_cache_mount)
        task.set_env_variable(env_names.HF_HOME, platform.model_cache_mount)
    return task


def main(argv: list[str] | None = None) -> int:
    """`python -m components.platform images [--registry R] [--tag T]`: one `KIND REFERENCE` line per image.
    Stdlib only (runs before anything is installed, e.g. in CI before the images exist)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m components.platform")
    sub = parser.add_subparsers(dest="command", required=True)
    images = sub.add_parser("images", help="print `KIND REFERENCE` for every microjob image")
    images.add_argument("--registry", default=DEFAULT.registry, help=f"default {DEFAULT.registry}")
    images.add_argument("--tag", default=DEFAULT.tag, help=f"default {DEFAULT.tag} (CI: the commit SHA)")
    args = parser.parse_args(argv)
    platform = DEFAULT.replace(registry=args.registry.rstrip("/"), tag=args.tag)
    for kind in IMAGE_KINDS:
        print(kind, platform.image(kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
