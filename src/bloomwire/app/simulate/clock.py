"""Simulated time on top of the real clock.

The backbone runs on the real clock (the persister stamps real times, dispatch offers carry real
deadlines, alert thresholds are real minutes). So every timestamp the simulator sends is a REAL
time: a simulated minute ``m`` after the day started happened at ``start + m / speed`` (real),
and promised windows, ETAs and positions are all on that compressed real clock. Only the labels
shown to people (``10:42``) are simulated wall-clock times.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta


class SimClock:
    """``speed`` simulated seconds pass per real second, from :meth:`start` on."""

    def __init__(self, speed: float, day_start: datetime) -> None:
        if not speed > 0:
            raise ValueError(f"time compression must be positive, not {speed}")
        self.speed = float(speed)
        self.day_start = day_start
        self.t0 = time.time()

    def start(self) -> None:
        """Simulated minute 0 is now."""
        self.t0 = time.time()

    def minutes(self) -> float:
        """Simulated minutes since the day started."""
        return (time.time() - self.t0) * self.speed / 60.0

    def real_at(self, sim_min: float) -> datetime:
        """The real (UTC) time at which simulated minute ``sim_min`` happens."""
        return datetime.fromtimestamp(self.t0 + sim_min * 60.0 / self.speed, UTC)

    def real_seconds(self, sim_min: float) -> float:
        """How many real seconds ``sim_min`` simulated minutes take."""
        return sim_min * 60.0 / self.speed

    def label(self, sim_min: float | None = None) -> str:
        """``HH:MM`` of the simulated day."""
        m = self.minutes() if sim_min is None else sim_min
        return (self.day_start + timedelta(minutes=m)).strftime("%H:%M")

    def label_of(self, real: datetime) -> str:
        """``HH:MM`` of the simulated day at which a real timestamp happened."""
        return self.label((real.timestamp() - self.t0) * self.speed / 60.0)

    async def sleep(self, sim_min: float, *, min_real: float = 0.0, max_real: float | None = None) -> None:
        """Sleep ``sim_min`` simulated minutes (bounded in real seconds)."""
        real = max(min_real, self.real_seconds(sim_min))
        if max_real is not None:
            real = min(real, max_real)
        await asyncio.sleep(max(real, 0.0))

    async def until(self, sim_min: float) -> None:
        """Sleep until simulated minute ``sim_min``."""
        left = self.real_seconds(sim_min - self.minutes())
        if left > 0:
            await asyncio.sleep(left)
