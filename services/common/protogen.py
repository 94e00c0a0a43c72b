"""Generates the Python and gRPC stubs of protos/echox/v1 into services/proto (run at install).

The stubs are build output, never committed and never edited by hand: `make install` runs
`python -m services.common.protogen`, and a test regenerates them into a temporary folder and
fails if what is installed has drifted from the .proto files. protoc names generated imports
after the proto package (`from echox.v1 import ...`), which would collide with our `echox`
library, so they are rewritten to `from services.proto import ...`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "echox" / "v1"
OUT_DIR = REPO_ROOT / "services" / "proto"
PACKAGE = "services.proto"
_IMPORT = re.compile(r"^from echox\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Writes the stubs into `out_dir` (replacing what was there); returns the files written."""
    from grpc_tools import protoc  # build-time tool, imported only here

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        written = [out_dir / "__init__.py"]
        written[0].write_text('"""Generated from protos/echox/v1 by services.common.protogen; do not edit."""\n')
        for src in sorted((Path(tmp) / "echox" / "v1").iterdir()):
            dst = out_dir / src.name
            dst.write_text(_IMPORT.sub(f"from {PACKAGE} import ", src.read_text()))
            written.append(dst)
    return written


def drift(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of stub files that differ from a fresh generation (empty when in sync)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp) / "proto")}
    current = {p.name: p.read_text() for p in out_dir.glob("*.py*")} if out_dir.exists() else {}
    return sorted(name for name in fresh.keys() | current.keys() if fresh.get(name) != current.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs drifted")
    args = parser.parse_args(argv)
    if args.check:
        changed = drift()
        if changed:
            print(f"stubs out of date (run `python -m services.common.protogen`): {changed}", file=sys.stderr)
            return 1
        return 0
    for path in generate():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
