#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the test suite.
#   bash scripts/test.sh            default suite (what CI runs)
#   bash scripts/test.sh --slow     also the slow tests (end-to-end matrix, long rollouts)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/python -m pytest -q "$@"; fi
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
