"""A shop's customer ratings from the store: ``bloomwire shop ratings`` (averages per rider, per day).

Read from the orders table (the persister keeps each order's one rating there; the ``order.rated``
events are their record), so it covers every rated order, not only those still retained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from bloomwire.errors import BloomwireError
from bloomwire.store import make_engine
from bloomwire.store.models import ORDERS


@dataclass
class Average:
    """How many ratings, and their mean."""

    count: int = 0
    total: int = 0

    def add(self, stars: int) -> None:
        self.count += 1
        self.total += stars

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class Ratings:
    """A shop's ratings: overall, per rider and per delivery day (UTC)."""

    shop: str
    overall: Average = field(default_factory=Average)
    by_rider: dict[str, Average] = field(default_factory=dict)
    by_day: dict[date, Average] = field(default_factory=dict)

    def add(self, rider: str | None, day: date, stars: int) -> None:
        self.overall.add(stars)
        self.by_rider.setdefault(rider or "(none)", Average()).add(stars)
        self.by_day.setdefault(day, Average()).add(stars)


def load_ratings(database_url: str, shop: str) -> Ratings:
    """Every rated order of ``shop``, averaged; :class:`BloomwireError` if the store cannot be read."""
    url = make_url(database_url)
    engine = make_engine(database_url, readonly=True)
    o = ORDERS.c
    query = (
        sa.select(o.rider, o.delivered_at, o.updated_at, o.rating)
        .where(o.shop == shop, o.rating.is_not(None))
        .order_by(o.delivered_at)
    )
    found = Ratings(shop)
    try:
        with engine.connect() as conn:
            for rider, delivered_at, updated_at, stars in conn.execute(query):
                found.add(rider, (delivered_at or updated_at).date(), stars)
    except sa.exc.SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        where = url.render_as_string(hide_password=True)
        raise BloomwireError(f"cannot read the store at {where}: {cause}") from None
    finally:
        engine.dispose()
    return found


def render_ratings(found: Ratings, console: Console) -> None:
    """The overall average, then a table per rider and per day."""
    if not found.overall.count:
        console.print(Text(f"Shop {found.shop}: no ratings yet."))
        return
    console.print(
        Text(f"Shop {found.shop}: {found.overall.mean:.2f} stars over {found.overall.count} rated orders")
    )
    riders = Table("rider", "ratings", "average")
    for rider, avg in sorted(found.by_rider.items()):
        riders.add_row(Text(rider), str(avg.count), f"{avg.mean:.2f}")
    console.print(riders)
    days = Table("day (UTC)", "ratings", "average")
    for day, avg in sorted(found.by_day.items()):
        days.add_row(day.isoformat(), str(avg.count), f"{avg.mean:.2f}")
    console.print(days)
