"""Logging of the control plane: text or JSON lines (``ENGINEHOUSE_LOG_FORMAT=json``), each line of a
management request carrying that request's id (``X-Request-ID``, made up when the client sends none).

The replicas log through Ray Serve, whose own JSON encoding (the same setting) carries Serve's request id.
Never log a token or a payload: the lines say what happened, to which resource.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import IO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def choose_request_id(given: str | None) -> str:
    """The client's ``X-Request-ID`` when it is a plain token (no log injection), else a new one."""
    return given if given and _SAFE_ID.match(given) else uuid.uuid4().hex


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (when in a request), error."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            line["request_id"] = rid
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Configure the root logger once for the process (to ``stream``, stderr by default)."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestId())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
