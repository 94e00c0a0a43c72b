#!/usr/bin/env python3
"""Seeds a shared Triton model repository with the stage models an image ships
(`echox-seed-model-repository` in the images; the init container of the Triton and API pods).

    echox-seed-model-repository SRC DEST [MODEL ...]

Copies every file of SRC/<model> (config.pbtxt, version 1) that DEST/<model> does not have
yet, and nothing else: files already there, and the versions the API published
(POST /v1/models/publish writes DEST/<model>/<N>/), are never touched, so running it at every
pod start is safe. Each file is written under a temporary name and renamed into place, so
pods seeding at the same time never leave a half-written file. Without MODEL, every model of
SRC. Only the standard library: the Triton image's system Python runs it too.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def seed(source: Path, dest: Path, models: list[str] | None = None) -> list[Path]:
    """Copies what DEST lacks; returns the files written."""
    names = models or sorted(p.name for p in source.iterdir() if (p / "config.pbtxt").is_file())
    written: list[Path] = []
    for name in names:
        model = source / name
        if not (model / "config.pbtxt").is_file():
            raise SystemExit(f"echox-seed-model-repository: {model} is not a model (no config.pbtxt)")
        for path in sorted(model.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            target = dest / name / path.relative_to(model)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, dest, models = Path(args[0]), Path(args[1]), args[2:] or None
    written = seed(source, dest, models)
    print(f"seeded {len(written)} files into {dest}" + "".join(f"\n  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
