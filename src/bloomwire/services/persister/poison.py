"""A batch whose commit failed: the database is down (retry it all), or it refuses some message.

When the store is reachable, the batch is split (halves, then singles) and each part applied and
committed on its own, in order: the message(s) the database refuses are dead-lettered with its
reason and acknowledged, the rest is stored. Each part's messages are published as soon as it is
committed, so a later part failing (the store going down mid-split) loses nothing: the whole batch
comes again, what was committed is then a duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa

from bloomwire.errors import BloomwireError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.mqtt import first_line
from bloomwire.services.persister.projector import BatchResult, Inbound, Outbound, Projector
from bloomwire.store import probe

log = get_logger("bloomwire.persister")

Publish = Callable[[Sequence[Outbound]], None]


class StoreUnavailableError(BloomwireError):
    """The store cannot take writes now (down, unreachable, read-only, full, locked): retry later."""


def unavailable(engine: sa.Engine, exc: Exception) -> str | None:
    """Why the store is unavailable (transient), or None if it is up and refused the content.

    An ``OperationalError`` is the DBAPI's word for the database's own trouble (connection lost,
    database locked, disk full, read-only file); anything else counts as transient only when a
    fresh connection cannot run ``SELECT 1``.
    """
    if isinstance(exc, sa.exc.DBAPIError) and (
        isinstance(exc, sa.exc.OperationalError) or exc.connection_invalidated
    ):
        return first_line(exc.orig if exc.orig is not None else exc)
    if isinstance(exc, sa.exc.DisconnectionError | sa.exc.TimeoutError | sa.exc.ResourceClosedError):
        return first_line(exc)
    return probe(engine)


def refusal_reason(exc: Exception) -> str:
    """The reason a message could not be stored: the database's own words when it said no."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        return f"the database refused it: {first_line(exc.orig)}"
    return f"it could not be stored: {first_line(exc)}"


def _check(projector: Projector, exc: Exception) -> None:
    why = unavailable(projector.engine, exc)
    if why is not None:
        raise StoreUnavailableError(f"store unavailable: {why}") from exc


def apply_isolating(projector: Projector, batch: Sequence[Inbound], publish: Publish) -> BatchResult:
    """Apply ``batch`` and publish what it says; refuse the messages the database will not take.

    The result's ``outbound`` has been published already (it is returned to be counted).

    Raises :class:`StoreUnavailableError` when the store is unavailable (nothing to acknowledge).
    """
    try:
        result = projector.apply(batch)
    except Exception as exc:
        _check(projector, exc)
        log.warning("the store refused a batch; isolating the refused messages", size=len(batch))
        result = _split(projector, batch, exc, publish)
        log.info("isolated", stored=result.stored, refused=result.refused, size=len(batch))
        return result
    publish(result.outbound)
    return result


def _split(projector: Projector, batch: Sequence[Inbound], exc: Exception, publish: Publish) -> BatchResult:
    if len(batch) == 1:
        result = projector.refuse(batch[0], refusal_reason(exc), _check)
        publish(result.outbound)
        return result
    total = BatchResult()
    mid = len(batch) // 2
    for part in (batch[:mid], batch[mid:]):
        try:
            result = projector.apply(part)
        except Exception as failed:
            _check(projector, failed)
            result = _split(projector, part, failed, publish)
        else:
            publish(result.outbound)
        total.stored += result.stored
        total.duplicates += result.duplicates
        total.refused += result.refused
        total.ignored += result.ignored
        total.outbound.extend(result.outbound)  # published already; kept for the counts
    return total
