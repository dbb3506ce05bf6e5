"""Alembic migrations of the registry, run programmatically by :func:`serving.registry.open_registry`."""
