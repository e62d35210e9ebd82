"""Dispatch's name, topic and deterministic ids: a decision sent twice gets the same event id, so
the persister stores it once (docs/design.md §2)."""

from __future__ import annotations

import uuid
from typing import Final

from bloomwire.contract import topics

NAME: Final = "dispatch"
#: The CloudEvents ``source`` the persister expects on :data:`EVENTS_TOPIC`.
SOURCE: Final = f"{topics.SERVICES}/{NAME}"
#: ``services/dispatch/events``: where every decision of this service goes.
EVENTS_TOPIC: Final = topics.service_events(NAME)
_ID_NAMESPACE: Final = uuid.NAMESPACE_URL


def offer_id(order: str, attempt: int) -> str:
    """The id of the ``attempt``-th offer of ``order`` (0-based; counts every earlier offer).

    Used as both the offer id and the event id, so re-sending a decision is deduplicated.
    """
    return str(uuid.uuid5(_ID_NAMESPACE, f"bloomwire:dispatch:offer:{order}:{attempt}"))


def expired_id(offer: str) -> str:
    """The event id of the expiry of ``offer`` (one per offer)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"bloomwire:dispatch:expired:{offer}"))
