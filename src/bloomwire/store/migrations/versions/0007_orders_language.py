"""orders carry their customer's language and the last notice told (issue 16)

Notices and the tracking page speak the language; existing orders get English, the default shop
language. The last notice (JSON) lets the order's retained state show it to a page opened later.
Written after 0005; re-chained after 0006 at merge.

Revision ID: 0007
Revises: 0006 (re-chained by the lead at merge)
Create Date: 2026-12-03 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("language", sa.String(length=16), nullable=False, server_default="en"))
    op.add_column("orders", sa.Column("notice", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("orders", "notice")
    op.drop_column("orders", "language")
