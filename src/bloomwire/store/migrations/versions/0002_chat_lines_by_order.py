"""chat lines keyed by (order, time, event id)

The old layout (a rowid table, a unique index on the random event id and an index on the order)
dirtied two random pages per line: half of the persister's writes under a stream of chat. Lines
are now clustered by order and time (WITHOUT ROWID on SQLite); the event id stays unique through
``events``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 06:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = "order_id, at, id, shop, author_role, author, text"


def _swap(*, by_order: bool) -> None:
    """Copy the lines into a table of the other layout and put it in the old one's place."""
    key = ("order_id", "at", "id") if by_order else ("id",)
    # Named apart from the other layout's key: on PostgreSQL both exist until the old table goes.
    pk_name = "pk_chat_lines" if by_order else "chat_lines_pkey"
    op.create_table(
        "chat_lines_next",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("shop", sa.String(length=64), nullable=False),
        sa.Column("author_role", sa.String(length=20), nullable=False),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint(*key, name=pk_name),
        sqlite_with_rowid=not by_order,
    )
    op.execute(f"INSERT INTO chat_lines_next ({COLUMNS}) SELECT {COLUMNS} FROM chat_lines")
    op.drop_table("chat_lines")
    op.rename_table("chat_lines_next", "chat_lines")


def upgrade() -> None:
    op.drop_index("ix_chat_lines_order_id", table_name="chat_lines")
    _swap(by_order=True)


def downgrade() -> None:
    _swap(by_order=False)
    op.create_index("ix_chat_lines_order_id", "chat_lines", ["order_id"], unique=False)
