"""Models keep the engine config they were registered with (engine, runtime, model file, custom server).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: rows registered before this revision have none, and are read with their model_type as engine
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("engine_config", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("engine_config")
