"""The async request queue: durable, claimed by replicas under a lease, each result committed once.

``POST {access_address}/async`` stores the request (``put``) before answering 202. Every replica of the
service runs a worker that ``claim``s the oldest queued request (or one whose lease ran out: its replica
died), keeps the lease alive while the engine runs (``renew``), and commits the outcome with ``finish``,
which only lands while the claim is still the worker's, so a request's result is written exactly once
even when a slow replica and its successor both ran it. Backends: the registry's database (SQLAlchemy,
the default; a table written only by the data plane) or Redis.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from serving.registry.schema import AsyncRequest as A

STATUSES = ("queued", "running", "succeeded", "failed")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Claimed:
    """A request a worker holds: run it, then ``finish`` with this claim."""

    request_id: str
    claim: str
    body: bytes
    headers: dict[str, str]
    attempts: int


class AsyncQueue(Protocol):
    """What a replica needs of the store."""

    def put(self, service_id: str, body: bytes, headers: dict[str, str]) -> str: ...
    def get(self, service_id: str, request_id: str) -> dict[str, Any] | None: ...
    def has_work(self, service_id: str) -> bool: ...
    def claim(self, service_id: str, lease_ms: int) -> Claimed | None: ...
    def renew(self, request_id: str, claim: str, lease_ms: int) -> bool: ...
    def finish(self, request_id: str, claim: str, result: Any | None, error: str | None) -> bool: ...
    def depth(self, service_id: str) -> dict[str, int]: ...
    def expire(self, older_than_ms: int) -> int: ...


def view(request_id: str, status: str, result: bytes | None, error: str | None) -> dict[str, Any]:
    """The GET answer: status, and the result or the error once there is one."""
    out: dict[str, Any] = {"request_id": request_id, "status": status}
    if status == "succeeded" and result is not None:
        out["result"] = orjson.loads(result)
    if status == "failed":
        out["error"] = error
    return out


class SqlQueue:
    """The queue in the registry's database (the ``async_requests`` table of migration 0003)."""

    def __init__(self, url: str) -> None:
        from serving.registry.db import _make_engine

        self.engine = _make_engine(url)

    def put(self, service_id: str, body: bytes, headers: dict[str, str]) -> str:
        """Persist an accepted request; returns its id (the 202 is sent after this commits)."""
        rid, t = str(uuid.uuid4()), now_ms()
        with self.engine.begin() as c:
            c.execute(
                insert(A).values(
                    request_id=rid,
                    service_id=service_id,
                    status="queued",
                    body=body,
                    headers=headers,
                    created_at=t,
                    updated_at=t,
                    attempts=0,
                )
            )
        return rid

    def get(self, service_id: str, request_id: str) -> dict[str, Any] | None:
        """The request's status and outcome, or None when unknown (or expired)."""
        with self.engine.connect() as c:
            row = c.execute(
                select(A.status, A.result, A.error).where(A.request_id == request_id, A.service_id == service_id)
            ).first()
        return None if row is None else view(request_id, row.status, row.result, row.error)

    def _runnable(self, service_id: str, t: int) -> ColumnElement[bool]:
        return and_(
            A.service_id == service_id,
            or_(A.status == "queued", and_(A.status == "running", A.lease_until < t)),
        )

    def has_work(self, service_id: str) -> bool:
        """A cheap read (no write lock) before trying to claim."""
        with self.engine.connect() as c:
            return (
                c.execute(select(A.request_id).where(self._runnable(service_id, now_ms())).limit(1)).first() is not None
            )

    def claim(self, service_id: str, lease_ms: int) -> Claimed | None:
        """Take the oldest runnable request under a fresh lease (one writer at a time: BEGIN IMMEDIATE)."""
        t = now_ms()
        token = uuid.uuid4().hex
        with self.engine.begin() as c:
            row = c.execute(
                select(A.request_id, A.body, A.headers, A.attempts)
                .where(self._runnable(service_id, t))
                .order_by(A.created_at)
                .limit(1)
            ).first()
            if row is None:
                return None
            c.execute(
                update(A)
                .where(A.request_id == row.request_id)
                .values(
                    status="running", claim=token, lease_until=t + lease_ms, attempts=row.attempts + 1, updated_at=t
                )
            )
        return Claimed(row.request_id, token, row.body, dict(row.headers), row.attempts + 1)

    def renew(self, request_id: str, claim: str, lease_ms: int) -> bool:
        """Extend the lease while the engine runs; False when the claim was lost."""
        with self.engine.begin() as c:
            res = c.execute(
                update(A)
                .where(A.request_id == request_id, A.claim == claim, A.status == "running")
                .values(lease_until=now_ms() + lease_ms)
            )
        return bool(res.rowcount)

    def finish(self, request_id: str, claim: str, result: Any | None, error: str | None) -> bool:
        """Commit the outcome once: only while the claim is still ours and the request still running."""
        values: dict[str, Any] = {"status": "failed" if error is not None else "succeeded", "updated_at": now_ms()}
        values.update(result=None if result is None else orjson.dumps(result), error=error, body=b"")
        with self.engine.begin() as c:
            res = c.execute(
                update(A).where(A.request_id == request_id, A.claim == claim, A.status == "running").values(**values)
            )
        return bool(res.rowcount)

    def depth(self, service_id: str) -> dict[str, int]:
        """How many requests wait (``queued``) and run (``running``)."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(A.status, func.count())
                .where(A.service_id == service_id, A.status.in_(("queued", "running")))
                .group_by(A.status)
            ).all()
        counts = {"queued": 0, "running": 0}
        counts.update({status: int(n) for status, n in rows})
        return counts

    def expire(self, older_than_ms: int) -> int:
        """Forget finished requests last updated before ``older_than_ms``; returns how many."""
        with self.engine.begin() as c:
            res = c.execute(delete(A).where(A.status.in_(("succeeded", "failed")), A.updated_at < older_than_ms))
        return int(res.rowcount)


def open_queue(url: str, retention_s: float = 3600) -> AsyncQueue:
    """The queue behind ``url``: ``redis://...`` for Redis, any SQLAlchemy URL otherwise."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from serving.dataplane.asyncq_redis import RedisQueue

        return RedisQueue(url, retention_s)
    return SqlQueue(url)
