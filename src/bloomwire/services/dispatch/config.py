"""Dispatch's tuning (the cost function itself is :class:`~bloomwire.services.dispatch.planner.Weights`)."""

from __future__ import annotations

from dataclasses import dataclass

from bloomwire.services.dispatch.planner import DEFAULT_WEIGHTS, Weights


@dataclass(frozen=True)
class DispatchConfig:
    """Tuning of the service (the cost function itself is :class:`planner.Weights`)."""

    #: How long a rider has to answer an offer.
    offer_timeout_s: float = 45.0
    #: Period of the level-triggered look at the store.
    tick_s: float = 1.0
    #: This many orders waiting at once switch to joint (batch) assignment.
    batch_threshold: int = 3
    #: Candidates (cheapest eligible riders) carried in each offer event.
    top: int = 10
    #: In batch mode, explain each offer with a full ranking only up to this many offers per pass
    #: (a ranking costs ~1.5 ms at 500 riders; beyond it an offer carries the chosen rider only).
    explain_batch_max: int = 20
    #: An offer or expiry sent but not yet visible in the store is re-sent after this long (s).
    resend_after_s: float = 5.0
    #: At most this many waiting orders (oldest first) are considered per pass.
    max_waiting: int = 5000
    weights: Weights = DEFAULT_WEIGHTS
