"""The orders waiting for a customer access, and how many go into one control message.

Mosquitto 2.0.11's dynamic-security plugin rewrites its whole JSON file after every command
(cost ∝ live logins: about 60 ms at 5,000 on 2 cores) and runs a control message's commands in
one go, while every other client waits. So a batch is bounded twice: by count, and by the
broker time the last batch showed per order (a budget of broker stall per message). At a few
hundred live logins that is a full batch (the round trip and the provisioner's own work paid
once); at thousands it falls to one order a message, as before. Measured (``bloomwire bench
access --burst``): a batch gains little throughput (the plugin's work per order is the same)
and holds every other client for the whole batch, hence the budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from bloomwire.runtime.mqtt import Message

#: Orders per control message at most.
DEFAULT_MINT_BATCH = 16
#: Broker time one control message may take (the plugin holds every other client meanwhile).
DEFAULT_MINT_BUDGET_S = 0.25
#: Tries per order before it is given up (the reconciliation tries again later).
DEFAULT_MINT_ATTEMPTS = 3


@dataclass(slots=True)
class Wanted:
    """One order waiting for its access."""

    shop: str
    order: str
    customer: str | None = None
    attempts: int = 0
    #: When the order closed (epoch s) while it waited: its revocation date follows.
    closed_at: float | None = None
    #: The status message that asked for it (dead-lettered if it is given up), if any.
    source: Message | None = None


class MintQueue:
    """Orders waiting for an access, by order role, in the order they were asked for."""

    def __init__(
        self,
        batch: int = DEFAULT_MINT_BATCH,
        budget_s: float = DEFAULT_MINT_BUDGET_S,
        attempts: int = DEFAULT_MINT_ATTEMPTS,
    ) -> None:
        self.batch = max(1, batch)
        self.budget_s = budget_s
        self.attempts = attempts
        self.waiting: dict[str, Wanted] = {}
        #: Broker time per order of the last batch (None before the first).
        self.per_order_s: float | None = None

    def __len__(self) -> int:
        return len(self.waiting)

    def __contains__(self, role: object) -> bool:
        return role in self.waiting

    def add(self, role: str, wanted: Wanted) -> bool:
        """Queue ``role`` unless it waits already; True if queued now."""
        if role in self.waiting:
            return False
        self.waiting[role] = wanted
        return True

    def get(self, role: str) -> Wanted | None:
        """The waiting entry of ``role``, if any."""
        return self.waiting.get(role)

    def size(self) -> int:
        """How many orders the next message takes: one until a batch has been timed (the live
        count, hence the plugin's cost, is unknown), then as many as the budget holds, at most
        the count bound."""
        if self.per_order_s is None:
            return 1
        if self.per_order_s <= 0:
            return self.batch
        return max(1, min(self.batch, int(self.budget_s / self.per_order_s)))

    def take(self) -> list[tuple[str, Wanted]]:
        """The next batch, oldest first, out of the queue."""
        roles = list(self._first(self.size()))
        return [(role, self.waiting.pop(role)) for role in roles]

    def _first(self, n: int) -> Iterator[str]:
        for i, role in enumerate(self.waiting):
            if i >= n:
                return
            yield role

    def measured(self, orders: int, seconds: float) -> None:
        """A batch of ``orders`` took ``seconds`` from sending to the plugin's answer."""
        if orders > 0:
            self.per_order_s = seconds / orders

    def retry(self, role: str, wanted: Wanted) -> bool:
        """Count a failed try; queue it again (True) unless it has had its tries (False)."""
        wanted.attempts += 1
        if wanted.attempts >= self.attempts:
            return False
        self.waiting.setdefault(role, wanted)
        return True


__all__ = ["DEFAULT_MINT_ATTEMPTS", "DEFAULT_MINT_BATCH", "DEFAULT_MINT_BUDGET_S", "MintQueue", "Wanted"]
