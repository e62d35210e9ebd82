"""orders carry delivery instructions, an alternate contact and their last amendment (issue 18)

An amendment is an ``order.amended`` event like any other; the columns hold what it changes that
the order had no place for (instructions, a second number) and the last amendment for the
retained state. Existing orders have no instructions and were never amended.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("instructions", sa.Text(), nullable=False, server_default="none"))
    op.add_column("orders", sa.Column("instructions_text", sa.Text(), nullable=False, server_default=""))
    op.add_column("orders", sa.Column("alternate_contact", sa.Text(), nullable=False, server_default=""))
    op.add_column("orders", sa.Column("last_amendment", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    for column in ("last_amendment", "alternate_contact", "instructions_text", "instructions"):
        op.drop_column("orders", column)
