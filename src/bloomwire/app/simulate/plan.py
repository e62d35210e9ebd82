"""The simulated day, planned up front from a seed: pure data, no I/O, no clock.

Everything that decides how an order ENDS is drawn here, from ``random.Random(seed)``: which
orders get cancelled, whose customer cannot be reached, which address is wrong. So the same seed
gives the same order outcomes, however the run's timing turns out (which rider delivers, and
when, depends on real MQTT round trips and on the dispatch service). Incidents that only cost time
(a flat tyre, a rider's app dying, a declined offer, a customer chatting) are planned here too.

Coordinates are real Berlin places: six flower shops in different districts, customers within a
few kilometres of their shop inside the city.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from bloomwire.app.clients.access import customer_username
from bloomwire.contract import geo
from bloomwire.contract.events import Language

#: South-west and north-east corners the customers live in (inner Berlin, inside the Ring-ish).
BERLIN_BOX = (52.455, 13.285, 52.565, 13.500)


@dataclass(frozen=True)
class ShopSite:
    """A flower shop: id, display name, position, street address."""

    id: str
    name: str
    lat: float
    lon: float
    address: str


SHOPS: tuple[ShopSite, ...] = (
    ShopSite("rosen-mitte", "Rosen Mitte", 52.52490, 13.40270, "Rosenthaler Str. 40, 10178 Berlin"),
    ShopSite("tulpe-kreuzberg", "Tulpe Kreuzberg", 52.48900, 13.39530, "Bergmannstr. 12, 10961 Berlin"),
    ShopSite("mohn-prenzlberg", "Mohn Prenzlauer Berg", 52.53640, 13.41760, "Kollwitzstr. 51, 10405 Berlin"),
    ShopSite(
        "flieder-fhain", "Flieder Friedrichshain", 52.51050, 13.45930, "Boxhagener Str. 33, 10245 Berlin"
    ),
    ShopSite("lilie-charlottenburg", "Lilie Charlottenburg", 52.50610, 13.32170, "Kantstr. 21, 10623 Berlin"),
    ShopSite("nelke-neukoelln", "Nelke Neukölln", 52.48110, 13.43480, "Weserstr. 160, 12045 Berlin"),
)

STREETS = (
    "Oranienstr.",
    "Kastanienallee",
    "Schönhauser Allee",
    "Karl-Marx-Allee",
    "Warschauer Str.",
    "Torstr.",
    "Invalidenstr.",
    "Sonnenallee",
    "Greifswalder Str.",
    "Danziger Str.",
    "Gneisenaustr.",
    "Yorckstr.",
    "Skalitzer Str.",
    "Wiener Str.",
    "Kottbusser Damm",
    "Hermannstr.",
    "Potsdamer Str.",
    "Brunnenstr.",
    "Bernauer Str.",
    "Frankfurter Allee",
    "Simon-Dach-Str.",
    "Pappelallee",
    "Wilmersdorfer Str.",
    "Mehringdamm",
    "Urbanstr.",
    "Lychener Str.",
)
FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Elif", "Finn", "Greta", "Hannah", "Ilias", "Jana",
    "Karim", "Lena", "Mia", "Noah", "Olga", "Paul", "Rosa", "Samir", "Tom", "Yara",
)  # fmt: skip
LAST_NAMES = (
    "Schmidt", "Müller", "Yılmaz", "Weber", "Nowak", "Fischer", "Wagner", "Becker", "Kaya",
    "Hoffmann", "Schulz", "Richter", "Wolf", "Neumann", "Krüger", "Schwarz",
)  # fmt: skip
ITEMS = (
    "12 red roses",
    "Tulip bouquet, spring mix",
    "Peonies, pale pink",
    "5 sunflowers",
    "Orchid in a pot",
    "Seasonal bouquet M",
    "Seasonal bouquet L",
    "White lilies",
    "Ranunculus bunch",
    "Dried-flower wreath",
    "Greeting card",
    "Glass vase, medium",
)
NOTES = (
    "",
    "",
    "",
    "Birthday — please smile",
    "Ring twice",
    "4th floor, no lift",
    "Leave with neighbour if out",
)
CUSTOMER_LINES = (
    "Please ring twice, the bell is quiet.",
    "I'm in the back garden, just come round.",
    "Could you leave it with the neighbour if I'm not in?",
    "Is it on its way? Thank you!",
)


class Fate(StrEnum):
    """How an order ends."""

    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    UNREACHABLE = "failed:customer_unreachable"
    ADDRESS_WRONG = "failed:address_wrong"


@dataclass(frozen=True)
class Rates:
    """Incident probabilities per order (fates are exclusive; the others combine)."""

    cancel: float = 0.05
    unreachable: float = 0.06
    address_wrong: float = 0.03
    flat_tyre: float = 0.10
    app_dies: float = 0.08
    decline: float = 0.15
    customer_chat: float = 0.30

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"incident rate {name} must be between 0 and 1, not {value!r}")
        if self.cancel + self.unreachable + self.address_wrong > 1.0:
            raise ValueError("cancel + unreachable + address_wrong rates add up to more than 1")


@dataclass(frozen=True)
class RiderPlan:
    """A rider of the day."""

    id: str
    vehicle: str
    speed_kmh: float
    lat: float
    lon: float
    capacity: int = 3


@dataclass(frozen=True)
class OrderPlan:
    """An order of the day and everything that will happen to it.

    Times are simulated minutes after the day starts.
    """

    index: int
    id: str
    shop: str
    customer: str
    phone: str
    address: str
    lat: float
    lon: float
    items: tuple[str, ...]
    note: str
    created_min: float
    ready_min: float
    window_start_min: float
    window_end_min: float
    fate: Fate
    cancel_after_min: float | None = None
    flat_tyre_delay_min: float | None = None
    app_dies_down_min: float | None = None
    decline_first: bool = False
    customer_chat: str | None = None
    #: Where on the delivery leg (0..1) the flat tyre or the dying app strikes.
    incident_at: float = 0.5

    @property
    def outcome(self) -> str:
        """The expected final outcome, e.g. ``delivered`` or ``failed:customer_unreachable``."""
        return self.fate.value

    @property
    def language(self) -> Language | None:
        """Every fourth customer (by a hash of the order id, not the seed's draws) reads Chinese;
        the others get the shop's language."""
        return Language.ZH_CN if zlib.crc32(self.id.encode()) % 4 == 0 else None


@dataclass(frozen=True)
class DayPlan:
    """Shops, riders and orders of one simulated day."""

    seed: int
    day_minutes: float
    shops: tuple[ShopSite, ...]
    riders: tuple[RiderPlan, ...]
    orders: tuple[OrderPlan, ...]
    rates: Rates = field(default_factory=Rates)

    def outcomes(self) -> dict[str, str]:
        """Order id -> expected outcome."""
        return {o.id: o.outcome for o in self.orders}

    def outcome_counts(self) -> Counter[str]:
        """How many orders end each way."""
        return Counter(o.outcome for o in self.orders)

    def shop(self, shop_id: str) -> ShopSite:
        """The shop with this id."""
        for s in self.shops:
            if s.id == shop_id:
                return s
        raise KeyError(shop_id)

    def order(self, order_id: str) -> OrderPlan:
        """The order with this id."""
        for o in self.orders:
            if o.id == order_id:
                return o
        raise KeyError(order_id)

    def customers_tracking(self) -> list[str]:
        """Usernames of the customers that will open the tracker (they chat)."""
        return [customer_username(o.id) for o in self.orders if o.customer_chat is not None]


def _offset(lat: float, lon: float, dist_m: float, bearing: float) -> tuple[float, float]:
    dlat = dist_m * math.cos(bearing) / 111_320
    dlon = dist_m * math.sin(bearing) / (111_320 * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def _inside(lat: float, lon: float) -> bool:
    s, w, n, e = BERLIN_BOX
    return s <= lat <= n and w <= lon <= e


def _destination(rng: random.Random, shop: ShopSite) -> tuple[float, float]:
    for _ in range(50):
        lat, lon = _offset(shop.lat, shop.lon, rng.uniform(700, 4500), rng.uniform(0, 2 * math.pi))
        if _inside(lat, lon):
            return round(lat, 6), round(lon, 6)
    return shop.lat, shop.lon + 0.01  # pragma: no cover - the box always has room


def _creation_minute(rng: random.Random, span: float) -> float:
    """Orders come in with a lunchtime and a late-afternoon peak on a steady base."""
    u = rng.random()
    if u < 0.3:
        return rng.uniform(0, span)
    centre = 0.35 if u < 0.6 else 0.75
    return min(max(rng.gauss(centre * span, 0.12 * span), 0.0), span)


def plan_day(
    seed: int,
    *,
    orders: int = 24,
    riders: int = 6,
    shops: int = 3,
    day_minutes: float = 480.0,
    rates: Rates | None = None,
    order_prefix: str = "",
) -> DayPlan:
    """Plan a day: the same arguments always give the same plan.

    ``order_prefix`` goes in front of every order id (``o001`` …), so runs against a store that
    already holds an earlier run's orders do not collide; it does not change anything else.
    """
    if orders < 0 or riders < 1 or not 1 <= shops <= len(SHOPS):
        raise ValueError(f"need orders >= 0, riders >= 1 and 1..{len(SHOPS)} shops")
    if day_minutes < 30:
        raise ValueError("the simulated day must last at least 30 minutes")
    rates = rates or Rates()
    rng = random.Random(seed)
    sites = SHOPS[:shops]
    rider_plans = [_plan_rider(rng, i, sites[i % len(sites)]) for i in range(riders)]
    # Orders stop coming in well before closing, so the last ones can still be delivered.
    span = day_minutes * 0.8
    minutes = sorted(_creation_minute(rng, span) for _ in range(orders))
    order_plans = [
        _plan_order(rng, k, created, sites, rates, f"{order_prefix}o{k + 1:03d}")
        for k, created in enumerate(minutes)
    ]
    return DayPlan(seed, day_minutes, tuple(sites), tuple(rider_plans), tuple(order_plans), rates)


def _plan_rider(rng: random.Random, i: int, home: ShopSite) -> RiderPlan:
    vehicle = "scooter" if rng.random() < 0.4 else "bike"
    speed = rng.uniform(20, 25) if vehicle == "scooter" else rng.uniform(15, 20)
    lat, lon = _offset(home.lat, home.lon, rng.uniform(50, 600), rng.uniform(0, 2 * math.pi))
    return RiderPlan(f"r{i + 1:02d}", vehicle, round(speed, 1), round(lat, 6), round(lon, 6))


def _fate(u: float, rates: Rates) -> Fate:
    if u < rates.cancel:
        return Fate.CANCELLED
    if u < rates.cancel + rates.unreachable:
        return Fate.UNREACHABLE
    if u < rates.cancel + rates.unreachable + rates.address_wrong:
        return Fate.ADDRESS_WRONG
    return Fate.DELIVERED


def _plan_order(
    rng: random.Random, k: int, created: float, sites: Sequence[ShopSite], rates: Rates, order_id: str
) -> OrderPlan:
    """One order; the draws happen in a fixed order, so a seed always gives the same day."""
    shop = sites[rng.randrange(len(sites))]
    lat, lon = _destination(rng, shop)
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    phone = f"+49 30 {rng.randrange(1000000, 9999999)}"
    address = f"{rng.choice(STREETS)} {rng.randrange(1, 180)}, Berlin"
    items = tuple(rng.sample(ITEMS, rng.choice((1, 1, 2, 3))))
    prep = rng.uniform(8, 25)
    ride_min = geo.travel_seconds(geo.distance_m(shop.lat, shop.lon, lat, lon), 18.0) / 60
    # The shop promises a window it can meet: prep + ride + slack, on a quarter hour.
    # Some promises are tight: a flat tyre or a busy hour makes those late.
    earliest = created + prep + ride_min + rng.uniform(-10, 30)
    start = math.ceil(earliest / 15) * 15
    length = rng.choice((30, 60, 60, 60, 90))
    fate = _fate(rng.random(), rates)
    # Draw every optional incident whatever the fate, so one rate change does not reshuffle
    # the rest of the day.
    flat = rng.uniform(10, 25) if rng.random() < rates.flat_tyre else None
    dies = rng.uniform(6, 15) if rng.random() < rates.app_dies else None
    decline = rng.random() < rates.decline
    chat = rng.choice(CUSTOMER_LINES) if rng.random() < rates.customer_chat else None
    cancel_after = rng.uniform(2, 6)
    incident_at = rng.uniform(0.3, 0.7)
    if fate is Fate.CANCELLED:
        flat = dies = None
    if fate in (Fate.CANCELLED, Fate.UNREACHABLE):
        chat = None  # an unreachable customer does not answer the phone, let alone the chat
    return OrderPlan(
        index=k,
        id=order_id,
        shop=shop.id,
        customer=name,
        phone=phone,
        address=address,
        lat=lat,
        lon=lon,
        items=items,
        note=rng.choice(NOTES),
        created_min=round(created, 2),
        ready_min=round(created + prep, 2),
        window_start_min=float(start),
        window_end_min=float(start + length),
        fate=fate,
        cancel_after_min=round(cancel_after, 2) if fate is Fate.CANCELLED else None,
        flat_tyre_delay_min=round(flat, 1) if flat is not None else None,
        app_dies_down_min=round(dies, 1) if dies is not None else None,
        decline_first=decline,
        customer_chat=chat,
        incident_at=round(incident_at, 3),
    )


def rename(plan: DayPlan, shop_ids: Sequence[str] = (), rider_ids: Sequence[str] = ()) -> DayPlan:
    """The same day with the shops and riders called by the given ids (in plan order).

    E.g. to play the day with the accounts ``bloomwire up`` provisions (``s1``…, ``r1``…).
    Nothing else changes, outcomes included.
    """
    if shop_ids and len(shop_ids) != len(plan.shops):
        raise ValueError(f"{len(shop_ids)} shop id(s) given for {len(plan.shops)} shops")
    if rider_ids and len(rider_ids) != len(plan.riders):
        raise ValueError(f"{len(rider_ids)} rider id(s) given for {len(plan.riders)} riders")
    shop_map = dict(zip((s.id for s in plan.shops), shop_ids, strict=True)) if shop_ids else {}
    shops = tuple(replace(s, id=shop_map.get(s.id, s.id)) for s in plan.shops)
    riders = tuple(
        replace(r, id=new)
        for r, new in zip(plan.riders, rider_ids or [r.id for r in plan.riders], strict=True)
    )
    orders = tuple(replace(o, shop=shop_map.get(o.shop, o.shop)) for o in plan.orders)
    return replace(plan, shops=shops, riders=riders, orders=orders)


def outcome_of(status: str, failure_reason: str | None) -> str:
    """The outcome an order's final status stands for (``returned`` keeps its failure reason)."""
    if status in ("failed", "returned"):
        return f"failed:{failure_reason or 'other'}"
    return status
