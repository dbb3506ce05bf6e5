"""The service replica: one Ray Serve deployment that receives a request and runs the engine itself.

One hop on the hot path (see docs/architecture.md): the ingress replica picks the model version by the
service's weights (or ``X-Model-Version``, or ``/versions/{v}`` in an OIP path), decodes the payload (OIP v2
JSON, the binary tensor extension, or ``instances``), queues it for that version's dynamic batcher, and
encodes the answer. Weights arrive through ``reconfigure`` so they change live, with no redeploy. Counts
leave through ``serving.dataplane.counters`` in batches, off the request path.

Paths under the service's ``access_address``: ``POST /`` (infer), and the Open Inference Protocol v2 routes
``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready`` and ``POST .../infer`` (so ``tritonclient`` works with the access address as its URL).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import orjson
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from runtimes.base import ModelAdapter, ModelConfig, Placement
from runtimes.errors import EnginehouseError, InvalidInputError, ModelNotReadyError
from runtimes.registry import load_model
from serving.dataplane.asyncq import AsyncQueue, Claimed, open_queue
from serving.dataplane.binary import decode_binary, encode_binary, wants_binary_output
from serving.dataplane.codec import decode_request, encode_response
from serving.dataplane.counters import Tally
from serving.dataplane.deploy import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S
from serving.tokens import check_token

JSON = "application/json"
HEADER_LENGTH = "inference-header-content-length"
#: bodies above this many bytes are refused with 413 (``ENGINEHOUSE_MAX_BODY_MB``)
MAX_BODY = int(float(os.environ.get("ENGINEHOUSE_MAX_BODY_MB", "64")) * 1024 * 1024)
#: async: how long a claimed request is held before another replica may take it (renewed while running)
ASYNC_LEASE_S = float(os.environ.get("ENGINEHOUSE_ASYNC_LEASE_S", "30"))
ASYNC_POLL_S = 0.2
ASYNC_CONCURRENCY = 4
_OIP_MODEL = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer|/stats)?/?$"
)


def _placement(num_cpus: float, memory_mb: int | None = None) -> Placement:
    """The engine's device, thread budget and limits from what Ray gave this replica."""
    import ray

    gpu_ids = tuple(int(g) for g in ray.get_gpu_ids()) if ray.is_initialized() else ()
    # Ray sets CUDA_VISIBLE_DEVICES for the replica, so its first visible GPU is always cuda:0.
    return Placement(
        device="cuda:0" if gpu_ids else "cpu",
        cpu_threads=max(1, round(num_cpus)),
        gpu_ids=gpu_ids,
        cpus=num_cpus,
        memory_mb=memory_mb,
    )


#: the OIP v2 server metadata (``GET /v2``)
SERVER_METADATA = {"name": "enginehouse", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
#: a transport-free answer: status, headers, body
Reply = tuple[int, dict[str, str], bytes]


def json_reply(data: Any, status: int = 200) -> Reply:
    """A JSON answer."""
    return status, {"content-type": JSON}, orjson.dumps(data)


def error_reply(exc: EnginehouseError) -> Reply:
    """``{"error": message}`` with the error's status."""
    return json_reply({"error": exc.message}, exc.status_code)


def http_response(reply: Reply) -> Response:
    """The Starlette response of an answer."""
    status, headers, content = reply
    return Response(content, status_code=status, headers=headers)


class UnknownVersion(EnginehouseError):
    status_code = 404
    error_code = "EH.0201"

    def __init__(self, service: str, version: str, known: list[str]) -> None:
        super().__init__(f"service {service} has no model version {version}; versions: {', '.join(known)}")


class UnknownRoute(EnginehouseError):
    """A path or model name the service does not serve."""

    status_code = 404
    error_code = "EH.0202"


class BodyTooLarge(EnginehouseError):
    status_code = 413
    error_code = "EH.0203"


class Overloaded(EnginehouseError):
    """The replica already holds ``max_queue_size`` requests; the client should retry later."""

    status_code = 503
    error_code = "EH.0204"


class TimedOut(EnginehouseError):
    """No answer within ``request_timeout_s``; the request was cancelled and its engine slot freed."""

    status_code = 504
    error_code = "EH.0205"


#: seconds a 503 asks the client to wait before retrying
RETRY_AFTER_S = 1


def _shape_key(inputs: dict[str, np.ndarray]) -> tuple[Any, ...] | None:
    """What must match for requests to share a batch: names, dtypes, every dimension but the first.

    None when the inputs disagree on their first dimension (such a request runs alone).
    """
    rows = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
    if len(rows) != 1 or -1 in rows:
        return None
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


class VersionBatcher:
    """Dynamic batching of one model version through Ray Serve's ``@serve.batch``.

    Requests whose inputs agree on everything but the first dimension are concatenated into one engine
    call and split back by their row counts; others run on their own. Models whose inputs have no
    dynamic first dimension are never batched.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        max_batch_size: int,
        timeout_ms: float,
        observe: Callable[[str, float], None] = lambda kind, value: None,
    ) -> None:
        self.adapter = adapter
        self.observe = observe  # histograms: "queue"/"compute" seconds, "batch" rows
        sig = adapter.signature
        self.batchable = bool(sig and sig.inputs and all(t.shape and t.shape[0] == -1 for t in sig.inputs))
        self.max_batch_size = max_batch_size
        self.sizes: Counter[int] = Counter()  # engine calls per batch size (rows), for stats and metrics
        self._batched: Callable[[dict[str, np.ndarray]], Awaitable[Any]] = serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=timeout_ms / 1000,
            # a batch is sized in rows, so one 8-row request counts as 8
            batch_size_fn=lambda items: sum(_rows(i) for i in items),
        )(self._run_batch)

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate now (errors are this request's alone), then run in a batch."""
        checked = self.adapter.validate(inputs)
        if not self.batchable or _shape_key(checked) is None or _rows(checked) >= self.max_batch_size:
            return await self._engine(checked)
        queued = time.perf_counter()
        result = await self._batched(checked)
        if isinstance(result, BaseException):  # the batch handler hands each request its own outcome
            raise result
        outputs, started = result
        self.observe("queue", started - queued)
        return dict(outputs)

    async def _engine(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call, measured: its rows and its duration."""
        rows = _rows(inputs)
        self.sizes[rows] += 1
        self.observe("batch", rows)
        started = time.perf_counter()
        try:
            return await self.adapter.infer(inputs)
        finally:
            self.observe("compute", time.perf_counter() - started)

    async def _run_batch(self, items: list[dict[str, np.ndarray]]) -> list[Any]:
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(_shape_key(item), []).append(i)
        results: list[Any] = [{}] * len(items)  # (outputs, engine start) or the exception, per request
        for idx in groups.values():
            await self._run_group([items[i] for i in idx], idx, results)
        return results

    async def _run_group(self, group: list[dict[str, np.ndarray]], idx: list[int], results: list[Any]) -> None:
        merged = group[0] if len(group) == 1 else {n: np.concatenate([g[n] for g in group]) for n in group[0]}
        rows = [_rows(g) for g in group]
        started = time.perf_counter()
        try:
            out = await self._engine(merged)
        except Exception as exc:  # every request of the batch gets the engine's error
            for i in idx:
                results[i] = exc
            return
        total = sum(rows)
        if len(group) > 1 and not all(o.ndim and o.shape[0] == total for o in out.values()):
            # outputs are not batch-major: run each request on its own instead of guessing a split
            for i, g in zip(idx, group, strict=True):
                try:
                    results[i] = (await self._engine(g), started)
                except Exception as exc:
                    results[i] = exc
            return
        starts = np.cumsum([0, *rows])
        for k, i in enumerate(idx):
            results[i] = ({name: o[starts[k] : starts[k + 1]] for name, o in out.items()}, started)


def _rows(inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


class ServiceReplica:
    """Serves one service: every version's adapter loaded side by side, chosen per request by weight."""

    # Ray Serve awaits an async constructor, so loading every engine never blocks the replica's loop
    async def __init__(  # type: ignore[misc]
        self,
        service: str,
        versions: list[dict[str, Any]],
        num_cpus: float = 1.0,
        service_name: str | None = None,
        async_queue: dict[str, Any] | None = None,
        memory_mb: int | None = None,
    ) -> None:
        self.service = service
        self.name = service_name or service
        self.adapters: dict[str, ModelAdapter] = {}
        self.batchers: dict[str, VersionBatcher] = {}
        placement = _placement(num_cpus, memory_mb)
        for v in versions:
            # a registered model carries its engine config; a bare folder has it in config.json
            config = ModelConfig.model_validate(v["config"]) if v.get("config") else None
            adapter = await load_model(
                v["model_dir"], name=f"{self.name}:{v['version']}", placement=placement, config=config
            )
            self.adapters[v["version"]] = adapter
            if not hasattr(adapter, "forward"):
                self.batchers[v["version"]] = VersionBatcher(
                    adapter,
                    int(v.get("max_batch_size", 32)),
                    float(v.get("batch_timeout_ms", 0.0)),
                    observe=functools.partial(self._observe, v["version"]),
                )
        self._auth: dict[str, Any] | None = None
        # overload: at most max_queue_size requests held (running or waiting), each for request_timeout_s
        self.max_queue = max(int(v.get("max_queue_size", DEFAULT_MAX_QUEUE)) for v in versions)
        self.timeout_s = max(float(v.get("request_timeout_s", DEFAULT_TIMEOUT_S)) for v in versions)
        self.held = 0
        self._names: list[str] = list(self.adapters)
        self._weights: list[int] = [int(v.get("weight", 100)) for v in versions]
        self.tally = Tally(service)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.tally.run())]
        self.queue: AsyncQueue | None = None
        # a Custom engine's server gets every request verbatim (its adapter forwards raw HTTP)
        self.custom = hasattr(next(iter(self.adapters.values())), "forward")
        if async_queue and not self.custom:
            retention_s = float(async_queue.get("retention_s", 3600))
            self.queue = await asyncio.to_thread(open_queue, async_queue["url"], retention_s)
            self._lease_ms = int(float(async_queue.get("lease_s", ASYNC_LEASE_S)) * 1000)
            self._retention_ms = int(retention_s * 1000)
            self._tasks.append(loop.create_task(self._async_worker()))

    def _observe(self, version: str, kind: str, value: float) -> None:
        self.tally.observe(version, kind, value)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live traffic weights (``{"weights": {"1.0.0": 70, "2.0.0": 30}}``) and tokens; no reload, no loss."""
        self._auth = user_config.get("auth")
        weights = user_config.get("weights") or {}
        if weights:
            self._names = [v for v in self.adapters if v in weights]
            self._weights = [int(weights[v]) for v in self._names]

    def _pick(self, pinned: str | None) -> str:
        if pinned:
            if pinned not in self.adapters:
                raise UnknownVersion(self.name, pinned, list(self.adapters))
            return pinned
        return self._names[0] if len(self._names) == 1 else random.choices(self._names, self._weights)[0]

    async def __call__(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")
        path = request.url.path
        sub = (path[len(root) :] if root and path.startswith(root) else path) or "/"
        if not self._bounded(request.method, sub):
            return await self._serve(request, sub)
        if self.held >= self.max_queue:
            return http_response(self._overloaded())
        self.held += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._serve(request, sub)
        except TimeoutError:
            return http_response(self._timed_out())
        except asyncio.CancelledError:
            # Serve cancels a request whose client went away: it leaves the batch queue, counted as failed
            self.tally.add("", True)
            raise
        finally:
            self.held -= 1

    def _bounded(self, method: str, sub: str) -> bool:
        """Inference holds the engine and is bounded; probes, metadata and async intake are not."""
        if self.custom:
            return not sub.startswith("/v2/health/")
        return method == "POST" and not (sub == "/async" or sub.startswith("/async/"))

    def _overloaded(self) -> Reply:
        self.tally.add("", True)
        exc = Overloaded(
            f"service {self.name} is over capacity: this replica holds {self.held} requests "
            f"(max_queue_size {self.max_queue}); retry after {RETRY_AFTER_S} s"
        )
        status, headers, body = error_reply(exc)
        return status, {**headers, "Retry-After": str(RETRY_AFTER_S)}, body

    def _timed_out(self) -> Reply:
        self.tally.add("", True)
        return error_reply(
            TimedOut(f"service {self.name} did not answer within request_timeout_s {self.timeout_s:g} s; cancelled")
        )

    async def _serve(self, request: Request, sub: str) -> Response:
        try:
            body = await self._body(request) if request.method in ("POST", "PUT", "PATCH") else b""
        except EnginehouseError as exc:
            self.tally.add("", True)
            return http_response(error_reply(exc))
        if self.custom:  # straight through, so a streamed answer streams
            denied = self._denied(sub, request.headers)
            return http_response(denied) if denied else await self._stream(request, sub, body)
        return http_response(await self._handle(request.method, sub, request.headers, body, request.url.query))

    def _denied(self, sub: str, headers: Mapping[str, str]) -> Reply | None:
        """The 401/403 answer when auth is on and the token does not open this service; None when it does."""
        if self._auth is None or sub.startswith("/v2/health/"):  # probes need no token
            return None
        try:
            check_token(headers, self._auth["tokens"], self._auth["project"])
        except EnginehouseError as exc:
            self.tally.add("", True)
            return error_reply(exc)
        return None

    async def handle(self, method: str, sub: str, headers: Mapping[str, str], body: bytes, query: str = "") -> Reply:
        """One request from the ``/v2`` gateway's handle, under the same bounds as the HTTP ingress."""
        if not self._bounded(method, sub):
            return await self._handle(method, sub, headers, body, query)
        if self.held >= self.max_queue:
            return self._overloaded()
        self.held += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._handle(method, sub, headers, body, query)
        except TimeoutError:
            return self._timed_out()
        except asyncio.CancelledError:
            self.tally.add("", True)
            raise
        finally:
            self.held -= 1

    async def _handle(self, method: str, sub: str, headers: Mapping[str, str], body: bytes, query: str = "") -> Reply:
        """One request, transport-free: the HTTP ingress and the ``/v2`` gateway both land here."""
        denied = self._denied(sub, headers)
        if denied:
            return denied
        if self.custom:
            return await self._forward(method, sub, headers, body, query)
        if sub == "/async" or sub.startswith("/async/"):
            return await self._async(method, sub, headers, body)
        if method == "GET":
            try:
                return self._get(sub)
            except EnginehouseError as exc:
                return error_reply(exc)
        version, started = "", time.perf_counter()
        try:
            pinned = headers.get("x-model-version")
            if sub != "/":
                m = _OIP_MODEL.match(sub)
                if m is None or m["tail"] != "/infer":
                    raise UnknownRoute(f"{method} {sub} is not served; POST / or /v2/models/{self.name}/infer")
                self._check_model(m["name"])
                pinned = m["version"] or pinned
            version = self._pick(pinned)
            reply = await self._infer(version, headers, body)
        except EnginehouseError as exc:
            self.tally.add(version, True, time.perf_counter() - started)
            return error_reply(exc)
        self.tally.add(version, False, time.perf_counter() - started)
        return reply

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise BodyTooLarge(f"the body of {length} bytes is over the limit of {MAX_BODY} bytes")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise BodyTooLarge(f"the body of {len(body)} bytes is over the limit of {MAX_BODY} bytes")
        return body

    def _decode(self, version: str, body: bytes, header: str | None) -> tuple[dict[str, np.ndarray], dict]:
        signature = self.batchers[version].adapter.signature
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidInputError(
                    self.name, f"Inference-Header-Content-Length {header!r} is not an integer"
                ) from None
            return decode_binary(self.name, body, header_length, signature)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInputError(self.name, f"body is not valid JSON: {exc}") from None
        return decode_request(self.name, payload, signature)

    async def _infer(self, version: str, headers: Mapping[str, str], body: bytes) -> Reply:
        inputs, meta = self._decode(version, body, headers.get(HEADER_LENGTH))
        outputs = await self.batchers[version].infer(inputs)
        binary = wants_binary_output(meta) if not meta.get("instances") else False
        if binary:
            content, header_len = encode_binary(self.name, version, outputs, meta, binary)
            return 200, {"content-type": "application/octet-stream", HEADER_LENGTH: str(header_len)}, content
        return 200, {"content-type": JSON}, orjson.dumps(encode_response(self.name, version, outputs, meta))

    # async mode ------------------------------------------------------------------------------------------
    async def _async(self, method: str, sub: str, headers: Mapping[str, str], body: bytes) -> Reply:
        if self.queue is None:
            return json_reply({"error": f"service {self.name} has no async queue"}, 404)
        if method == "GET":
            if sub == "/async":  # the queue's depth
                return json_reply(await asyncio.to_thread(self.queue.depth, self.service))
            rid = sub.removeprefix("/async/")
            found = await asyncio.to_thread(self.queue.get, self.service, rid)
            return (
                json_reply(found)
                if found
                else json_reply({"error": f"no async request {rid} (unknown or expired)"}, 404)
            )
        if sub != "/async":
            return json_reply({"error": f"{method} {sub} is not served; POST /async"}, 404)
        version = ""
        pinned, header = headers.get("x-model-version"), headers.get(HEADER_LENGTH)
        try:
            version = self._pick(pinned)
            inputs, _ = self._decode(version, body, header)
            self.batchers[version].adapter.validate(inputs)  # bad input is refused now, not after the 202
        except EnginehouseError as exc:
            self.tally.add(version, True)
            return error_reply(exc)
        kept = {k: v for k, v in (("x-model-version", pinned), (HEADER_LENGTH, header)) if v is not None}
        rid = await asyncio.to_thread(self.queue.put, self.service, body, kept)  # durable before the 202
        return json_reply({"request_id": rid, "status": "queued"}, 202)

    async def _async_worker(self) -> None:
        """Claim and run queued requests of this service, a few at a time, until the replica stops."""
        assert self.queue is not None
        queue = self.queue
        slots = asyncio.Semaphore(ASYNC_CONCURRENCY)
        expired_at = 0.0
        while True:
            try:
                if time.monotonic() - expired_at > 60:
                    expired_at = time.monotonic()
                    await asyncio.to_thread(queue.expire, int(time.time() * 1000) - self._retention_ms)
                if not await asyncio.to_thread(queue.has_work, self.service):
                    await asyncio.sleep(ASYNC_POLL_S)
                    continue
                await slots.acquire()
                claimed = await asyncio.to_thread(queue.claim, self.service, self._lease_ms)
                if claimed is None:
                    slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run_async(claimed))
                task.add_done_callback(lambda _: slots.release())
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is away for a moment: nothing is lost, try again
                await asyncio.sleep(1.0)

    async def _run_async(self, claimed: Claimed) -> None:
        assert self.queue is not None
        queue, renew_every = self.queue, self._lease_ms / 3000

        async def keep_lease() -> None:
            while True:
                await asyncio.sleep(renew_every)
                await asyncio.to_thread(queue.renew, claimed.request_id, claimed.claim, self._lease_ms)

        renewer = asyncio.get_running_loop().create_task(keep_lease())
        version, result, error = "", None, None
        try:
            version = self._pick(claimed.headers.get("x-model-version"))
            inputs, meta = self._decode(version, claimed.body, claimed.headers.get(HEADER_LENGTH))
            outputs = await self.batchers[version].infer(inputs)
            result = encode_response(self.name, version, outputs, meta)
        except EnginehouseError as exc:
            error = exc.message
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            renewer.cancel()
        if await asyncio.to_thread(queue.finish, claimed.request_id, claimed.claim, result, error):
            self.tally.add(version, error is not None)  # counted once, by the run whose result landed

    def _check_model(self, name: str) -> None:
        if name not in (self.name, self.service):
            raise UnknownRoute(f"this service serves model {self.name}, not {name}")

    def _get(self, sub: str) -> Reply:
        if sub in ("/v2/health/live", "/v2/health/live/"):
            return json_reply({"live": True})
        if sub in ("/v2/health/ready", "/v2/health/ready/"):
            ready = all(a.ready for a in self.adapters.values())
            return json_reply({"ready": ready}, 200 if ready else 503)
        if sub in ("/v2", "/v2/"):
            return json_reply(SERVER_METADATA)
        m = _OIP_MODEL.match(sub)
        if m is None or m["tail"] == "/infer":
            raise UnknownRoute(f"GET {sub} is not served")
        self._check_model(m["name"])
        versions = [m["version"]] if m["version"] else list(self.adapters)
        if m["version"] and m["version"] not in self.adapters:
            raise UnknownVersion(self.name, m["version"], list(self.adapters))
        if m["tail"] == "/ready":
            ready = all(self.adapters[v].ready for v in versions)
            return json_reply({"name": self.name, "ready": ready}, 200 if ready else 503)
        if m["tail"] == "/stats":  # Triton's statistics extension, for this replica
            return json_reply({"model_stats": [self._stats(v) for v in versions]})
        adapter = self.adapters[versions[0] if m["version"] else self._pick(None)]
        if adapter.signature is None or not adapter.ready:
            raise ModelNotReadyError(self.name)
        return json_reply(
            {
                "name": self.name,
                "versions": versions,
                "platform": adapter.engine,
                **adapter.signature.as_dict(),
            }
        )

    def _stats(self, version: str) -> dict[str, Any]:
        batcher = self.batchers.get(version)
        sizes = batcher.sizes if batcher else Counter()
        return {
            "name": self.name,
            "version": version,
            "inference_count": sum(n * c for n, c in sizes.items()),
            "execution_count": sum(sizes.values()),
            "batch_stats": [{"batch_size": n, "compute_infer": {"count": c}} for n, c in sorted(sizes.items())],
        }

    async def _forward(self, method: str, sub: str, headers: Mapping[str, str], body: bytes, query: str) -> Reply:
        version = ""
        try:
            version = self._pick(headers.get("x-model-version"))
            adapter: Any = self.adapters[version]
            status, out_headers, content = await adapter.forward(method, sub, dict(headers), body, query)
        except EnginehouseError as exc:
            self.tally.add(version, True)
            return error_reply(exc)
        self.tally.add(version, status >= 400)
        return status, dict(out_headers), content

    async def _stream(self, request: Request, sub: str, body: bytes) -> Response:
        """A Custom engine's answer as it comes: buffered when the server gave its length, streamed if not."""
        version = ""
        try:
            version = self._pick(request.headers.get("x-model-version"))
            adapter: Any = self.adapters[version]
            status, headers, chunks, length = await adapter.forward_stream(
                request.method, sub, dict(request.headers), body, request.url.query
            )
            content = None if length is None else b"".join([c async for c in chunks])
        except EnginehouseError as exc:
            self.tally.add(version, True)
            return http_response(error_reply(exc))
        self.tally.add(version, status >= 400)  # a stream that breaks later is the server's failure to report
        if content is None:
            return StreamingResponse(chunks, status_code=status, headers=headers)
        return Response(content, status_code=status, headers=headers)

    async def check_health(self) -> None:
        """Ray Serve's health probe: every adapter must say it is healthy, else the replica restarts."""
        for version, adapter in self.adapters.items():
            if not await adapter.health():
                raise RuntimeError(f"{self.name} version {version} is unhealthy")

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.tally.flush()  # hand over what this replica counted before it goes
        for adapter in self.adapters.values():
            await adapter.unload()


def build_app(
    service: str,
    versions: list[dict[str, Any]],
    actor_options: dict[str, Any],
    service_name: str | None = None,
    async_queue: dict[str, Any] | None = None,
) -> serve.Application:
    """The Ray Serve application of one service: ingress replicas that run the engines themselves.

    Replica counts, autoscaling and weights come from the config's ``deployments`` entry (see
    ``serving.dataplane.deploy.service_app``), so they change without a new code version.
    """
    held = max((int(v.get("max_queue_size", DEFAULT_MAX_QUEUE)) for v in versions), default=DEFAULT_MAX_QUEUE)
    deployment = serve.deployment(
        name="replica",
        # every request the replica may hold reaches it (batching needs many in flight), plus a margin that
        # it answers 503 at once instead of letting them wait, unbounded, in front of it
        max_ongoing_requests=int(os.environ.get("ENGINEHOUSE_MAX_ONGOING", str(held + 16))),
        ray_actor_options=actor_options,
    )(ServiceReplica)
    memory = actor_options.get("memory")
    return deployment.bind(
        service,
        versions,
        float(actor_options.get("num_cpus", 1.0)),
        service_name,
        async_queue,
        int(memory) // (1024 * 1024) if memory else None,
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder named by the declarative config (see ``serving.dataplane.deploy``)."""
    return build_app(
        args["service"],
        args["versions"],
        dict(args.get("actor_options") or {"num_cpus": 1.0}),
        args.get("service_name"),
        args.get("async_queue"),
    )
