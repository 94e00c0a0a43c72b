"""Structured logs: one JSON object per line carrying the session and turn ids in context."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)
_turn: contextvars.ContextVar[str | None] = contextvars.ContextVar("turn_id", default=None)
_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


@contextmanager
def turn_context(session_id: str, turn_id: str, traceparent: str = "") -> Iterator[None]:
    """Every log line inside carries these ids (asyncio tasks inherit the context)."""
    tokens = (_session.set(session_id), _turn.set(turn_id), _trace.set(traceparent or None))
    try:
        yield
    finally:
        _trace.reset(tokens[2])
        _turn.reset(tokens[1])
        _session.reset(tokens[0])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("session_id", _session), ("turn_id", _turn), ("traceparent", _trace)):
            value = var.get()
            if value:
                entry[key] = value
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(JsonFormatter() if as_json else plain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    """Logs `msg` with extra structured fields."""
    logger.log(level, msg, extra={"fields": fields})
