"""Example Custom-engine server: stdlib only, so it runs with any Python and shows the contract.

Contract: listen on 127.0.0.1:$ENGINEHOUSE_PORT (or --port), answer GET /health with 2xx once ready.
Every other path echoes the request back as JSON; /stream answers with a chunked body of a few lines.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

LABEL = ""


class Handler(BaseHTTPRequestHandler):
    """Echo handler; HTTP/1.1 so the runtime's pooled connections are kept alive."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Access log to stderr, which the runtime captures into the replica's log file."""
        sys.stderr.write("echo-http: " + (format % args) + "\n")

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        # Chunked by hand: the stdlib server has no streaming helper.
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(5):
            line = f"line {i}\n".encode()
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path == "/health":
            self._send(200, {"status": "ok"})
            return
        if url.path == "/stream":
            self._stream()
            return
        try:
            text: str | None = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        headers = {
            k.lower(): v for k, v in self.headers.items() if k.lower() == "content-type" or k.lower().startswith("x-")
        }
        self._send(
            200,
            {
                "method": self.command,
                "path": url.path,
                "query": url.query,
                "headers": headers,
                "body_base64": base64.b64encode(body).decode(),
                "body_text": text,
                "label": LABEL,
                "model_dir": os.environ.get("ENGINEHOUSE_MODEL_DIR", ""),
                "pid": os.getpid(),
            },
        )

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


def main() -> None:
    """Parse --port/--label and serve until terminated."""
    global LABEL
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("ENGINEHOUSE_PORT", "8080")))
    parser.add_argument("--label", default="", help="echoed back; shows arguments arrive unchanged")
    args = parser.parse_args()
    LABEL = args.label
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
