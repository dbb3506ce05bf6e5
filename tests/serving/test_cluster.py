"""The cluster view: Ray's real nodes as a NodeList, pure shapes over hand-made nodes, and the HTTP routes."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from runtimes.errors import EnginehouseError, error_table
from serving.controlplane.cluster import (
    POOL_NAME,
    NodeInfo,
    UnknownSpecification,
    flavour_resources,
    node_list,
    pool_list,
    ray_nodes,
    router,
    specifications,
)

GiB = 2**30
NPU = "huawei.com/ascend-snt9"
T0 = datetime(2024, 1, 29, 9, 28, 26, tzinfo=UTC)


def node(name: str, total: dict[str, float], available: dict[str, float] | None = None, **kw: object) -> NodeInfo:
    fields: dict = {"node_id": name * 4, "name": name, "ip": "10.0.0.1", "alive": True, "created": T0}
    fields.update(kw)
    return NodeInfo(total=total, available=dict(total) if available is None else available, **fields)


CPU_NODE = node("cpu", {"CPU": 4.0, "memory": 16 * GiB, "object_store_memory": GiB}, {"CPU": 1.5, "memory": 10 * GiB})
ACCEL_NODE = node(
    "accel",
    {"CPU": 8.0, "memory": 32 * GiB, "GPU": 2.0, NPU: 2.0},
    {"CPU": 5.5, "memory": 20 * GiB, "GPU": 0.5, NPU: 1.0},
    created=T0 + timedelta(hours=1),
)
DEAD_GPU_NODE = node("dead", {"CPU": 8.0, "memory": 32 * GiB, "GPU": 4.0}, {}, alive=False, created=T0 + timedelta(1))


def names(specs: list[dict]) -> list[str]:
    return [s["specification"] for s in specs]


# (a) the real session Ray: one node, num_cpus=2


def test_ray_nodes_reads_the_session_node(serve_instance: str) -> None:
    asked_at = datetime.now(UTC)
    alive = [n for n in ray_nodes() if n.alive]
    assert len(alive) == 1
    (n,) = alive
    assert n.total["CPU"] == 2.0 and n.total["memory"] > 0
    assert not [k for k in n.total if k.startswith(("node:", "accelerator_type:"))]
    assert set(n.available) == set(n.total) and all(n.available[k] <= n.total[k] for k in n.total)
    # the raylet's start time from the GCS, not the moment this process first saw the node
    assert n.created.tzinfo is not None and asked_at - timedelta(hours=6) < n.created < asked_at
    assert n.ip and n.name and len(n.node_id) >= 32


def test_available_resources_follow_reservations(serve_instance: str) -> None:
    import ray

    def free_memory() -> float:
        return next(n for n in ray_nodes() if n.alive).available["memory"]

    before = free_memory()

    @ray.remote(num_cpus=0, memory=200 * 2**20)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()  # type: ignore[attr-defined]
    try:
        ray.get(holder.ping.remote(), timeout=60)
        deadline = time.monotonic() + 15  # the resource view reaches the GCS within a heartbeat or two
        while free_memory() > before - 200 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert free_memory() <= before - 200 * 2**20
    finally:
        ray.kill(holder)


def test_node_list_of_the_real_cluster(serve_instance: str) -> None:
    nodes = ray_nodes()
    listing = node_list(nodes, None, None)
    assert listing["kind"] == "NodeList" and listing["apiVersion"] == "v2" and listing["metadata"] == {}
    item = next(i for i in listing["items"] if i["status"]["phase"] == "Available")
    real = next(n for n in nodes if n.alive)
    assert item["kind"] == "Node" and item["metadata"]["name"] == real.name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", item["metadata"]["creationTimestamp"])
    status = item["status"]
    assert status["privateIp"] == real.ip
    assert status["resources"]["cpu"] == "2000m"
    assert status["resources"]["memory"] == f"{int(real.total['memory'] // 2**20)}Mi"
    for key in ("cpu", "memory"):
        have, free = (re.fullmatch(r"(\d+)(m|Mi)", status[k][key]) for k in ("resources", "availableResources"))
        assert have and free and int(free.group(1)) <= int(have.group(1))
    assert item["spec"]["flavor"].startswith("local.")


def test_paging_the_real_cluster(serve_instance: str) -> None:
    nodes = ray_nodes()
    page = node_list(nodes, 1, None)
    assert len(page["items"]) == 1 and "continue" not in page["metadata"]  # one node: one page
    assert node_list(nodes, 1, str(len(nodes)))["items"] == []
    for bad in ("x", "-1", "1.5", str(len(nodes) + 1)):
        with pytest.raises(ValueError, match="continue"):
            node_list(nodes, 1, bad)


# (b) pure functions over hand-made nodes


def test_accelerators_in_the_node_list() -> None:
    accel, cpu = (node_list([n], None, None)["items"][0] for n in (ACCEL_NODE, CPU_NODE))
    assert accel["status"]["resources"] == {"cpu": "8000m", "memory": "32768Mi", "nvidia.com/gpu": "2", NPU: "2"}
    assert accel["status"]["availableResources"] == {
        "cpu": "5500m",
        "memory": "20480Mi",
        "nvidia.com/gpu": "0.5",
        NPU: "1",
    }
    assert accel["spec"]["flavor"] == "local.gpu.2"
    assert cpu["status"]["resources"] == {"cpu": "4000m", "memory": "16384Mi"}
    assert cpu["status"]["availableResources"] == {"cpu": "1500m", "memory": "10240Mi"}
    assert cpu["spec"]["flavor"] == "local.cpu.4u"
    assert cpu["metadata"] == {"name": "cpu", "creationTimestamp": "2024-01-29T09:28:26Z"}


def test_dead_node_is_abnormal() -> None:
    (item,) = node_list([DEAD_GPU_NODE], None, None)["items"]
    assert item["status"]["phase"] == "Abnormal"
    assert item["status"]["availableResources"] == {"cpu": "0m", "memory": "0Mi", "nvidia.com/gpu": "0"}


def test_paging_follows_continue_in_creation_order() -> None:
    nodes = [DEAD_GPU_NODE, ACCEL_NODE, CPU_NODE]
    seen, token, pages = [], None, 0
    while True:
        page = node_list(nodes, 1, token)
        seen += [i["metadata"]["name"] for i in page["items"]]
        pages += 1
        token = page["metadata"].get("continue")
        if token is None:
            break
        assert page["metadata"]["remainingItemCount"] == 3 - len(seen)
    assert seen == ["cpu", "accel", "dead"] and pages == 3
    assert [i["metadata"]["name"] for i in node_list(nodes, 2, "1")["items"]] == ["accel", "dead"]
    assert len(node_list(nodes, None, "")["items"]) == 3
    with pytest.raises(ValueError, match="continue"):
        node_list(nodes, 1, "4")
    with pytest.raises(ValueError, match="limit"):
        node_list(nodes, 0, None)


def test_pool_list() -> None:
    pools = pool_list([CPU_NODE, ACCEL_NODE, DEAD_GPU_NODE])
    assert pools["kind"] == "PoolList" and pools["apiVersion"] == "v2"
    (pool,) = pools["items"]
    assert pool["kind"] == "Pool" and pool["metadata"] == {
        "name": POOL_NAME,
        "creationTimestamp": "2024-01-29T09:28:26Z",
    }
    assert pool["spec"]["type"] == "Dedicate" and pool["spec"]["scope"] == ["Infer"]
    assert pool["spec"]["resources"] == [
        {"flavor": "local.cpu.4u", "count": 1},
        {"flavor": "local.gpu.2", "count": 1},
        {"flavor": "local.gpu.4", "count": 1},
    ]
    status = pool["status"]
    assert status["phase"] == "Running"
    assert status["resources"]["abnormal"] == [{"flavor": "local.gpu.4", "count": 1}]
    assert len(status["resources"]["available"]) == 2
    assert status["capacity"] == {"cpu": "12000m", "memory": "49152Mi", "nvidia.com/gpu": "2", NPU: "2"}
    assert status["availableResources"] == {"cpu": "7000m", "memory": "30720Mi", "nvidia.com/gpu": "0.5", NPU: "1"}
    assert pool_list([DEAD_GPU_NODE])["items"][0]["status"]["phase"] == "Abnormal"


def test_specifications_without_accelerators() -> None:
    specs = specifications([CPU_NODE, DEAD_GPU_NODE])  # a dead node's GPUs cannot be deployed to
    assert names(specs) == ["local.cpu.1u", "local.cpu.2u", "local.cpu.4u", "custom"]
    assert specs[1] == {
        "specification": "local.cpu.2u",
        "spec_status": "normal",
        "is_open": True,
        "source_type": "",
        "over_quota": False,
        "extend_params": None,
        "cpu": 2.0,
        "memory": 4096,
        "gpu": 0.0,
        "npu": {},
    }
    assert specs[-1]["cpu"] == 0.0 and specs[-1]["memory"] == 0 and "custom_spec" in specs[-1]["note"]
    # memory counts too: 4 CPUs but 3 GiB fits only the 2048 MB flavour
    assert names(specifications([node("small", {"CPU": 4.0, "memory": 3 * GiB})])) == ["local.cpu.1u", "custom"]


def test_specifications_with_gpus_and_npus() -> None:
    got = names(specifications([CPU_NODE, ACCEL_NODE]))
    assert got == [
        "local.cpu.1u",
        "local.cpu.2u",
        "local.cpu.4u",
        "local.cpu.8u",
        "local.gpu.0.5",
        "local.gpu.1",
        "local.gpu.2",
        "local.npu.1",
        "local.npu.2",
        "custom",
    ]
    other = node("other", {"CPU": 2.0, "memory": 8 * GiB, "huawei.com/ascend-snt3": 1.0})
    both = names(specifications([ACCEL_NODE, other]))  # two NPU kinds: the device names the flavour
    assert {"local.ascend-snt9.1", "local.ascend-snt9.2", "local.ascend-snt3.1"} <= set(both)


def test_flavour_resources() -> None:
    nodes = [CPU_NODE, ACCEL_NODE]
    assert flavour_resources("local.cpu.2u", nodes) == {"cpu": 2.0, "memory": 4096, "gpu": 0.0, "npu": {}}
    assert flavour_resources("local.gpu.0.5", nodes) == {"cpu": 1.0, "memory": 4096, "gpu": 0.5, "npu": {}}
    assert flavour_resources("local.npu.2", nodes)["npu"] == {NPU: 2}
    with pytest.raises(UnknownSpecification, match=r"'local.gpu.1'.*local\.cpu\.1u.*custom") as info:
        flavour_resources("local.gpu.1", [CPU_NODE])
    assert info.value.status_code == 400 and info.value.error_code == "EH.0401"
    with pytest.raises(UnknownSpecification):
        flavour_resources("local.cpu.8u", [CPU_NODE])
    with pytest.raises(ValueError, match="custom_spec"):
        flavour_resources("custom", nodes)


def test_error_codes_are_registered() -> None:
    table = error_table()
    assert table["EH.0401"] == (400, "UnknownSpecification")
    assert table["EH.0402"] == (404, "PoolNotFound")


# (c) the routes, on the real session Ray


@pytest.fixture
def client(serve_instance: str) -> TestClient:
    app = FastAPI()
    app.include_router(router)

    @app.exception_handler(EnginehouseError)
    async def _enginehouse_error(_: Request, exc: EnginehouseError) -> JSONResponse:
        return JSONResponse({"error_code": exc.error_code, "error_msg": exc.message}, status_code=exc.status_code)

    return TestClient(app)


def test_pools_route(client: TestClient) -> None:
    r = client.get("/v2/p1/pools")
    assert r.status_code == 200
    (pool,) = r.json()["items"]
    assert pool["metadata"]["name"] == "default" and pool["status"]["capacity"]["cpu"] == "2000m"


def test_nodes_route(client: TestClient) -> None:
    r = client.get("/v2/p1/pools/default/nodes", params={"limit": 1})
    assert r.status_code == 200
    body = r.json()
    assert body["kind"] == "NodeList" and len(body["items"]) == 1
    assert body["items"][0]["status"]["resources"]["cpu"] == "2000m"
    assert client.get("/v2/p1/pools/default/nodes", params={"continue": "1"}).json()["items"] == []
    bad = client.get("/v2/p1/pools/default/nodes", params={"continue": "zz"})
    assert 400 <= bad.status_code < 500 and "continue" in bad.text
    assert 400 <= client.get("/v2/p1/pools/default/nodes", params={"limit": 0}).status_code < 500


def test_unknown_pool_is_404(client: TestClient) -> None:
    r = client.get("/v2/p1/pools/gpu-pool/nodes")
    assert r.status_code == 404
    assert r.json() == {"error_code": "EH.0402", "error_msg": "pool not found"}


def test_specifications_route(client: TestClient) -> None:
    r = client.get("/v1/p1/services/specifications")
    assert r.status_code == 200
    got = names(r.json()["specifications"])
    assert got[:2] == ["local.cpu.1u", "local.cpu.2u"] and got[-1] == "custom" and "local.cpu.4u" not in got
