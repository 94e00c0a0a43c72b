"""JSON-lines files: every manifest and cache a run writes holds one JSON object a line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from echox.errors import EchoXError


def read_jsonl(path: Path, hint: str = "", *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every row of `path`; blank lines are skipped. A line that is not JSON is an EchoXError
    naming the file; so is a missing file (with `hint`, e.g. which stage writes it), unless
    `missing_ok`: then there are no rows (a cache not written yet)."""
    if not path.is_file():
        if missing_ok:
            return []
        raise EchoXError(f"{path} is missing" + (f" ({hint})" if hint else ""))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EchoXError(f"{path}, line {number}: not JSON ({exc.msg})") from None
    return rows


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes `rows` whole or not at all (a temporary file, then a rename), so an interrupted
    stage never leaves half a manifest for a resumed run to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)
