#!/usr/bin/env bash
# Runs a command with LIBERO on the lent GPU machine (no PyPI there), from the bundle that
# benchmarks/libero_gpu_bundle.sh builds here (.libero_gpu/libero_gpu_bundle.tar.xz; carry .libero_gpu).
# Unpacks it once into $LIBERO_GPU_DIR (default /tmp/libero_gpu), installs its cp312 wheels there
# (pip --no-index --no-deps --target), then runs the command with
#   PYTHONPATH=<dir>/site:<repo>   (robosuite 1.4.0, hf-libero 0.1.4, bddl, mujoco, ... and wmvla)
#   WMVLA_LIBERO_ASSETS=<dir>/assets   (the adapter's own asset-location setting; the bundle's asset subset)
#   MUJOCO_GL=egl PYOPENGL_PLATFORM=egl (unless set), PYTHONUNBUFFERED=1
# The GL loaders (libEGL etc.) must be there already; on the lent machine unpack the .gl debs first
# (see /work/.library/device/README.md), e.g.
#   for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
#   bash benchmarks/run_gpu_libero.sh python3 benchmarks/bench_envs.py --env libero --suite libero_spatial --workers 1 16
#   bash benchmarks/run_gpu_libero.sh python3 -m vla_core.cli eval --env libero --suite libero_spatial ...
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${LIBERO_GPU_BUNDLE:-.libero_gpu/libero_gpu_bundle.tar.xz}
DIR=${LIBERO_GPU_DIR:-/tmp/libero_gpu}
PYTHON=${PYTHON:-python3}
if [ ! -f "$DIR/.unpacked" ]; then
  [ -f "$BUNDLE" ] || { echo "no bundle at $BUNDLE: build it with benchmarks/libero_gpu_bundle.sh and carry .libero_gpu" >&2; exit 1; }
  t0=$SECONDS
  rm -rf "$DIR"; mkdir -p "$DIR"
  tar -C "$DIR" -xJf "$BUNDLE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DIR/site" "$DIR"/wheels/*.whl
  touch "$DIR/.unpacked"
  echo "[libero-gpu] bundle unpacked into $DIR in $((SECONDS - t0)) s ($(du -sh "$DIR" | cut -f1))" >&2
fi
export PYTHONPATH=$DIR/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export WMVLA_LIBERO_ASSETS=${WMVLA_LIBERO_ASSETS:-$DIR/assets}
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-$MUJOCO_GL}
export PYTHONUNBUFFERED=1
exec "$@"
