"""SQLAlchemy 2 ORM tables of the registry (tokens, models, services, events, invocation counters)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="")


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("project_id", "model_name", "model_version", name="uq_models_name_version"),)

    model_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32))
    model_type: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(128), default="")
    source_location: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    install_type: Mapped[list[str]] = mapped_column(JSON, default=list)
    specification: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_size: Mapped[int] = mapped_column(BigInteger, default=0)
    model_status: Mapped[str] = mapped_column(String(16), default="publishing")
    error_msg: Mapped[str | None] = mapped_column(Text, nullable=True)
    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    custom: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    engine_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    create_at: Mapped[int] = mapped_column(BigInteger)
    template_uuid: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (UniqueConstraint("project_id", "service_name", name="uq_services_name"),)

    service_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    service_name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    infer_type: Mapped[str] = mapped_column(String(16), default="real-time")
    desired_status: Mapped[str] = mapped_column(String(16), default="running")
    status: Mapped[str] = mapped_column(String(16), default="deploying")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    error_msg: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    schedule: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    due_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    publish_at: Mapped[int] = mapped_column(BigInteger)
    update_time: Mapped[int] = mapped_column(BigInteger)
    transition_at: Mapped[int] = mapped_column(BigInteger)
    operation_time: Mapped[int] = mapped_column(BigInteger)
    batch: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ServiceEvent(Base):
    __tablename__ = "service_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("services.service_id", ondelete="CASCADE"), index=True
    )
    time: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")


class Counter(Base):
    __tablename__ = "counters"

    service_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(32), primary_key=True)
    invocation_times: Mapped[int] = mapped_column(BigInteger, default=0)
    failed_times: Mapped[int] = mapped_column(BigInteger, default=0)


class CounterAck(Base):
    __tablename__ = "counter_ack"

    source: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_batch: Mapped[int] = mapped_column(BigInteger)


class AsyncRequest(Base):
    """An accepted async request; written by the data plane (the queue), read by both planes."""

    __tablename__ = "async_requests"
    __table_args__ = (Index("ix_async_requests_queue", "service_id", "status", "created_at"),)

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    service_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))  # queued, running, succeeded, failed
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    lease_until: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    claim: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ModelServiceTemplate(Base):
    """A ZStack model-service template: a reusable recipe for serving a framework with a custom engine.

    ``project_id`` is None for the system templates that ship with Enginehouse; command fields are JSON
    argument lists (never shell strings).
    """

    __tablename__ = "model_service_templates"

    uuid: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    system: Mapped[bool] = mapped_column(default=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # every other field, camelCase as ZStack names it
    create_date: Mapped[int] = mapped_column(BigInteger)
    last_op_date: Mapped[int] = mapped_column(BigInteger)
