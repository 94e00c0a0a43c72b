#!/usr/bin/env bash
# Puts the real Triton Inference Server (tritonserver 2.51, CPU-capable) under VENV/triton,
# taken from the nvidia-pytriton wheel without installing that package: its numpy<2 pin
# would clash with ours, and we only need the server binary, its libraries and the Python
# backend (see services/common/triton_server.py for how it is launched).
set -euo pipefail
VENV=${1:-.venv}
DEST="$VENV/triton"
VERSION=0.7.0
[ -x "$DEST/pytriton/tritonserver/bin/tritonserver" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m pip download -q --no-deps "nvidia-pytriton==$VERSION" -d "$tmp"
mkdir -p "$DEST"
"$VENV/bin/python" - "$tmp" "$DEST" <<'PY'
import sys, zipfile, pathlib
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("nvidia_pytriton-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
            path = pathlib.Path(zf.extract(info, dest))
            if info.external_attr >> 16 & 0o111:  # keep the executable bits zip recorded
                path.chmod(path.stat().st_mode | 0o755)
PY
chmod +x "$DEST"/pytriton/tritonserver/bin/tritonserver "$DEST"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
echo "tritonserver installed under $DEST"
