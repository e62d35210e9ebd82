"""orders indexed by closing time

The persister dates the clearing of recently closed orders' retained states at start-up; without
an index that read would scan every order ever closed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 09:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_orders_closed_at", "orders", ["closed_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_orders_closed_at", table_name="orders")
