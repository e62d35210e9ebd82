"""The pages' long-lived objects, kept out of the garbage collector's full walks.

A bridged page lives for minutes to hours; Python's collector walks every tracked object on each
full collection, and it runs one whenever the older objects grew by a quarter: while pages keep
connecting, that is a pause over the whole heap every few thousand pages (0.8 s at 10,000 pages
on this machine, measured with a ``gc`` callback). So each page's objects are frozen once it is
bridged (``gc.freeze``: the collector no longer walks them; reference counting still frees them).

What a closed page leaves that only the collector can free (its two transports hold themselves
through a bound method: about 2 KB a page) stays until a sweep: unfreeze, collect, freeze again,
once as many pages have closed as are open (at least :data:`SWEEP_AFTER`). A sweep is one full
pause; it is logged with its duration.
"""

from __future__ import annotations

import gc
import time

from bloomwire.runtime.log import get_logger

log = get_logger("bloomwire.services.web.heap")

#: Fewest closed pages between two sweeps.
SWEEP_AFTER = 1000


class PageHeap:
    """Freezes what a new page holds; sweeps what closed pages left, now and then."""

    def __init__(self, sweep_after: int = SWEEP_AFTER) -> None:
        self.sweep_after = sweep_after
        self.closed_since_sweep = 0
        self.sweeps = 0

    def page_opened(self) -> None:
        """A page is bridged: its objects (and whatever else is alive now) leave the walks."""
        gc.freeze()

    def page_closed(self, open_pages: int) -> None:
        """A page closed; sweep once as many have closed as are still open."""
        self.closed_since_sweep += 1
        if self.closed_since_sweep >= max(self.sweep_after, open_pages):
            self.sweep()

    def sweep(self) -> None:
        """One full collection over everything, then freeze again."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        closed, self.closed_since_sweep = self.closed_since_sweep, 0
        self.sweeps += 1
        log.info(
            "heap swept",
            closed_pages=closed,
            freed_objects=freed,
            frozen_objects=gc.get_freeze_count(),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
