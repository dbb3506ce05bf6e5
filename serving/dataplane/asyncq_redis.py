"""The async request queue in Redis (``ENGINEHOUSE_ASYNC_URL=redis://host:port/db``).

Per request a hash ``eh:req:{id}``; per service a list ``eh:q:{service}`` of queued ids and a sorted set
``eh:run:{service}`` of running ids scored by lease end. Claiming, renewing and finishing are Lua
scripts, so each is atomic in Redis: a claim first puts requests whose lease ran out back at the head
of the queue, and ``finish`` lands only while the claim is the caller's. Finished requests expire after
the retention time with Redis's own TTL. Redis must persist (AOF or RDB) for the queue to survive a
Redis restart; that is Redis's configuration, not ours.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import redis

from serving.dataplane.asyncq import Claimed, now_ms, view

_CLAIM = """
local q, run, now, lease, token = KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', run, '-inf', now)) do
  redis.call('ZREM', run, rid)
  redis.call('LPUSH', q, rid)
end
local rid = redis.call('LPOP', q)
if not rid then return nil end
local key = 'eh:req:' .. rid
local attempts = redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'status', 'running', 'claim', token, 'updated_at', now)
redis.call('ZADD', run, now + lease, rid)
return {rid, redis.call('HGET', key, 'body'), redis.call('HGET', key, 'headers'), attempts}
"""
_RENEW = """
local key = 'eh:req:' .. ARGV[1]
if redis.call('HGET', key, 'claim') ~= ARGV[2] or redis.call('HGET', key, 'status') ~= 'running' then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
return 1
"""
_FINISH = """
local key = 'eh:req:' .. ARGV[1]
if redis.call('HGET', key, 'claim') ~= ARGV[2] or redis.call('HGET', key, 'status') ~= 'running' then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', key, 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5], 'body', '', 'updated_at', ARGV[6])
redis.call('EXPIRE', key, tonumber(ARGV[7]))
return 1
"""


class RedisQueue:
    """``serving.dataplane.asyncq.AsyncQueue`` on Redis."""

    def __init__(self, url: str, retention_s: float = 3600) -> None:
        self.r = redis.Redis.from_url(url)
        self.retention_s = int(retention_s)
        self._claim = self.r.register_script(_CLAIM)
        self._renew = self.r.register_script(_RENEW)
        self._finish = self.r.register_script(_FINISH)

    def put(self, service_id: str, body: bytes, headers: dict[str, str]) -> str:
        """Persist an accepted request and queue it, in one transaction."""
        rid, t = str(uuid.uuid4()), now_ms()
        fields = {
            "service_id": service_id,
            "status": "queued",
            "body": body,
            "headers": orjson.dumps(headers),
            "created_at": t,
            "updated_at": t,
            "attempts": 0,
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(f"eh:req:{rid}", mapping=fields)  # type: ignore[arg-type]
        pipe.rpush(f"eh:q:{service_id}", rid)
        pipe.execute()
        return rid

    def get(self, service_id: str, request_id: str) -> dict[str, Any] | None:
        """The request's status and outcome, or None when unknown (or expired)."""
        got: list[Any] = self.r.hmget(f"eh:req:{request_id}", "service_id", "status", "result", "error")
        sid, status, result, error = got
        if sid is None or sid.decode() != service_id:
            return None
        return view(request_id, status.decode(), result or None, error.decode() if error else None)

    def has_work(self, service_id: str) -> bool:
        """Something queued, or a lease run out."""
        return bool(self.r.llen(f"eh:q:{service_id}")) or bool(self.r.zcount(f"eh:run:{service_id}", "-inf", now_ms()))

    def claim(self, service_id: str, lease_ms: int) -> Claimed | None:
        """Take the oldest runnable request under a fresh lease."""
        token = uuid.uuid4().hex
        got = self._claim(keys=[f"eh:q:{service_id}", f"eh:run:{service_id}"], args=[now_ms(), lease_ms, token])
        if not got:
            return None
        rid, body, headers, attempts = got
        return Claimed(rid.decode(), token, body or b"", orjson.loads(headers), int(attempts))

    def renew(self, request_id: str, claim: str, lease_ms: int) -> bool:
        """Extend the lease while the engine runs; False when the claim was lost."""
        sid: Any = self.r.hget(f"eh:req:{request_id}", "service_id")
        if sid is None:
            return False
        return bool(self._renew(keys=[f"eh:run:{sid.decode()}"], args=[request_id, claim, now_ms() + lease_ms]))

    def finish(self, request_id: str, claim: str, result: Any | None, error: str | None) -> bool:
        """Commit the outcome once: only while the claim is still ours."""
        sid: Any = self.r.hget(f"eh:req:{request_id}", "service_id")
        if sid is None:
            return False
        status = "failed" if error is not None else "succeeded"
        payload = b"" if result is None else orjson.dumps(result)
        args: list[Any] = [request_id, claim, status, payload, error or "", now_ms(), self.retention_s]
        return bool(self._finish(keys=[f"eh:run:{sid.decode()}"], args=args))

    def depth(self, service_id: str) -> dict[str, int]:
        """How many requests wait and run."""
        return {"queued": int(self.r.llen(f"eh:q:{service_id}")), "running": int(self.r.zcard(f"eh:run:{service_id}"))}

    def expire(self, older_than_ms: int) -> int:
        """Nothing to do: finished requests carry a Redis TTL."""
        del older_than_ms
        return 0


def wait_ready(url: str, timeout_s: float = 10.0) -> None:
    """Block until Redis answers PING (for start-up and tests)."""
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
