"""Custom engine: the user's own HTTP server, run as a child process (or container) and proxied to.

The server gets its port in ``ENGINEHOUSE_PORT`` (and ``{port}`` in its arguments), its version folder in
``ENGINEHOUSE_MODEL_DIR`` (and ``{model_dir}``), and must answer ``GET health_path`` with 2xx when ready.
An argument exactly equal to ``"python"`` runs as ``sys.executable``, so example servers use the
runtime's own interpreter (its virtual environment) rather than whatever ``python`` is on PATH.

Requests reach it as raw HTTP through :meth:`CustomAdapter.forward` / :meth:`CustomAdapter.forward_stream`;
it has no tensor signature, so :meth:`CustomAdapter.predict` refuses tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np

from runtimes.base import ModelAdapter, Signature
from runtimes.errors import InferenceError, InvalidInputError, ModelLoadError, ModelNotReadyError

#: RFC 9110 hop-by-hop headers plus those httpx recomputes; forwarding them would corrupt framing.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
LOG_TAIL_LINES = 20
TERM_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask Linux to SIGTERM the child when its parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:  # no glibc (musl etc.): process-group kill on unload/atexit still applies
        return
    # The parent may have died between fork and prctl; then the signal would never come.
    if os.getppid() != parent_pid:
        os._exit(1)


def _container_engine() -> str | None:
    """``docker`` or ``podman``, whichever is installed and whose daemon answers ``info``."""
    for exe in ("docker", "podman"):
        path = shutil.which(exe)
        if path is None:
            continue
        try:
            done = subprocess.run(
                [path, "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=15, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return path
    return None


def _terminate(proc: subprocess.Popen[bytes], container: tuple[str, str] | None, log_dir: str) -> None:
    """SIGTERM the child's process group, SIGKILL it after a grace period, remove any container.

    Module-level (not a method) so weakref.finalize holds no reference to the adapter.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=TERM_GRACE_S)
    # Also after a clean leader exit: grandchildren left in the group must not outlive the replica.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=TERM_GRACE_S)
    if container is not None:
        exe, name = container
        # A SIGKILLed `docker run` client leaves its container running; remove it by name.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [exe, "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False
            )
    shutil.rmtree(log_dir, ignore_errors=True)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, read from its end so a huge log costs little."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _clean_headers(headers: Mapping[str, str] | httpx.Headers) -> dict[str, str]:
    """Headers without hop-by-hop ones (and without those the Connection header names)."""
    named = {h.strip().lower() for v in (headers.get("connection") or "",) for h in v.split(",")}
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in named}


class CustomAdapter(ModelAdapter):
    """Runs the user's HTTP server from ``start_command`` (or ``image``) and forwards raw HTTP to it."""

    engine = "Custom"
    extra = "all"
    #: seconds to wait for the health path; ENGINEHOUSE_CUSTOM_START_TIMEOUT overrides
    start_timeout: ClassVar[float] = 60.0
    #: per-request read timeout when forwarding (a slow model is the server's business, not a hang)
    request_timeout: ClassVar[float] = 300.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._client: httpx.AsyncClient | None = None
        self._finalizer: weakref.finalize | None = None

    # -- start ---------------------------------------------------------------------------------------
    def _subst(self, arg: str) -> str:
        return arg.replace("{port}", str(self.port)).replace("{model_dir}", str(self.model_dir.resolve()))

    def _local_argv(self, command: list[str]) -> list[str]:
        argv = [self._subst(a) for a in command]
        return [sys.executable if a == "python" else a for a in argv]

    def _container_argv(self, env: dict[str, str]) -> tuple[list[str], tuple[str, str]]:
        exe = _container_engine()
        if exe is None:
            raise ModelLoadError(
                self.name,
                f"config.image is {self.config.image!r} but no container engine "
                "is available: neither `docker info` nor `podman info` succeeds",
            )
        cname = f"enginehouse-{self.name}-{uuid.uuid4().hex[:8]}"
        argv = [
            exe,
            "run",
            "--rm",
            "--name",
            cname,
            "-p",
            f"127.0.0.1:{self.port}:{self.port}",
            "-v",
            f"{self.model_dir.resolve()}:/model:ro",
            f"--cpus={self.placement.cpus or self.placement.cpu_threads:g}",
        ]
        if self.placement.memory_mb:
            argv.append(f"--memory={self.placement.memory_mb}m")
        if self.placement.gpu_ids:
            argv.append("--gpus=device=" + ",".join(map(str, self.placement.gpu_ids)))
        env = {**self.config.env, "ENGINEHOUSE_PORT": str(self.port), "ENGINEHOUSE_MODEL_DIR": "/model"}
        for k, v in env.items():
            argv += ["-e", f"{k}={v}"]
        command = [
            self._subst(a).replace(str(self.model_dir.resolve()), "/model")
            for a in (self.config.container_command or [])
        ]
        if command:
            argv += ["--entrypoint", command[0]]
        argv.append(str(self.config.image))
        argv += command[1:]
        argv += [
            self._subst(a).replace(str(self.model_dir.resolve()), "/model") for a in (self.config.container_args or [])
        ]
        return argv, (exe, cname)

    def _timeout(self) -> float:
        raw = os.environ.get("ENGINEHOUSE_CUSTOM_START_TIMEOUT")
        return float(raw) if raw else float(self.start_timeout)

    async def load(self) -> Signature:
        """Start the server, wait until its health path answers 2xx; ModelLoadError with its log if not."""
        cfg = self.config
        if not cfg.start_command and not cfg.image:
            raise ModelLoadError(self.name, "a Custom engine needs start_command or image in config.json")
        self.port = cfg.port or _free_port()
        env = {
            **os.environ,
            **cfg.env,
            "ENGINEHOUSE_PORT": str(self.port),
            "ENGINEHOUSE_MODEL_DIR": str(self.model_dir.resolve()),
        }
        if self.placement.gpu_ids and "CUDA_VISIBLE_DEVICES" not in cfg.env:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.placement.gpu_ids))
        container: tuple[str, str] | None = None
        if cfg.start_command:
            argv = self._local_argv(cfg.start_command)
        else:
            argv, container = await asyncio.to_thread(self._container_argv, env)
        log_dir = tempfile.mkdtemp(prefix=f"enginehouse-custom-{self.name}-")
        self.log_path = Path(log_dir) / "server.log"
        preexec: Callable[[], None] | None = (
            functools.partial(_die_with_parent, os.getpid()) if sys.platform.startswith("linux") else None
        )
        # Spawned on the event-loop thread on purpose: PR_SET_PDEATHSIG fires when the *thread* that
        # forked exits, so a short-lived worker thread would kill the server as soon as it finished.
        with self.log_path.open("wb") as log:  # a file, not a pipe: a chatty server can never block on it
            try:
                self.proc = subprocess.Popen(
                    argv,
                    cwd=self.model_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,
                )  # only prctl: safe after fork
            except OSError as exc:
                shutil.rmtree(log_dir, ignore_errors=True)
                raise ModelLoadError(self.name, f"cannot start {argv[0]!r}: {exc}") from None
        self._finalizer = weakref.finalize(self, _terminate, self.proc, container, log_dir)
        self._finalizer.atexit = True  # the replica exiting normally also stops the server
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            timeout=httpx.Timeout(self.request_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )
        try:
            await self._wait_healthy()
        except BaseException:
            await self.unload()
            raise
        self.ready = True
        self.signature = Signature((), ())
        return self.signature

    async def _wait_healthy(self) -> None:
        assert self.proc is not None and self._client is not None and self.log_path is not None
        timeout = self._timeout()
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ModelLoadError(
                    self.name,
                    f"server exited with code {code} before becoming healthy; last log lines:\n{_tail(self.log_path)}",
                )
            if await self._probe(timeout=1.0):
                return
            if time.monotonic() >= deadline:
                raise ModelLoadError(
                    self.name,
                    f"server not healthy at {self.config.health_path} after "
                    f"{timeout:g} s; last log lines:\n{_tail(self.log_path)}",
                )
            await asyncio.sleep(0.1)

    async def _probe(self, timeout: float) -> bool:
        assert self._client is not None
        try:
            r = await self._client.get(self.config.health_path, timeout=timeout)
        except httpx.HTTPError:
            return False
        return 200 <= r.status_code < 300

    # -- stop / health -------------------------------------------------------------------------------
    async def unload(self) -> None:
        """Stop the server: SIGTERM its process group, SIGKILL after 5 s; close the connection pool."""
        self.ready = False
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._finalizer is not None:
            await asyncio.to_thread(self._finalizer)  # runs _terminate at most once
        await super().unload()

    async def health(self) -> bool:
        """True while the process lives and the health path answers 2xx."""
        if not self.ready or self.proc is None or self.proc.poll() is not None:
            return False
        return await self._probe(timeout=5.0)

    # -- requests ------------------------------------------------------------------------------------
    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refused: a Custom engine has no tensor signature and takes raw HTTP via forward()."""
        raise InvalidInputError(
            self.name,
            "Custom engines take raw HTTP requests, not tensors; send the request to the model's HTTP path instead",
        )

    def _request(self, method: str, path: str, headers: Mapping[str, str], body: bytes, query: str) -> httpx.Request:
        if not self.ready or self._client is None:
            raise ModelNotReadyError(self.name)
        url = ("/" + path.lstrip("/")) + (f"?{query}" if query else "")
        return self._client.build_request(method, url, headers=_clean_headers(headers), content=body)

    async def forward(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, query: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one raw request to the server; returns status, end-to-end headers and the body as sent."""
        request = self._request(method, path, headers, body, query)
        assert self._client is not None
        try:
            response = await self._client.send(request, stream=True)
            try:
                # Raw bytes keep Content-Encoding truthful: httpx would otherwise decompress them.
                data = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise InferenceError(self.name, f"custom server request failed: {type(exc).__name__}: {exc}") from exc
        return response.status_code, _clean_headers(response.headers), data

    async def forward_stream(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, query: str = ""
    ) -> tuple[int, dict[str, str], AsyncIterator[bytes], int | None]:
        """Send one raw request; status and headers at once, the body as an async iterator, and its length.

        The length is the server's Content-Length (None for a chunked or close-delimited body, i.e. a stream).
        """
        request = self._request(method, path, headers, body, query)
        assert self._client is not None
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise InferenceError(self.name, f"custom server request failed: {type(exc).__name__}: {exc}") from exc

        async def chunks() -> AsyncIterator[bytes]:
            # Closing in finally returns the connection to the pool even when the consumer stops early.
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                raise InferenceError(self.name, f"custom server stream broke: {exc}") from exc
            finally:
                await response.aclose()

        raw_length = response.headers.get("content-length", "")
        length = int(raw_length) if raw_length.isdigit() else None
        return response.status_code, _clean_headers(response.headers), chunks(), length
