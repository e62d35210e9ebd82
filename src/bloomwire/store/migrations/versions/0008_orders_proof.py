"""orders carry their proof of delivery (issue 16): handover code and photo

The code is minted with the order; ``handover_failures`` counts wrong codes (the alerts service's
``handover_code`` rule reads it); ``photo`` is the stored photo's reference (content address,
type, size), the bytes being in the photo store under the data dir. Existing orders have none.

Revision ID: 0008
Revises: 0007 (re-chained by the lead at merge)
Create Date: 2026-12-03 14:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("handover_code", sa.String(length=8), nullable=True))
    op.add_column(
        "orders",
        sa.Column("handover_code_required", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("orders", sa.Column("handover_failures", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("orders", sa.Column("photo", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("orders", "photo")
    op.drop_column("orders", "handover_failures")
    op.drop_column("orders", "handover_code_required")
    op.drop_column("orders", "handover_code")
