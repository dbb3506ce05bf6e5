"""Persistent registry of models, services, events, tokens and invocation counters (SQLAlchemy + alembic)."""

from serving.registry.db import (
    Conflict,
    InUse,
    NotFound,
    Registry,
    current_revision,
    hash_token,
    head_revision,
    open_registry,
    version_key,
)

__all__ = [
    "Conflict",
    "InUse",
    "NotFound",
    "Registry",
    "current_revision",
    "hash_token",
    "head_revision",
    "open_registry",
    "version_key",
]
