"""The job's manifest: one JSON line per input, written by one writer, append-only, resumable.

On open, a trailing partial line (a crash mid-write) is cut off, so the file ends at its last complete line,
and every source already listed is known as done. Each :meth:`Manifest.append` writes whole lines, flushes and
fsyncs, so a line on disk means its result file (written before it) is there too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SUCCESSFUL, FAILED = "SUCCESSFUL", "FAILED"


def manifest_path(dest_path: str | Path, service_id: str) -> Path:
    """``dest_path/infer-result-{service_id}.manifest``."""
    return Path(dest_path) / f"infer-result-{service_id}.manifest"


def success_line(source: str, location: str) -> dict[str, Any]:
    """The line of an input whose result file is at ``location``."""
    return {"source": source, "result": SUCCESSFUL, "inference-loc": location}


def failure_line(source: str, message: str) -> dict[str, Any]:
    """The line of an input that failed, with the reason."""
    return {"source": source, "result": FAILED, "error_message": message}


class Manifest:
    """An open manifest: ``done`` maps every source already written to its result (SUCCESSFUL or FAILED)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = {}
        self._file = self._open()

    def _open(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+b")
        f.seek(0)
        data = f.read()
        end = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        for raw in data[:end].splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # not one of ours; left as is, never counted
            if isinstance(line, dict) and isinstance(line.get("source"), str):
                self.done[line["source"]] = str(line.get("result"))
        f.seek(0, os.SEEK_END)
        return f

    def append(self, lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the lines of sources not yet done (a repeated source is dropped), then flush and fsync; returns
        the lines written."""
        written: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        for line in lines:
            source = line["source"]
            if source in self.done:
                continue
            self.done[source] = line["result"]
            written.append(line)
            # a name that is not UTF-8 (a lone surrogate from os.walk) is written as its \udcXX JSON escape
            chunks.append(json.dumps(line, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")
        if chunks:
            self._file.write(b"".join(chunks))
            self._file.flush()
            os.fsync(self._file.fileno())
        return written

    def close(self) -> None:
        """Close the file (every line is already on disk)."""
        self._file.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
