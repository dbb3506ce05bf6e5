"""Initial registry schema: tokens, models, services, service_events, counters, counter_ack.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
    )
    op.create_index("ix_tokens_project_id", "tokens", ["project_id"])
    op.create_table(
        "models",
        sa.Column("model_id", sa.String(36), primary_key=True),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("model_type", sa.String(32), nullable=False),
        sa.Column("runtime", sa.String(128), nullable=False),
        sa.Column("source_location", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("install_type", sa.JSON, nullable=False),
        sa.Column("specification", sa.JSON, nullable=False),
        sa.Column("model_size", sa.BigInteger, nullable=False),
        sa.Column("model_status", sa.String(16), nullable=False),
        sa.Column("error_msg", sa.Text, nullable=True),
        sa.Column("signature", sa.JSON, nullable=True),
        sa.Column("custom", sa.JSON, nullable=True),
        sa.Column("create_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("project_id", "model_name", "model_version", name="uq_models_name_version"),
    )
    op.create_index("ix_models_project_id", "models", ["project_id"])
    op.create_table(
        "services",
        sa.Column("service_id", sa.String(36), primary_key=True),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("service_name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("infer_type", sa.String(16), nullable=False),
        sa.Column("desired_status", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer, nullable=False),
        sa.Column("error_msg", sa.Text, nullable=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("schedule", sa.JSON, nullable=True),
        sa.Column("due_time", sa.BigInteger, nullable=True),
        sa.Column("publish_at", sa.BigInteger, nullable=False),
        sa.Column("update_time", sa.BigInteger, nullable=False),
        sa.Column("transition_at", sa.BigInteger, nullable=False),
        sa.Column("operation_time", sa.BigInteger, nullable=False),
        sa.Column("batch", sa.JSON, nullable=True),
        sa.UniqueConstraint("project_id", "service_name", name="uq_services_name"),
    )
    op.create_index("ix_services_project_id", "services", ["project_id"])
    op.create_table(
        "service_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "service_id",
            sa.String(36),
            sa.ForeignKey("services.service_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("time", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_service_events_service_id", "service_events", ["service_id"])
    op.create_table(
        "counters",
        sa.Column("service_id", sa.String(36), primary_key=True),
        sa.Column("model_version", sa.String(32), primary_key=True),
        sa.Column("invocation_times", sa.BigInteger, nullable=False),
        sa.Column("failed_times", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "counter_ack",
        sa.Column("source", sa.String(128), primary_key=True),
        sa.Column("last_batch", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("counter_ack", "counters", "service_events", "services", "models", "tokens"):
        op.drop_table(table)
