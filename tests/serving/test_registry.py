"""Registry layer on a real SQLite file: migrations, models listing, conflicts, services, exactly-once counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from runtimes.errors import error_table
from serving.registry import Conflict, InUse, NotFound, Registry, current_revision, head_revision, open_registry

P = "proj1"

# name, version, type, status, description, size, create_at
MODELS = [
    ("resnet", "1.0.0", "PyTorch", "published", "image classifier", 300, 1000),
    ("resnet", "1.10.0", "PyTorch", "published", "image classifier v10", 100, 3000),
    ("resnet", "1.9.0", "PyTorch", "failed", "broken build", 200, 2000),
    ("resnet-large", "2.0.0", "ONNX", "publishing", "large image model", 500, 4000),
    ("bert", "1.2.0", "TensorFlow", "published", "text encoder", 50, 5000),
]


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = open_registry(None, tmp_path / "home")
    for name, version, mtype, status, desc, size, at in MODELS:
        r.add_model(
            P,
            model_name=name,
            model_version=version,
            model_type=mtype,
            description=desc,
            model_size=size,
            model_status=status,
            create_at=at,
        )
    r.add_model("other", model_name="resnet", model_version="9.9.9", model_type="PyTorch", create_at=1)
    yield r
    r.close()


def _ids(rows: list[Any]) -> list[str]:
    return [f"{m.model_name}:{m.model_version}" for m in rows]


LIST_CASES: list[tuple[dict[str, Any], int, list[str]]] = [
    ({}, 5, ["bert:1.2.0", "resnet-large:2.0.0", "resnet:1.10.0", "resnet:1.9.0", "resnet:1.0.0"]),
    ({"model_name": "resn"}, 4, ["resnet-large:2.0.0", "resnet:1.10.0", "resnet:1.9.0", "resnet:1.0.0"]),
    ({"model_name": "resnet", "exact_match": True}, 3, ["resnet:1.10.0", "resnet:1.9.0", "resnet:1.0.0"]),
    ({"model_name": "resn", "exact_match": True}, 0, []),
    ({"model_version": "1.9.0"}, 1, ["resnet:1.9.0"]),
    ({"model_status": "published"}, 3, ["bert:1.2.0", "resnet:1.10.0", "resnet:1.0.0"]),
    ({"description": "image"}, 3, ["resnet-large:2.0.0", "resnet:1.10.0", "resnet:1.0.0"]),
    ({"model_type": "PyTorch"}, 3, ["resnet:1.10.0", "resnet:1.9.0", "resnet:1.0.0"]),
    ({"not_model_type": "PyTorch"}, 2, ["bert:1.2.0", "resnet-large:2.0.0"]),
    (
        {"sort_by": "create_at", "order": "asc"},
        5,
        ["resnet:1.0.0", "resnet:1.9.0", "resnet:1.10.0", "resnet-large:2.0.0", "bert:1.2.0"],
    ),
    (
        {"sort_by": "model_version", "order": "asc"},
        5,
        ["resnet:1.0.0", "bert:1.2.0", "resnet:1.9.0", "resnet:1.10.0", "resnet-large:2.0.0"],
    ),
    (
        {"sort_by": "model_version", "order": "desc"},
        5,
        ["resnet-large:2.0.0", "resnet:1.10.0", "resnet:1.9.0", "bert:1.2.0", "resnet:1.0.0"],
    ),
    (
        {"sort_by": "model_size", "order": "asc"},
        5,
        ["bert:1.2.0", "resnet:1.10.0", "resnet:1.9.0", "resnet:1.0.0", "resnet-large:2.0.0"],
    ),
    (
        {"sort_by": "model_size", "order": "desc"},
        5,
        ["resnet-large:2.0.0", "resnet:1.0.0", "resnet:1.9.0", "resnet:1.10.0", "bert:1.2.0"],
    ),
    ({"sort_by": "create_at", "order": "asc", "offset": 1, "limit": 2}, 5, ["resnet:1.9.0", "resnet:1.10.0"]),
    ({"offset": 4, "limit": 10}, 5, ["resnet:1.0.0"]),
    ({"model_name": "resnet", "exact_match": True, "limit": 0}, 3, []),
]


@pytest.mark.parametrize(("filters", "total", "expected"), LIST_CASES)
def test_list_models(reg: Registry, filters: dict[str, Any], total: int, expected: list[str]) -> None:
    count, rows = reg.list_models(P, **filters)
    assert count == total
    assert _ids(rows) == expected


def test_error_codes_registered() -> None:
    table = error_table()
    assert table["EH.0301"] == (409, "Conflict")
    assert table["EH.0302"] == (404, "NotFound")
    assert table["EH.0303"] == (409, "InUse")


def test_duplicate_model_conflict(reg: Registry) -> None:
    with pytest.raises(Conflict):
        reg.add_model(P, model_name="resnet", model_version="1.0.0", model_type="PyTorch")
    # same name+version in another project is fine
    reg.add_model("proj2", model_name="resnet", model_version="1.0.0", model_type="PyTorch")


def test_get_and_status(reg: Registry) -> None:
    mid = reg.add_model(P, model_name="m", model_version="0.0.1", model_type="ONNX", install_type=["real-time"])
    assert reg.get_model(P, mid).model_status == "publishing"
    reg.set_model_status(P, mid, "published", signature={"inputs": []}, model_size=42)
    m = reg.get_model(P, mid)
    assert (m.model_status, m.signature, m.model_size) == ("published", {"inputs": []}, 42)
    reg.set_model_status(P, mid, "failed", error_msg="boom")
    assert reg.get_model(P, mid).error_msg == "boom"
    with pytest.raises(NotFound):
        reg.get_model("other", mid)
    with pytest.raises(NotFound):
        reg.set_model_status(P, "nope", "failed")


def test_delete_model_in_use(reg: Registry) -> None:
    mid = reg.add_model(P, model_name="m", model_version="1.0.0", model_type="ONNX")
    sid = reg.add_service(P, service_name="svc", config=[{"model_id": mid, "weight": 100}])
    with pytest.raises(InUse):
        reg.delete_model(P, mid)
    reg.delete_service(P, sid)
    reg.delete_model(P, mid)
    with pytest.raises(NotFound):
        reg.get_model(P, mid)
    with pytest.raises(NotFound):
        reg.delete_model(P, mid)


def test_services_crud_and_events(reg: Registry) -> None:
    a = reg.add_service(P, service_name="alpha", config=[], description="first")
    b = reg.add_service(P, service_name="beta", config=[], infer_type="batch")
    with pytest.raises(Conflict):
        reg.add_service(P, service_name="alpha", config=[])
    svc = reg.update_service(P, a, status="running", progress=100)
    assert svc.status == "running" and svc.transition_at == svc.update_time
    with pytest.raises(ValueError):
        reg.update_service(P, a, project_id="x")
    assert reg.list_services(P, status="running")[0] == 1
    total, rows = reg.list_services(P, sort_by="service_name", order="asc")
    assert total == 2 and [r.service_name for r in rows] == ["alpha", "beta"]
    assert [r.service_id for r in reg.list_services(P, infer_type="batch")[1]] == [b]
    assert reg.list_services(P, service_name="lph")[0] == 1
    assert reg.list_services(None)[0] == 2
    reg.add_event(a, "deploy", "deploying", at=10)
    reg.add_event(a, "running", "all replicas ready", at=20)
    assert [(e.time, e.event_type) for e in reg.list_events(a)] == [(10, "deploy"), (20, "running")]
    reg.apply_counts("r1", 1, {(a, "1.0.0"): (3, 1)})
    reg.delete_service(P, a)
    assert reg.list_events(a) == [] and reg.get_counts(a) == {}
    with pytest.raises(NotFound):
        reg.get_service(P, a)


def test_counters_exactly_once(reg: Registry) -> None:
    d1 = {("s1", "1.0.0"): (10, 1), ("s1", "2.0.0"): (5, 0)}
    assert reg.apply_counts("replica-a", 1, d1)
    assert not reg.apply_counts("replica-a", 1, d1)  # replay
    assert reg.apply_counts("replica-a", 2, {("s1", "1.0.0"): (1, 1)})
    assert not reg.apply_counts("replica-a", 1, d1)  # stale
    assert reg.apply_counts("replica-b", 1, {("s1", "1.0.0"): (2, 0)})  # independent source
    assert reg.get_counts("s1") == {"1.0.0": (13, 2), "2.0.0": (5, 0)}


def test_tokens(reg: Registry) -> None:
    reg.add_token(P, "secret", "ci")
    assert reg.project_for_token("secret") == P
    assert reg.project_for_token("wrong") is None
    with reg.session() as s:
        stored = s.execute(text("SELECT token_hash FROM tokens")).scalar_one()
    assert stored != "secret" and len(stored) == 64
    with pytest.raises(Conflict):
        reg.add_token(P, "secret")


def test_migration_idempotent_keeps_data(tmp_path: Path) -> None:
    home = tmp_path / "h"
    r = open_registry(None, home, revision="0001")
    assert current_revision(r.engine) == "0001"
    mid = "m-0001"
    with r.session() as s:  # a row as revision 0001 wrote it (no engine_config column yet)
        s.execute(
            text(
                "INSERT INTO models (model_id, project_id, model_name, model_version, model_type, runtime,"
                " source_location, description, install_type, specification, model_size, model_status, create_at)"
                " VALUES (:id, :p, 'keep', '1.0.0', 'ONNX', '', '/m', 'kept', '[\"real-time\"]', '{}', 7,"
                " 'published', 1)"
            ),
            {"id": mid, "p": P},
        )
    r.close()
    r2 = open_registry(None, home)
    assert current_revision(r2.engine) == head_revision() == "0004"
    kept = r2.get_model(P, mid)
    assert (kept.model_name, kept.model_size, kept.description, kept.engine_config) == ("keep", 7, "kept", None)
    with r2.session() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    r2.close()
    r3 = open_registry(f"sqlite:///{home / 'registry.db'}", tmp_path / "unused")
    assert r3.get_model(P, mid).model_version == "1.0.0"
    r3.close()
