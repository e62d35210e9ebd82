"""A shop's customer ratings from the store: ``bloomwire shop ratings`` (each rated order, and the
averages per rider and per day beside them).

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


@dataclass(frozen=True)
class Rated:
    """One rated order: who delivered it, on which day (UTC), the stars and the comment."""

    order: str
    rider: str
    day: date
    stars: int
    comment: str = ""


@dataclass
class Ratings:
    """A shop's ratings: each rated order (by delivery), overall, per rider and per delivery day (UTC)."""

    shop: str
    overall: Average = field(default_factory=Average)
    by_rider: dict[str, Average] = field(default_factory=dict)
    by_day: dict[date, Average] = field(default_factory=dict)
    orders: list[Rated] = field(default_factory=list)

    def add(self, rider: str | None, day: date, stars: int, *, order: str = "", comment: str = "") -> None:
        self.orders.append(Rated(order, rider or "(none)", day, stars, comment))
        self.overall.add(stars)
        self.by_rider.setdefault(rider or "(none)", Average()).add(stars)
        self.by_day.setdefault(day, Average()).add(stars)


def load_ratings(database_url: str, shop: str) -> Ratings:
    """Every rated order of ``shop``, averaged; :class:`BloomwireError` if the store cannot be read."""
    url = make_url(database_url)
    engine = make_engine(database_url, readonly=True)
    o = ORDERS.c
    query = (
        sa.select(o.id, o.rider, o.delivered_at, o.updated_at, o.rating, o.rating_comment)
        .where(o.shop == shop, o.rating.is_not(None))
        .order_by(o.delivered_at, o.id)
    )
    found = Ratings(shop)
    try:
        with engine.connect() as conn:
            for order, rider, delivered_at, updated_at, stars, comment in conn.execute(query):
                day = (delivered_at or updated_at).date()
                found.add(rider, day, stars, order=order, comment=comment or "")
    except sa.exc.SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        where = url.render_as_string(hide_password=True)
        raise BloomwireError(f"cannot read the store at {where}: {cause}") from None
    finally:
        engine.dispose()
    return found


def render_ratings(found: Ratings, console: Console) -> None:
    """The overall average, the rated orders, and beside them the averages per rider and per day."""
    if not found.overall.count:
        console.print(Text(f"Shop {found.shop}: no ratings yet."))
        return
    console.print(
        Text(f"Shop {found.shop}: {found.overall.mean:.2f} stars over {found.overall.count} rated orders")
    )
    orders = Table("order", "rider", "day (UTC)", "stars", "comment", title="Rated orders")
    for rated in found.orders:
        orders.add_row(
            Text(rated.order), Text(rated.rider), rated.day.isoformat(), str(rated.stars), Text(rated.comment)
        )
    riders = Table("rider", "ratings", "average", title="Per rider")
    for rider, avg in sorted(found.by_rider.items()):
        riders.add_row(Text(rider), str(avg.count), f"{avg.mean:.2f}")
    days = Table("day (UTC)", "ratings", "average", title="Per day")
    for day, avg in sorted(found.by_day.items()):
        days.add_row(day.isoformat(), str(avg.count), f"{avg.mean:.2f}")
    console.print(orders)
    console.print(riders)
    console.print(days)
