"""Exact invocation counters, off the request path.

A replica adds to an in-memory tally per model version (one dict update per request). Every
``FLUSH_S`` it cuts the tally into a numbered batch and hands its unacknowledged batches to the
``CounterSink`` actor, which keeps them until the control plane has committed them to the registry
(``Registry.apply_counts`` skips a ``(source, batch_id)`` it has seen, in the same transaction as the
increments). A batch leaves the replica only once the sink says it is committed, so a dead sink, a
restarted control plane or a lost answer never loses or doubles a count; only the tally of a replica
killed in its last ``FLUSH_S`` is lost with it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import uuid
from typing import Any

import ray

log = logging.getLogger("enginehouse.counters")

SINK_NAME = "enginehouse-counters"
SINK_NAMESPACE = "enginehouse"
FLUSH_S = 0.5
Deltas = dict[str, tuple[int, int]]  # model version -> (invocations, failures)
#: histogram buckets (upper bounds): durations in seconds, batch sizes in rows
SECONDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BUCKETS = {"request": SECONDS, "queue": SECONDS, "compute": SECONDS, "batch": ROWS}
#: version -> kind -> (count per bucket, the last one above every bound; sum of the observations)
Hists = dict[str, dict[str, tuple[list[int], float]]]


@ray.remote(num_cpus=0, max_restarts=0)
class CounterSink:
    """Holds replicas' count batches until the control plane commits them (it owns this actor)."""

    def __init__(self) -> None:
        self.batches: dict[tuple[str, int], tuple[str, Deltas, Hists]] = {}
        self.committed: dict[str, int] = {}

    def report(self, source: str, service_id: str, batches: list[tuple[int, Deltas, Hists]]) -> int:
        """Store batches not yet committed; answers the highest committed batch id of ``source``."""
        done = self.committed.get(source, 0)
        for batch_id, deltas, hists in batches:
            if batch_id > done:
                self.batches[(source, batch_id)] = (service_id, deltas, hists)
        return done

    def take(self) -> list[tuple[str, int, str, Deltas, Hists]]:
        """Every stored batch, oldest first per source: ``(source, batch_id, service_id, deltas, hists)``."""
        return [(s, b, sid, d, h) for (s, b), (sid, d, h) in sorted(self.batches.items())]

    def commit(self, source: str, batch_id: int) -> None:
        """The control plane wrote every batch of ``source`` up to ``batch_id``."""
        self.committed[source] = max(self.committed.get(source, 0), batch_id)
        for key in [k for k in self.batches if k[0] == source and k[1] <= batch_id]:
            del self.batches[key]


def start_sink() -> Any:
    """The sink for this cluster, created by the control plane (a restarted one gets a new, empty sink)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return CounterSink.options(  # type: ignore[attr-defined]
        name=SINK_NAME,
        namespace=SINK_NAMESPACE,
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True),
    ).remote()


def drain(sink: Any, apply: Any, observe: Any = None) -> int:
    """Commit every batch the sink holds through ``apply(source, batch_id, {(service, version): deltas})``;
    ``observe(service_id, hists)`` gets the histograms of each batch ``apply`` took (so once).

    Returns how many batches were written (those seen before are skipped by ``apply``).
    """
    written = 0
    for source, batch_id, service_id, deltas, hists in ray.get(sink.take.remote()):
        if apply(source, batch_id, {(service_id, v): d for v, d in deltas.items()}):
            written += 1
            if observe is not None:
                observe(service_id, hists)
        ray.get(sink.commit.remote(source, batch_id))
    return written


class Tally:
    """A replica's counts: ``add`` on the request path, ``flush`` from a background task."""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        self.source = f"{service_id}/{uuid.uuid4().hex}"  # one per replica life: batch ids restart at 1
        self.pending: dict[str, list[int]] = {}
        self.hists: Hists = {}
        self.unacked: list[tuple[int, Deltas, Hists]] = []
        self.next_id = 1
        self._sink: Any = None

    def add(self, version: str, failed: bool, seconds: float | None = None) -> None:
        """Count one call that reached the service (``version`` is "" when none could be chosen)."""
        slot = self.pending.get(version)
        if slot is None:
            slot = self.pending[version] = [0, 0]
        slot[0] += 1
        slot[1] += failed
        if seconds is not None:
            self.observe(version, "request", seconds)

    def observe(self, version: str, kind: str, value: float) -> None:
        """One observation of a histogram (``request``/``queue``/``compute`` seconds, ``batch`` rows)."""
        per_version = self.hists.setdefault(version, {})
        bounds = BUCKETS[kind]
        counts, total = per_version.get(kind) or ([0] * (len(bounds) + 1), 0.0)
        counts[bisect.bisect_left(bounds, value)] += 1
        per_version[kind] = (counts, total + value)

    def cut(self) -> None:
        """Move the pending tally into a new numbered batch."""
        if self.pending or self.hists:
            deltas = {v: (c[0], c[1]) for v, c in self.pending.items()}
            self.unacked.append((self.next_id, deltas, self.hists))
            self.next_id += 1
            self.pending, self.hists = {}, {}

    async def flush(self) -> None:
        """Send unacknowledged batches; drop the ones the sink says are committed."""
        self.cut()
        if not self.unacked:
            return
        try:
            if self._sink is None:
                self._sink = ray.get_actor(SINK_NAME, namespace=SINK_NAMESPACE)
            done = await self._sink.report.remote(self.source, self.service_id, self.unacked)
        except Exception:  # no control plane right now: keep the batches and try again
            self._sink = None
            return
        self.unacked = [batch for batch in self.unacked if batch[0] > done]

    async def run(self) -> None:
        """Flush every ``FLUSH_S`` until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()
