"""Model-service templates (ZStack recipes for custom engines), and the template a Custom model was made from.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_service_templates",
        sa.Column("uuid", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("project_id", sa.String(64), nullable=True),
        sa.Column("system", sa.Boolean, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("create_date", sa.BigInteger, nullable=False),
        sa.Column("last_op_date", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_model_service_templates_project_id", "model_service_templates", ["project_id"])
    # nullable: only Custom models made from a template name one
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("template_uuid", sa.String(32), nullable=True))
        batch.create_index("ix_models_template_uuid", ["template_uuid"])


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_index("ix_models_template_uuid")
        batch.drop_column("template_uuid")
    op.drop_index("ix_model_service_templates_project_id", "model_service_templates")
    op.drop_table("model_service_templates")
