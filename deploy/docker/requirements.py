#!/usr/bin/env python3
"""Prints the requirements of pyproject.toml (the core and the named extras), one a line.

The images install the dependencies in their own layer, before the source is copied, so a
change of code does not reinstall them:

    python deploy/docker/requirements.py serving,training > /tmp/requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [name for name in extras if name not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}: pyproject.toml has {sorted(optional)}")
    found = list(project["dependencies"])
    for name in extras:
        found += [req for req in optional[name] if req not in found]
    return found


def main() -> None:
    extras = [name for name in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if name]
    pyproject = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("pyproject.toml")
    print("\n".join(requirements(pyproject, extras)))


if __name__ == "__main__":
    main()
