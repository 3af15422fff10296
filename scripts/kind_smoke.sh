#!/usr/bin/env bash
# The pipeline on a real Kubeflow Pipelines backend, end to end, for CI (.github/workflows/images-and-pipeline.yml,
# job kind-smoke): a kind cluster, KFP standalone (pinned, >= the minimum README.md states), the wmvla chart with
# an S3 server (SeaweedFS) in the cluster, the pipeline compiled for a CPU-only pool from the chart's values,
# the smoke run (tiny MetaWorld policy, one cell, one shard) submitted through the SDK with the chart's service
# account in the chart's namespace, waited for, and the run pulled from the bucket and checked.
#
#   scripts/kind_smoke.sh --registry ghcr.io/my-org --tag "$GITHUB_SHA"    # images already pushed there
#   scripts/kind_smoke.sh --dry-run                                         # print the steps, run nothing
#
# Needs docker, kind, kubectl, helm and a Python with wmvla[pipeline] installed (`wmvla` on PATH). Options:
#   --registry R --tag T   the microjob images (default: components/platform.py's); private registry: set
#                          REGISTRY_USERNAME / REGISTRY_PASSWORD, a pull secret goes into the chart's values
#   --work DIR             where the values file, compiled pipeline and pulled run go (default: a temp folder)
#   --keep                 leave the cluster running at the end (default: deleted)
#   --dry-run              print every command instead of running it (files are still written to --work)
# Not run in this repository's own test environment (no Docker there): tests/test_kind_smoke.py dry-runs it,
# checks what it writes and lints it with shellcheck; the smoke arguments themselves run through kfp.local there.
set -euo pipefail

KFP_VERSION=2.16.1        # KFP standalone release; >= pipelines.conformance.MIN_BACKEND (tests check)
KIND_NODE=kindest/node:v1.33.1
SEAWEEDFS_IMAGE=chrislusf/seaweedfs:4.00   # the S3 server image KFP 2.16.1's own manifests pin
CLUSTER=wmvla-smoke
NAMESPACE=kubeflow        # standalone KFP runs every pipeline pod in its own namespace: the chart goes there too
RELEASE=wmvla
BUCKET=wmvla-smoke
S3_PORT=18333
API_PORT=18888
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WMVLA=${WMVLA:-wmvla}
PYTHON=${PYTHON:-python3}

registry="" tag="" work="" keep=0 dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "kind_smoke.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
work=${work:-$(mktemp -d -t wmvla-smoke.XXXXXX)}
mkdir -p "$work"
umask 077   # the values file holds the in-cluster S3 server's keys

run() {  # print a step; run it unless --dry-run
  echo "+ $*"
  if [ "$dry" = 0 ]; then "$@"; fi
}
background() {  # LOG COMMAND...: a port-forward for the rest of the script
  local log=$1
  shift
  echo "+ $* &"
  if [ "$dry" = 0 ]; then "$@" >"$work/$log" 2>&1 & pids+=("$!"); fi
}
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "$keep" = 0 ] && [ "$dry" = 0 ]; then kind delete cluster --name "$CLUSTER" || true; fi
}
trap cleanup EXIT

for tool in docker kind kubectl helm "$WMVLA" "$PYTHON"; do
  if [ "$dry" = 0 ] && ! command -v "$tool" >/dev/null; then
    echo "kind_smoke.sh: '$tool' is not installed; it needs docker, kind, kubectl, helm and wmvla[pipeline]" >&2
    exit 2
  fi
done

# -- the in-cluster S3 server's keys: random per run, only in files of $work (mode 600) and the cluster
access_key=smoke$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
secret_key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')

# -- 1. the cluster and KFP standalone
run kind create cluster --name "$CLUSTER" --image "$KIND_NODE" --wait 5m
run kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
run kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
run kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
run kubectl -n "$NAMESPACE" wait --for=condition=Available --timeout=20m deployment --all

# -- 2. an S3 server for the results (the chart's object store)
cat >"$work/s3.json" <<EOF
{"identities": [{"name": "wmvla", "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
cat >"$work/s3-server.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: wmvla-s3
  labels: {app: wmvla-s3}
spec:
  replicas: 1
  selector:
    matchLabels: {app: wmvla-s3}
  template:
    metadata:
      labels: {app: wmvla-s3}
    spec:
      containers:
        - name: seaweedfs
          image: $SEAWEEDFS_IMAGE
          args: ["server", "-dir=/data", "-s3", "-s3.port=8333", "-s3.config=/etc/wmvla-s3/s3.json",
                 "-master.volumePreallocate=false", "-volume.max=0"]
          ports:
            - containerPort: 8333
          readinessProbe:
            tcpSocket: {port: 8333}
            periodSeconds: 2
          volumeMounts:
            - {name: data, mountPath: /data}
            - {name: config, mountPath: /etc/wmvla-s3, readOnly: true}
      volumes:
        - name: data
          emptyDir: {}
        - name: config
          secret: {secretName: wmvla-s3-config}
---
apiVersion: v1
kind: Service
metadata:
  name: wmvla-s3
spec:
  selector: {app: wmvla-s3}
  ports:
    - {name: s3, port: 8333, targetPort: 8333}
EOF
run kubectl -n "$NAMESPACE" create secret generic wmvla-s3-config --from-file=s3.json="$work/s3.json"
run kubectl -n "$NAMESPACE" apply -f "$work/s3-server.yaml"
run kubectl -n "$NAMESPACE" rollout status deployment/wmvla-s3 --timeout=5m

# -- 3. the chart, installed as an admin would, with the values the pipeline is then compiled from
pull_secrets="[]"
if [ -n "${REGISTRY_USERNAME:-}" ] && [ -n "${REGISTRY_PASSWORD:-}" ] && [ -n "$registry" ]; then
  pull_secrets="[wmvla-smoke-pull]"
  echo "+ kubectl -n $NAMESPACE create secret docker-registry wmvla-smoke-pull --docker-server=${registry%%/*} ..."
  if [ "$dry" = 0 ]; then
    kubectl -n "$NAMESPACE" create secret docker-registry wmvla-smoke-pull --docker-server="${registry%%/*}" \
      --docker-username="$REGISTRY_USERNAME" --docker-password="$REGISTRY_PASSWORD"
  fi
fi
{
  echo "images:"
  if [ -n "$registry" ]; then echo "  registry: $registry"; fi
  if [ -n "$tag" ]; then echo "  tag: \"$tag\""; fi
  echo "  pullSecrets: $pull_secrets"
  cat <<EOF
objectStore:
  endpoint: http://wmvla-s3.$NAMESPACE.svc.cluster.local:8333
  region: us-east-1
  resultsBucket: $BUCKET
  resultsPrefix: runs
  credentials:
    source: create
    accessKeyId: "$access_key"
    secretAccessKey: "$secret_key"
huggingface:
  token:
    source: none
modelCache:
  size: 1Gi
  accessModes: [ReadWriteOnce]
  fill:
    enabled: false
metrics:
  podMonitor:
    enabled: false
grafanaDashboard:
  enabled: false
EOF
} >"$work/values.yaml"
run helm install "$RELEASE" "$ROOT/charts/wmvla" -n "$NAMESPACE" -f "$work/values.yaml" --wait --timeout 5m

# -- 4. the bucket, through a port-forward (the same one the run is pulled through)
background s3-forward.log kubectl -n "$NAMESPACE" port-forward svc/wmvla-s3 "$S3_PORT:8333"
background api-forward.log kubectl -n "$NAMESPACE" port-forward svc/ml-pipeline "$API_PORT:8888"
run sleep 5
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY="$secret_key"
run "$PYTHON" -c "import boto3; boto3.client('s3').create_bucket(Bucket='$BUCKET')"

# -- 5. compile from the values (service account, names, pull secrets), CPU-only pool; submit the smoke run.
# --namespace: the chart's; a single-user (standalone) backend runs everything in its own namespace and ignores
# it (apiserver resource_manager.go ReplaceNamespace), a multi-user one needs it (the profile namespace)
run "$WMVLA" pipeline compile --values "$work/values.yaml" --cpu-only --out "$work/smoke.yaml"
run_name="kind-smoke-$(date -u +%Y%m%d-%H%M%S)"
run "$WMVLA" pipeline submit --endpoint "http://127.0.0.1:$API_PORT" --package "$work/smoke.yaml" \
  --values "$work/values.yaml" --namespace "$NAMESPACE" --smoke --run-name "$run_name" --wait --timeout-s 3600 \
  "run_name=$run_name"

# -- 6. the run, pulled from the bucket as a researcher would, verified against its manifest
run "$WMVLA" results pull "s3://$BUCKET/runs/$run_name" "$work/pulled"
run test -s "$work/pulled/summary.json"
run test -s "$work/pulled/report.md"
echo "kind_smoke.sh: done (work folder $work)"
