"""Registry database: open/migrate (alembic, programmatic) and the :class:`Registry` data access methods."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from runtimes.errors import EnginehouseError
from serving.registry.schema import (
    AsyncRequest,
    Counter,
    CounterAck,
    Model,
    ModelServiceTemplate,
    Service,
    ServiceEvent,
    Token,
)
from serving.tokens import hash_token

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

MODEL_STATUSES = ("publishing", "published", "failed")
MODEL_SORT_KEYS = ("create_at", "model_version", "model_size")
SERVICE_SORT_KEYS = ("publish_at", "service_name", "update_time")
_SERVICE_FIELDS = frozenset(c.name for c in Service.__table__.columns) - {"service_id", "project_id"}


class Conflict(EnginehouseError):
    """A model name+version or a service name already exists in the project."""

    status_code = 409
    error_code = "EH.0301"


class NotFound(EnginehouseError):
    """No such model or service in the project."""

    status_code = 404
    error_code = "EH.0302"


class InUse(EnginehouseError):
    """The model is referenced by a service's config; delete or update the service first."""

    status_code = 409
    error_code = "EH.0303"


def now_ms() -> int:
    return int(time.time() * 1000)


def version_key(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``; non-numeric parts sort as -1."""
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN (pysqlite transaction fix)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(engine: Engine, url: str, revision: str = "head") -> None:
    cfg = _alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def open_registry(url: str | None, home: Path, revision: str = "head") -> Registry:
    """Open (and migrate to ``revision``) the registry; ``url=None`` is ``sqlite:///{home}/registry.db``."""
    if url is None:
        home.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{home / 'registry.db'}"  # the same default as Settings.registry_url()
    engine = _make_engine(url)
    upgrade(engine, url, revision)
    return Registry(engine)


def _check_sort(sort_by: str, keys: tuple[str, ...] | list[str] | set[str], order: str) -> None:
    """Refuse a sort key or order the list does not support, naming the allowed values."""
    if sort_by not in keys:
        raise ValueError(f"sort_by must be one of {keys}")
    if order not in ("asc", "desc"):
        raise ValueError("order must be asc or desc")


class Registry:
    """Small, transactional data-access methods; rows come back as detached ORM objects."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # tokens ---------------------------------------------------------------------------------------------------
    def add_token(self, project_id: str, token: str, description: str = "") -> int:
        with self.session() as s:
            row = Token(
                project_id=project_id, token_hash=hash_token(token), created_at=now_ms(), description=description
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError as e:
                raise Conflict("this token is already registered") from e
            return row.id

    def project_for_token(self, token: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(Token.project_id).where(Token.token_hash == hash_token(token)))

    def token_hashes(self) -> dict[str, str]:
        """``{sha256: project}`` of every stored token (what the data plane checks against)."""
        with self.session() as s:
            return dict(s.execute(select(Token.token_hash, Token.project_id)).tuples().all())

    def count_tokens(self) -> int:
        """How many tokens are stored; any at all turns auth on."""
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(Token)) or 0

    # models ---------------------------------------------------------------------------------------------------
    def add_model(
        self,
        project_id: str,
        *,
        model_name: str,
        model_version: str,
        model_type: str,
        runtime: str = "",
        source_location: str = "",
        description: str = "",
        install_type: list[str] | None = None,
        specification: dict[str, Any] | None = None,
        model_size: int = 0,
        custom: dict[str, Any] | None = None,
        engine_config: dict[str, Any] | None = None,
        model_status: str = "publishing",
        create_at: int | None = None,
        template_uuid: str | None = None,
    ) -> str:
        model_id = str(uuid.uuid4())
        row = Model(
            model_id=model_id,
            project_id=project_id,
            model_name=model_name,
            model_version=model_version,
            model_type=model_type,
            runtime=runtime,
            source_location=source_location,
            description=description,
            install_type=list(install_type or ["real-time"]),
            specification=dict(specification or {}),
            model_size=model_size,
            model_status=model_status,
            custom=custom,
            engine_config=engine_config,
            create_at=now_ms() if create_at is None else create_at,
            template_uuid=template_uuid,
        )
        try:
            with self.session() as s:
                s.add(row)
        except IntegrityError as e:
            raise Conflict(
                f"model {model_name} version {model_version} already exists; register a new model_version"
            ) from e
        return model_id

    def get_model(self, project_id: str, model_id: str) -> Model:
        with self.session() as s:
            row = s.scalar(select(Model).where(Model.project_id == project_id, Model.model_id == model_id))
            if row is None:
                raise NotFound(f"model {model_id} not found")
            return row

    def list_models(
        self,
        project_id: str,
        *,
        model_name: str | None = None,
        exact_match: bool = False,
        model_version: str | None = None,
        model_status: str | None = None,
        description: str | None = None,
        model_type: str | None = None,
        not_model_type: str | None = None,
        offset: int = 0,
        limit: int = 1000,
        sort_by: str = "create_at",
        order: str = "desc",
    ) -> tuple[int, list[Model]]:
        _check_sort(sort_by, MODEL_SORT_KEYS, order)
        q = select(Model).where(Model.project_id == project_id)
        if model_name:
            if exact_match:
                q = q.where(Model.model_name == model_name)
            else:
                q = q.where(Model.model_name.contains(model_name, autoescape=True))
        if model_version:
            q = q.where(Model.model_version == model_version)
        if model_status:
            q = q.where(Model.model_status == model_status)
        if description:
            q = q.where(Model.description.contains(description, autoescape=True))
        if model_type:
            q = q.where(Model.model_type == model_type)
        if not_model_type:
            q = q.where(Model.model_type != not_model_type)
        with self.session() as s:
            rows = list(s.scalars(q))
        # Sort in Python: model_version must sort numerically (1.10.0 after 1.9.0); ties broken by name then id.
        keyfn: Any
        if sort_by == "model_version":
            keyfn = lambda m: (version_key(m.model_version), m.model_name, m.model_id)  # noqa: E731
        elif sort_by == "model_size":
            keyfn = lambda m: (m.model_size, m.create_at, m.model_id)  # noqa: E731
        else:
            keyfn = lambda m: (m.create_at, m.model_id)  # noqa: E731
        rows.sort(key=keyfn, reverse=order == "desc")
        return len(rows), rows[max(offset, 0) : max(offset, 0) + max(limit, 0)]

    def set_model_status(
        self,
        project_id: str,
        model_id: str,
        status: str,
        *,
        error_msg: str | None = None,
        signature: dict[str, Any] | None = None,
        model_size: int | None = None,
    ) -> None:
        if status not in MODEL_STATUSES:
            raise ValueError(f"model_status must be one of {MODEL_STATUSES}")
        values: dict[str, Any] = {"model_status": status, "error_msg": error_msg}
        if signature is not None:
            values["signature"] = signature
        if model_size is not None:
            values["model_size"] = model_size
        with self.session() as s:
            res = s.execute(
                update(Model).where(Model.project_id == project_id, Model.model_id == model_id).values(**values)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"model {model_id} not found")

    def models_by_id(self, model_ids: Iterable[str]) -> dict[str, Model]:
        """``{model_id: row}`` of the given models, any project, in one query."""
        with self.session() as s:
            return {m.model_id: m for m in s.scalars(select(Model).where(Model.model_id.in_(list(model_ids))))}

    def services_using_model(self, project_id: str, model_id: str) -> list[str]:
        with self.session() as s:
            services = s.scalars(select(Service).where(Service.project_id == project_id))
            return [sv.service_id for sv in services if any(c.get("model_id") == model_id for c in sv.config or [])]

    def delete_model(self, project_id: str, model_id: str) -> None:
        with self.session() as s:
            row = s.scalar(select(Model).where(Model.project_id == project_id, Model.model_id == model_id))
            if row is None:
                raise NotFound(f"model {model_id} not found")
            users = [
                sv.service_name
                for sv in s.scalars(select(Service).where(Service.project_id == project_id))
                if any(c.get("model_id") == model_id for c in sv.config or [])
            ]
            if users:
                raise InUse(f"model {model_id} is used by service(s) {', '.join(users)}; delete or update them first")
            s.delete(row)

    # model-service templates ----------------------------------------------------------------------------------
    def put_template(
        self, uuid_: str, name: str, spec: dict[str, Any], *, project_id: str | None, system: bool = False
    ) -> None:
        """Add a template; a system template with that uuid is replaced (shipped recipes follow upgrades)."""
        at = now_ms()
        try:
            with self.session() as s:
                row = s.get(ModelServiceTemplate, uuid_)
                if row is not None and row.system and system:
                    if row.spec != spec or row.name != name:
                        row.name, row.spec, row.last_op_date = name, spec, at
                    return
                s.add(
                    ModelServiceTemplate(
                        uuid=uuid_,
                        name=name,
                        project_id=project_id,
                        system=system,
                        spec=spec,
                        create_date=at,
                        last_op_date=at,
                    )
                )
        except IntegrityError as e:
            raise Conflict(f"a model-service template named {name!r} already exists") from e

    def get_template(self, key: str) -> ModelServiceTemplate:
        """A template by uuid, or else by name."""
        with self.session() as s:
            row = s.get(ModelServiceTemplate, key) or s.scalar(
                select(ModelServiceTemplate).where(ModelServiceTemplate.name == key)
            )
            if row is None:
                raise NotFound(f"model-service template {key} not found")
            return row

    def list_templates(self, project_id: str | None = None) -> list[ModelServiceTemplate]:
        """System templates and the project's own (every template when ``project_id`` is None), oldest first."""
        query = select(ModelServiceTemplate).order_by(ModelServiceTemplate.create_date, ModelServiceTemplate.name)
        if project_id is not None:
            query = query.where(
                (ModelServiceTemplate.system.is_(True)) | (ModelServiceTemplate.project_id == project_id)
            )
        with self.session() as s:
            return list(s.scalars(query))

    def template_users(self, uuid_: str) -> dict[str, str]:
        """``{model_id: "name version"}`` of the models made from a template."""
        with self.session() as s:
            rows = s.scalars(select(Model).where(Model.template_uuid == uuid_))
            return {m.model_id: f"{m.model_name} {m.model_version}" for m in rows}

    def delete_template(self, project_id: str, uuid_: str) -> None:
        """Delete one of the project's templates; refused while a model was made from it."""
        with self.session() as s:
            row = s.get(ModelServiceTemplate, uuid_)
            if row is None or (not row.system and row.project_id != project_id):
                raise NotFound(f"model-service template {uuid_} not found")
            if row.system:
                raise InUse(f"model-service template {row.name} ships with Enginehouse and cannot be deleted")
            users = [
                f"{m.model_name} {m.model_version}"
                for m in s.scalars(select(Model).where(Model.template_uuid == uuid_))
            ]
            if users:
                raise InUse(
                    f"model-service template {row.name} is used by model(s) {', '.join(users)}; delete them first"
                )
            s.delete(row)

    # services -------------------------------------------------------------------------------------------------
    def add_service(
        self,
        project_id: str,
        *,
        service_name: str,
        config: list[dict[str, Any]],
        description: str = "",
        infer_type: str = "real-time",
        schedule: list[dict[str, Any]] | None = None,
        due_time: int | None = None,
        batch: dict[str, Any] | None = None,
        status: str = "deploying",
        desired_status: str = "running",
    ) -> str:
        t = now_ms()
        service_id = str(uuid.uuid4())
        row = Service(
            service_id=service_id,
            project_id=project_id,
            service_name=service_name,
            description=description,
            infer_type=infer_type,
            desired_status=desired_status,
            status=status,
            progress=0,
            config=config,
            schedule=schedule,
            due_time=due_time,
            batch=batch,
            publish_at=t,
            update_time=t,
            transition_at=t,
            operation_time=t,
        )
        try:
            with self.session() as s:
                s.add(row)
        except IntegrityError as e:
            raise Conflict(f"service {service_name} already exists; choose another service_name") from e
        return service_id

    def get_service(self, project_id: str, service_id: str) -> Service:
        with self.session() as s:
            row = s.scalar(select(Service).where(Service.project_id == project_id, Service.service_id == service_id))
            if row is None:
                raise NotFound(f"service {service_id} not found")
            return row

    def list_services(
        self,
        project_id: str | None,
        *,
        service_name: str | None = None,
        status: str | None = None,
        infer_type: str | None = None,
        offset: int = 0,
        limit: int = 1000,
        sort_by: str = "publish_at",
        order: str = "desc",
    ) -> tuple[int, list[Service]]:
        """``project_id=None`` lists every project's services (for the reconciler)."""
        _check_sort(sort_by, SERVICE_SORT_KEYS, order)
        q = select(Service)
        if project_id is not None:
            q = q.where(Service.project_id == project_id)
        if service_name:
            q = q.where(Service.service_name.contains(service_name, autoescape=True))
        if status:
            q = q.where(Service.status == status)
        if infer_type:
            q = q.where(Service.infer_type == infer_type)
        col = getattr(Service, sort_by)
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            q = q.order_by(col.desc() if order == "desc" else col.asc(), Service.service_id)
            rows = list(s.scalars(q.offset(max(offset, 0)).limit(max(limit, 0))))
        return total, rows

    def update_service(self, project_id: str, service_id: str, /, **fields: Any) -> Service:
        """Set any service column (not the ids); ``update_time`` defaults to now."""
        unknown = set(fields) - _SERVICE_FIELDS
        if unknown:
            raise ValueError(f"unknown service fields: {sorted(unknown)}")
        fields.setdefault("update_time", now_ms())
        with self.session() as s:
            row = s.scalar(select(Service).where(Service.project_id == project_id, Service.service_id == service_id))
            if row is None:
                raise NotFound(f"service {service_id} not found")
            if "status" in fields and fields["status"] != row.status:
                fields.setdefault("transition_at", fields["update_time"])
            for k, v in fields.items():
                setattr(row, k, v)
            return row

    def delete_service(self, project_id: str, service_id: str) -> None:
        with self.session() as s:
            row = s.scalar(select(Service).where(Service.project_id == project_id, Service.service_id == service_id))
            if row is None:
                raise NotFound(f"service {service_id} not found")
            s.execute(delete(ServiceEvent).where(ServiceEvent.service_id == service_id))
            s.execute(delete(Counter).where(Counter.service_id == service_id))
            s.execute(delete(AsyncRequest).where(AsyncRequest.service_id == service_id))
            s.delete(row)

    def add_event(self, service_id: str, event_type: str, reason: str = "", at: int | None = None) -> int:
        with self.session() as s:
            ev = ServiceEvent(
                service_id=service_id, time=now_ms() if at is None else at, event_type=event_type, reason=reason
            )
            s.add(ev)
            s.flush()
            return ev.id

    def list_events(self, service_id: str) -> list[ServiceEvent]:
        with self.session() as s:
            q = select(ServiceEvent).where(ServiceEvent.service_id == service_id)
            return list(s.scalars(q.order_by(ServiceEvent.time, ServiceEvent.id)))

    # counters -------------------------------------------------------------------------------------------------
    def apply_counts(self, source: str, batch_id: int, deltas: Mapping[tuple[str, str], tuple[int, int]]) -> bool:
        """Add ``deltas[(service_id, version)] = (invocations, failures)`` once per ``(source, batch_id)``.

        Batches with ``batch_id <= last acked`` for ``source`` are skipped (returns ``False``); the ack and the
        counter increments commit in the same transaction, so a replay after a crash never double counts.
        """
        with self.session() as s:
            ack = s.get(CounterAck, source)
            if ack is not None and batch_id <= ack.last_batch:
                return False
            if ack is None:
                s.add(CounterAck(source=source, last_batch=batch_id))
            else:
                ack.last_batch = batch_id
            for (service_id, version), (inv, failed) in deltas.items():
                row = s.get(Counter, (service_id, version))
                if row is None:
                    s.add(
                        Counter(service_id=service_id, model_version=version, invocation_times=inv, failed_times=failed)
                    )
                else:
                    row.invocation_times += inv
                    row.failed_times += failed
            return True

    def all_counts(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{service_id: {model_version: (invocation_times, failed_times)}}`` of every service, in one query."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        with self.session() as s:
            for r in s.scalars(select(Counter)):
                out.setdefault(r.service_id, {})[r.model_version] = (r.invocation_times, r.failed_times)
        return out

    def get_counts(self, service_id: str) -> dict[str, tuple[int, int]]:
        """``{model_version: (invocation_times, failed_times)}`` of one service."""
        with self.session() as s:
            rows = s.scalars(select(Counter).where(Counter.service_id == service_id))
            return {r.model_version: (r.invocation_times, r.failed_times) for r in rows}
