"""orders carry their customer's rating (issue 16)

The rating is an ``order.rated`` event like any other; the two columns let the order's snapshot
and the per-rider averages read it without replaying events. Existing orders have none.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("rating", sa.Integer(), nullable=True))
    op.add_column("orders", sa.Column("rating_comment", sa.String(), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("orders", "rating_comment")
    op.drop_column("orders", "rating")
