"""The cluster as the control plane shows it: Ray's nodes as a ModelArts NodeList, one pool, deployable flavours.

Resources keep Ray's keys and units in :class:`NodeInfo` ("CPU", "memory" in bytes, "GPU", NPU keys such as
"huawei.com/ascend-snt9"); only the API shapes convert them to ModelArts quantities ("3920m", "6270Mi").
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import ray
from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from runtimes.errors import EnginehouseError

POOL_NAME = "default"
_MB = 2**20
_CPU_MEMORY_MB = 2048  # per CPU of a local.cpu.{n}u flavour
_ACCEL_CPU, _ACCEL_MEMORY_MB = 1, 4096  # host share per whole accelerator (at least one) of a GPU/NPU flavour
_first_seen: dict[str, float] = {}


class UnknownSpecification(EnginehouseError):
    """A flavour name this cluster does not offer."""

    status_code = 400
    error_code = "EH.0401"


class PoolNotFound(EnginehouseError):
    """A pool other than the one the cluster is."""

    status_code = 404
    error_code = "EH.0402"


@dataclass(frozen=True)
class NodeInfo:
    """One Ray node with its resources in Ray's keys and units (memory in bytes)."""

    node_id: str
    name: str
    ip: str
    alive: bool
    created: datetime
    total: dict[str, float]
    available: dict[str, float]


def _gcs_details() -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Available resources and start time (epoch seconds) per node id."""
    # Ray 2.60 has no public per-node view of either: ray.available_resources() sums the whole cluster and
    # ray.util.state needs the dashboard, which the embedded Ray does not start. available_resources_per_node
    # is a DeveloperAPI (Ray's TPU utilities use it) and the GCS client is what Serve's scheduler reads.
    from ray._private.state import available_resources_per_node
    from ray._private.worker import global_worker

    infos = global_worker.gcs_client.get_all_node_info(timeout=10)  # type: ignore[attr-defined]  # set by ray.init
    started = {nid.hex(): info.start_time_ms / 1000 for nid, info in infos.items() if info.start_time_ms}
    return available_resources_per_node(), started


def ray_nodes() -> list[NodeInfo]:
    """Every node of the connected Ray cluster, dead ones included, oldest first."""
    available, started = _gcs_details()
    nodes = []
    for raw in ray.nodes():
        node_id, alive = raw["NodeID"], bool(raw["Alive"])
        total = {k: float(v) for k, v in raw["Resources"].items() if not k.startswith(("node:", "accelerator_type:"))}
        free = available.get(node_id, {}) if alive else {}  # Ray leaves out a resource that is all in use
        created = started.get(node_id) or _first_seen.setdefault(node_id, time.time())
        nodes.append(
            NodeInfo(
                node_id=node_id,
                name=f"{raw['NodeManagerHostname']}-{node_id[:8]}".lower(),  # hostnames repeat on one machine
                ip=raw["NodeManagerAddress"],
                alive=alive,
                created=datetime.fromtimestamp(created, UTC),
                total=total,
                available={k: float(free.get(k, 0.0)) for k in total},
            )
        )
    return sorted(nodes, key=lambda n: (n.created, n.node_id))


def npu_keys(resources: Iterable[str]) -> list[str]:
    """The NPU resource keys among Ray resource names, sorted."""
    # NPU plugins name their resource like a Kubernetes extended resource ("vendor.domain/device"); Ray's own
    # and user-defined custom resources do not carry a "/"
    return sorted(k for k in resources if "/" in k)


def _quantities(values: dict[str, float], like: dict[str, float]) -> dict[str, str]:
    # `like` (the node's totals) decides which keys appear, so a node with all its GPUs in use still shows "0"
    out = {"cpu": f"{round(values.get('CPU', 0.0) * 1000)}m", "memory": f"{int(values.get('memory', 0.0) // _MB)}Mi"}
    if like.get("GPU", 0.0) > 0:
        out["nvidia.com/gpu"] = f"{values.get('GPU', 0.0):g}"  # a shared GPU leaves a fraction available
    for key in npu_keys(like):
        out[key] = str(int(values.get(key, 0.0)))
    return out


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _node_flavor(total: dict[str, float]) -> str:
    if total.get("GPU", 0.0) > 0:
        return f"local.gpu.{total['GPU']:g}"
    npus = npu_keys(total)
    if npus:
        return f"local.npu.{int(total[npus[0]])}"
    return f"local.cpu.{total.get('CPU', 0.0):g}u"


def _offset(token: str | None, count: int) -> int:
    if not token:  # Kubernetes-style clients send continue="" for the first page
        return 0
    if not re.fullmatch(r"\d{1,9}", token) or int(token) > count:
        raise ValueError(f"continue token {token!r} is not valid: pass metadata.continue of the previous page")
    return int(token)


def node_list(nodes: list[NodeInfo], limit: int | None, continue_token: str | None) -> dict[str, Any]:
    """One page of ``nodes`` as a ModelArts NodeList; ``metadata.continue`` is set while more pages follow."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    ordered = sorted(nodes, key=lambda n: (n.created, n.node_id))  # new nodes join at the end: pages stay put
    start = _offset(continue_token, len(ordered))
    end = len(ordered) if limit is None else min(len(ordered), start + limit)
    metadata: dict[str, Any] = {}
    if end < len(ordered):
        metadata = {"continue": str(end), "remainingItemCount": len(ordered) - end}
    items = [
        {
            "kind": "Node",
            "apiVersion": "v2",
            "metadata": {"name": n.name, "creationTimestamp": _iso(n.created)},
            "spec": {"flavor": _node_flavor(n.total)},
            "status": {
                "phase": "Available" if n.alive else "Abnormal",
                "privateIp": n.ip,
                "resources": _quantities(n.total, n.total),
                "availableResources": _quantities(n.available, n.total),
            },
        }
        for n in ordered[start:end]
    ]
    return {"kind": "NodeList", "apiVersion": "v2", "metadata": metadata, "items": items}


def _sum(resources: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for res in resources:
        for key, value in res.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _flavor_counts(nodes: list[NodeInfo]) -> list[dict[str, Any]]:
    counts = Counter(_node_flavor(n.total) for n in nodes)
    return [{"flavor": flavor, "count": count} for flavor, count in sorted(counts.items())]


def pool_list(nodes: list[NodeInfo]) -> dict[str, Any]:
    """The cluster as the single pool ``default``: node flavours and counts, capacity and what is free."""
    alive = [n for n in nodes if n.alive]
    total = _sum(n.total for n in alive)
    pool = {
        "kind": "Pool",
        "apiVersion": "v2",
        "metadata": {
            "name": POOL_NAME,
            "creationTimestamp": _iso(min((n.created for n in nodes), default=datetime.now(UTC))),
        },
        "spec": {"type": "Dedicate", "scope": ["Infer"], "resources": _flavor_counts(nodes)},
        "status": {
            "phase": "Running" if alive else "Abnormal",
            "resources": {
                "available": _flavor_counts(alive),
                "abnormal": _flavor_counts([n for n in nodes if not n.alive]),
            },
            "capacity": _quantities(total, total),
            "availableResources": _quantities(_sum(n.available for n in alive), total),
        },
    }
    return {"kind": "PoolList", "apiVersion": "v2", "items": [pool]}


def _spec(name: str, cpu: float, memory_mb: int, gpu: float = 0.0, npu: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "specification": name,
        "spec_status": "normal",
        "is_open": True,
        "source_type": "",
        "over_quota": False,
        "extend_params": None,
        "cpu": float(cpu),
        "memory": int(memory_mb),
        "gpu": float(gpu),
        "npu": dict(npu or {}),
    }


def _fits(spec: dict[str, Any], node: NodeInfo) -> bool:
    t = node.total
    return (
        spec["cpu"] <= t.get("CPU", 0.0)
        and spec["memory"] * _MB <= t.get("memory", 0.0)
        and spec["gpu"] <= t.get("GPU", 0.0)
        and all(n <= t.get(key, 0.0) for key, n in spec["npu"].items())
    )


def _doublings(most: float) -> list[int]:
    out, n = [], 1
    while n <= most:
        out.append(n)
        n *= 2
    return out


def specifications(nodes: list[NodeInfo]) -> list[dict[str, Any]]:
    """The deployable flavours: those that fit on at least one alive node, then ``custom``."""
    alive = [n for n in nodes if n.alive]

    def most(key: str) -> float:
        return max((n.total.get(key, 0.0) for n in alive), default=0.0)

    candidates = [_spec(f"local.cpu.{n}u", n, n * _CPU_MEMORY_MB) for n in _doublings(most("CPU"))]
    if most("GPU") > 0:
        for g in [0.5, *_doublings(most("GPU"))]:
            share = max(1, int(g))
            candidates.append(_spec(f"local.gpu.{g:g}", share * _ACCEL_CPU, share * _ACCEL_MEMORY_MB, gpu=g))
    keys = npu_keys({k for n in alive for k in n.total})
    for key in keys:
        # the short name stays while the cluster has one NPU kind; several kinds need the device in the name
        prefix = "local.npu" if len(keys) == 1 else f"local.{key.rsplit('/', 1)[-1]}"
        for n in _doublings(most(key)):
            candidates.append(_spec(f"{prefix}.{n}", n * _ACCEL_CPU, n * _ACCEL_MEMORY_MB, npu={key: n}))
    fitting = [s for s in candidates if any(_fits(s, node) for node in alive)]
    custom = {**_spec("custom", 0, 0), "note": "resources from custom_spec: cpu, memory (MB), gpu_p4, ascend_a310"}
    return [*fitting, custom]


def flavour_resources(name: str, nodes: list[NodeInfo]) -> dict[str, Any]:
    """What one replica of flavour ``name`` reserves: ``cpu``, ``memory`` (MB), ``gpu``, ``npu`` per key."""
    if name == "custom":
        raise ValueError("specification custom takes its resources from custom_spec, not from a flavour")
    specs = {s["specification"]: s for s in specifications(nodes) if s["specification"] != "custom"}
    spec = specs.get(name)
    if spec is None:
        raise UnknownSpecification(
            f"unknown specification {name!r}: this cluster offers {', '.join([*specs, 'custom'])}"
        )
    return {"cpu": spec["cpu"], "memory": spec["memory"], "gpu": spec["gpu"], "npu": dict(spec["npu"])}


router = APIRouter()


@router.get("/v2/{project_id}/pools")
async def get_pools(project_id: str) -> dict[str, Any]:
    """The cluster as one pool."""
    return pool_list(await asyncio.to_thread(ray_nodes))


@router.get("/v2/{project_id}/pools/{pool_name}/nodes")
async def get_pool_nodes(
    project_id: str,
    pool_name: str,
    limit: int | None = Query(None, ge=1),
    continue_token: str | None = Query(None, alias="continue"),
) -> dict[str, Any]:
    """The pool's nodes, a page at a time."""
    if pool_name != POOL_NAME:
        raise PoolNotFound("pool not found")
    nodes = await asyncio.to_thread(ray_nodes)
    try:
        return node_list(nodes, limit, continue_token)
    except ValueError as exc:
        # answered like any malformed query parameter (limit=0 included), by the app's validation handler
        loc = ("query", "continue")
        raise RequestValidationError(
            [{"type": "value_error", "loc": loc, "msg": str(exc), "input": continue_token}]
        ) from exc


@router.get("/v1/{project_id}/services/specifications")
async def get_specifications(project_id: str) -> dict[str, Any]:
    """The flavours a service can be deployed with."""
    return {"specifications": specifications(await asyncio.to_thread(ray_nodes))}
