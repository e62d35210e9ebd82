"""event types renamed: past-tense facts (issue 12)

The events already stored get the names the code now records: a fact keeps one past-tense name
end to end, and a rider's reply is recorded as the fact ``dispatch.replied``. Requests are never
stored, so none is renamed to one. Dead letters keep the payloads as they were sent.
(rename-events: keep -- this file spells the old names on purpose.)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Stored type before -> after.
RENAMED: dict[str, str] = {
    "order.status": "order.status_changed",
    "order.incident": "order.incident_reported",
    "order.chat": "order.chat_posted",
    "rider.location": "rider.location_reported",
    "rider.presence": "rider.presence_changed",
    "dispatch.offer": "dispatch.offered",
    "dispatch.reply": "dispatch.replied",
}

_RENAME = sa.text("UPDATE events SET type = :new WHERE type = :old")


def upgrade() -> None:
    for old, new in RENAMED.items():
        op.execute(_RENAME.bindparams(old=old, new=new))


def downgrade() -> None:
    for old, new in RENAMED.items():
        op.execute(_RENAME.bindparams(old=new, new=old))
