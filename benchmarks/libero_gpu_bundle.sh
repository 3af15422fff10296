#!/usr/bin/env bash
# Builds a trimmed, compressed LIBERO bundle for the lent GPU machine, which has no PyPI and takes at most
# 64 MiB of carried files (robosuite's wheel alone is 193 MB; robosuite installed is 591 MB, the LIBERO asset
# tree 622 MB). Run here, on the machine where scripts/install_libero.sh installed LIBERO:
#
#   bash benchmarks/libero_gpu_bundle.sh                               # libero_spatial: 32.6 MiB, ~2.5 min
#   SUITES="libero_spatial libero_goal" bash benchmarks/libero_gpu_bundle.sh
#   PY=.venv/bin/python DEST=.libero_gpu CHECK=0 bash benchmarks/libero_gpu_bundle.sh
#
# Output: $DEST/libero_gpu_bundle.tar.xz (DEST default .libero_gpu, git-ignored through .git/info/exclude)
# and $DEST/MANIFEST.json. On the GPU machine, benchmarks/run_gpu_libero.sh unpacks it and runs a command
# with it (carry .libero_gpu there).
#
# The bundle holds
#   site/    robosuite 1.4.0 (its Python code, macros_private.py, and of models/assets only the files the
#            chosen suites open), hf-libero 0.1.4 (libero/; init states of the chosen suites only), bddl 1.0.1,
#            and their dist-info folders (package versions are recorded in every eval summary)
#   assets/  the files of the LIBERO asset tree the chosen suites open (used through $WMVLA_LIBERO_ASSETS)
#   wheels/  cp312 manylinux wheels the GPU image lacks: mujoco (this venv's version), PyOpenGL, glfw,
#            gymnasium, farama-notifications, easydict, termcolor, future, tyro, docstring_parser, typeguard
# Which files are opened is measured, not guessed: every task of every chosen suite is created, reset and
# stepped with both cameras rendered (the first task also with LIBERO's hard reset) under
# `strace -f -e trace=openat,open` (benchmarks/libero_bundle_tool.py exercise / select).
#
# Check (CHECK=1, default): the bundle is unpacked into a temp folder; every task of the chosen suites records
# its observation after reset(0) and after 5 fixed steps (both 256 px cameras, state), once with the full
# install and once with PYTHONPATH=<unpacked>/site and WMVLA_LIBERO_ASSETS=<unpacked>/assets; they must be
# identical. (Here the venv's own mujoco etc. serve: the cp312 wheels are for the GPU machine's Python 3.12.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
SUITES=${SUITES:-libero_spatial}
DEST=${DEST:-.libero_gpu}
CHECK=${CHECK:-1}
LIMIT_MIB=64
BUNDLE_NAME=libero_gpu_bundle.tar.xz

command -v strace >/dev/null || { echo "strace is needed (apt-get install strace)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/libero_gpu_bundle.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-${MUJOCO_GL:-egl}}
# a private LIBERO config folder: the runs below switch between two installs
export WMVLA_LIBERO_CONFIG_DIR=$WORK/libero_config

# --- where things are installed here
eval "$("$PY" - <<'EOF'
import importlib.util, pathlib
def pkg(name):
    return pathlib.Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])
from vla_core.envs.libero_env import find_libero_assets
print(f"SITE={pkg('robosuite').parent}")
print(f"ASSETS={find_libero_assets()}")
EOF
)"
echo "[bundle] suites: $SUITES; site-packages $SITE; LIBERO assets $ASSETS"

# --- 1. which files do the chosen suites open?
t0=$SECONDS
strace -f -qq -e trace=openat,open -o "$WORK/trace.txt" \
  "$PY" benchmarks/libero_bundle_tool.py exercise --suites $SUITES
"$PY" benchmarks/libero_bundle_tool.py select --trace "$WORK/trace.txt" \
  --robosuite "$SITE/robosuite/models/assets" --assets "$ASSETS" --out "$WORK/opened.json"
echo "[bundle] traced in $((SECONDS - t0)) s"

# --- 2. stage
STAGE=$WORK/stage
mkdir -p "$STAGE/site" "$STAGE/assets" "$STAGE/wheels"
copy_pkg() {  # copy_pkg NAME [extra tar --exclude patterns...]: a package folder without bytecode
  local name=$1; shift
  tar -C "$SITE" -cf - --exclude=__pycache__ --exclude='*.pyc' "$@" "$name" | tar -C "$STAGE/site" -xf -
}
copy_pkg robosuite --exclude=robosuite/models/assets
copy_pkg libero --exclude=libero/libero/init_files
copy_pkg bddl
for d in robosuite-1.4.0.dist-info hf_libero-0.1.4.dist-info bddl-1.0.1.dist-info; do
  [ -d "$SITE/$d" ] || { echo "missing $SITE/$d (expected robosuite 1.4.0, hf-libero 0.1.4, bddl 1.0.1)" >&2; exit 1; }
  cp -r "$SITE/$d" "$STAGE/site/"
done
for s in $SUITES; do
  mkdir -p "$STAGE/site/libero/libero/init_files"
  cp -r "$SITE/libero/libero/init_files/$s" "$STAGE/site/libero/libero/init_files/"
done
[ -f "$STAGE/site/robosuite/macros_private.py" ] || cp "$STAGE/site/robosuite/macros.py" "$STAGE/site/robosuite/macros_private.py"
"$PY" - "$WORK/opened.json" "$SITE/robosuite/models/assets" "$STAGE/site/robosuite/models/assets" "$ASSETS" "$STAGE/assets" <<'EOF'
import json, shutil, sys
from pathlib import Path
opened = json.load(open(sys.argv[1]))
for key, src, dst in (("robosuite", sys.argv[2], sys.argv[3]), ("assets", sys.argv[4], sys.argv[5])):
    for rel in opened[key]:
        (Path(dst) / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(src) / rel, Path(dst) / rel)
# the asset-tree markers wmvla checks (scenes/, textures/) exist whenever a scene was opened
for m in ("scenes", "textures"):
    (Path(sys.argv[5]) / m).mkdir(exist_ok=True)
EOF

# wheels: the versions installed here where a cp312 wheel exists for them (mujoco is binary)
wheel_specs=$("$PY" - <<'EOF'
from importlib import metadata
names = ["mujoco", "PyOpenGL", "glfw", "gymnasium", "farama-notifications", "easydict", "termcolor", "future",
         "tyro", "docstring_parser", "typeguard"]
defaults = {"glfw": "2.11.0", "farama-notifications": "0.0.6"}
out = []
for n in names:
    try:
        out.append(f"{n}=={metadata.version(n)}")
    except metadata.PackageNotFoundError:
        out.append(f"{n}=={defaults[n]}" if n in defaults else n)
print(" ".join(out))
EOF
)
echo "[bundle] wheels: $wheel_specs"
# reuse wheels already fetched for the GPU machine (.wheels, .wheels_mw), download the rest
find_links=()
for d in .wheels .wheels_mw; do [ -d "$d" ] && find_links+=(--find-links "$d"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${find_links[@]}" -d "$WORK/wheels" $wheel_specs 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
for spec in $wheel_specs; do
  n=${spec%%==*}; v=${spec#*==}
  pat=$(echo "$n" | tr 'A-Z-' 'a-z_')
  f=$(ls "$WORK/wheels" | awk -v p="$pat" -v v="$v" 'tolower($0) ~ "^"p"-"v"-" {print; exit}')
  [ -n "$f" ] || { echo "no wheel for $spec in $WORK/wheels" >&2; exit 1; }
  cp "$WORK/wheels/$f" "$STAGE/wheels/"
done

# manifest
"$PY" - "$STAGE" "$SUITES" "$WORK/opened.json" > "$STAGE/MANIFEST.json" <<'EOF'
import json, os, sys
from importlib import metadata
from pathlib import Path
stage, suites, opened = Path(sys.argv[1]), sys.argv[2].split(), json.load(open(sys.argv[3]))
def size(p):
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
print(json.dumps({
    "suites": suites,
    "versions": {n: metadata.version(n) for n in ("robosuite", "hf-libero", "bddl")},
    "wheels": sorted(os.listdir(stage / "wheels")),
    "opened_files": {k: len(v) for k, v in opened.items()},
    "bytes_unpacked": {"site": size(stage / "site"), "assets": size(stage / "assets"), "wheels": size(stage / "wheels")},
    "robosuite_models_assets": opened["robosuite"],
    "libero_assets": opened["assets"],
}, indent=1))
EOF

# --- 3. compress (deterministic: sorted names, fixed times and owners)
mkdir -p "$DEST"
tar -C "$STAGE" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . | xz -9 -T2 > "$WORK/$BUNDLE_NAME"
mv "$WORK/$BUNDLE_NAME" "$DEST/$BUNDLE_NAME"
cp "$STAGE/MANIFEST.json" "$DEST/MANIFEST.json"
bundle_bytes=$(stat -c %s "$DEST/$BUNDLE_NAME")
echo "[bundle] $DEST/$BUNDLE_NAME: $((bundle_bytes / 1024 / 1024)) MiB ($bundle_bytes bytes); unpacked: $(du -sh "$STAGE" | cut -f1)"

# --- 4. what travels to the GPU machine: tracked + untracked-not-ignored files, shared/, .gl and the bundle
travel=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')
extra=0
[ -d shared ] && extra=$((extra + $(du -sb shared | cut -f1)))
[ -d .gl ] && extra=$((extra + $(du -sb .gl | cut -f1)))
total=$((travel + extra + bundle_bytes))
echo "[bundle] travels with --carry .gl $DEST/$BUNDLE_NAME: $((total / 1024 / 1024)) MiB of $LIMIT_MIB MiB (working tree $((travel / 1024)) KiB, .gl/shared $((extra / 1024)) KiB)"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "[bundle] too large for the device tool ($LIMIT_MIB MiB): choose fewer suites" >&2; exit 1
fi

# --- 5. check: the trimmed bundle gives the same observations as the full install
if [ "$CHECK" = 1 ]; then
  t0=$SECONDS
  mkdir -p "$WORK/unpacked"
  tar -C "$WORK/unpacked" -xJf "$DEST/$BUNDLE_NAME"
  "$PY" benchmarks/libero_bundle_tool.py observe --suites $SUITES --out "$WORK/full.npz" 2>/dev/null
  PYTHONPATH="$WORK/unpacked/site${PYTHONPATH:+:$PYTHONPATH}" WMVLA_LIBERO_ASSETS="$WORK/unpacked/assets" \
    "$PY" benchmarks/libero_bundle_tool.py observe --suites $SUITES --out "$WORK/bundle.npz" 2>/dev/null
  grep -q "$WORK/unpacked/site/robosuite" "$WORK/bundle.where.json" || { echo "[bundle] check did not use the bundle's robosuite" >&2; exit 1; }
  "$PY" benchmarks/libero_bundle_tool.py compare "$WORK/full.npz" "$WORK/bundle.npz"
  echo "[bundle] check passed in $((SECONDS - t0)) s"
fi
