"""An order's whole story, read from the store: ``bloomwire history ORDER``."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from bloomwire.contract import geo
from bloomwire.errors import BloomwireError
from bloomwire.store import make_engine
from bloomwire.store.models import ALERTS, CHAT, EVENTS, ORDERS, TRAIL


@dataclass
class Entry:
    """One line of the timeline."""

    at: datetime
    kind: str
    who: str
    what: str


@dataclass
class History:
    """An order, its timeline in order, and a summary of the rider's positions."""

    order: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    trail_points: int = 0
    trail_km: float = 0.0


def _describe(event: Any) -> tuple[str, str]:
    d = event.data
    match event.type:
        case "order.created":
            return (
                "created",
                f"for {d['customer']['name']}, window {d['window']['start']} → {d['window']['end']}",
            )
        case "order.status_changed":
            extra = f" ({d['reason']})" if d.get("reason") else ""
            return "status", f"{d['status']}{extra} {d.get('note', '')}".strip()
        case "order.incident_reported":
            eta = f", new ETA {d['eta']}" if d.get("eta") else ""
            return "incident", f"{d['reason']}{eta} {d.get('note', '')}".strip()
        case "order.cancelled":
            return "status", f"cancelled {d.get('reason', '')}".strip()
        case "dispatch.offered":
            return (
                "offer",
                f"offered to {d['rider']} ({d.get('mode', 'single')}, cost {d.get('cost', 0):.0f})",
            )
        case "dispatch.replied":
            return "reply", ("accepted" if d["accept"] else "declined") + f" offer {d['offer'][:8]}"
        case "dispatch.expired":
            return "offer", f"offer to {d['rider']} timed out"
        case "order.notified":
            return "notice", f"told the customer ({d['kind']}, {d['language']}): {d['text']}"
        case "order.rated":
            comment = f": {d['comment']}" if d.get("comment") else ""
            return "rating", f"{d['stars']} of 5 stars{comment}"
        case "order.assigned":
            return "assign", f"shop assigned {d['rider']}"
        case "order.photo_attached":
            p = d["photo"]
            kb = p["size"] / 1024
            return (
                "photo",
                f"{p['content_type']} {p['width']}x{p['height']}, {kb:.0f} KiB, sha256 {p['sha256'][:12]}",
            )
        case "rider.region_changed":
            region = d.get("region") or d.get("region_id") or f"{d['lat']:.5f},{d['lon']:.5f}"
            verb = "entered" if d["event"] == "enter" else "left"
            return "region", f"{verb} {region} ({d['device']})"
        case "order.amended":
            return "amended", _amended(d)
        case "order.amendment_confirmed":
            return "amended", f"rider confirmed amendment {d['amendment'][:8]}"
        case _:
            return event.type, ""


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _amended(d: dict[str, Any]) -> str:
    """``field: old → new`` for each change, then whose wish it was and why."""
    parts = [f"{k}: {_shown(c.get('old'))} → {_shown(c.get('new'))}" for k, c in d.get("changes", {}).items()]
    who = "at the customer's request" if d.get("asked_by") == "customer" else "by the shop"
    reason = f": {d['reason']}" if d.get("reason") else ""
    return f"{'; '.join(parts)} ({who}{reason})"


#: Event types told from their own tables (chat lines, alerts with their whole life), not from events.
_FROM_TABLES = (
    "order.chat_posted",
    "alert.raised",
    "alert.escalated",
    "alert.resolved",
    "alert.acknowledged",
)


def load_history(database_url: str, order_id: str) -> History:
    """Read everything the store knows about ``order_id``.

    Raises :class:`BloomwireError` for an unknown order or a store that cannot be read (missing
    SQLite file, no schema, server down), naming the store without its password.
    """
    url = make_url(database_url)
    where = url.render_as_string(hide_password=True)
    file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
    if file and not Path(file).exists():  # opening it would create an empty one
        raise BloomwireError(f"no store at {file}: nothing has been recorded there yet")
    engine = make_engine(database_url, readonly=True)
    try:
        with engine.connect() as conn:
            return _read(conn, order_id, where)
    except sa.exc.SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise BloomwireError(
            f"cannot read the store at {where}: {cause} (is it a Bloomwire store? `bloomwire db upgrade`)"
        ) from None
    finally:
        engine.dispose()


def _read(conn: sa.Connection, order_id: str, where: str) -> History:
    row = conn.execute(sa.select(ORDERS).where(ORDERS.c.id == order_id)).first()
    if row is None:
        raise BloomwireError(f"no order {order_id!r} in the store at {where}")
    found = History(order=dict(row._mapping))
    events = conn.execute(
        sa.select(EVENTS)
        .where(EVENTS.c.order_id == order_id)
        .where(EVENTS.c.type.not_in(_FROM_TABLES))
        .order_by(EVENTS.c.seq)
    )
    for e in events:
        kind, what = _describe(e)
        found.entries.append(Entry(e.time, kind, e.source, what))
    chats = conn.execute(sa.select(CHAT).where(CHAT.c.order_id == order_id))
    for c in chats:
        found.entries.append(Entry(c.at, "chat", f"{c.author_role}:{c.author}", c.text))
    alerts = conn.execute(sa.select(ALERTS).where(ALERTS.c.order_id == order_id))
    for a in alerts:
        found.entries.append(Entry(a.raised_at, "alert", a.rule, f"[{a.severity}] {a.message}"))
        if a.escalated_at:
            found.entries.append(Entry(a.escalated_at, "alert", a.rule, f"escalated to level {a.level}"))
        if a.acknowledged_at:
            found.entries.append(
                Entry(a.acknowledged_at, "alert", a.rule, f"acknowledged by {a.acknowledged_by}")
            )
        if a.resolved_at:
            found.entries.append(Entry(a.resolved_at, "alert", a.rule, "resolved"))
    points = conn.execute(sa.select(TRAIL).where(TRAIL.c.order_id == order_id).order_by(TRAIL.c.at)).all()
    found.trail_points = len(points)
    found.trail_km = (
        sum(geo.distance_m(a.lat, a.lon, b.lat, b.lon) for a, b in itertools.pairwise(points)) / 1000
    )
    if points:
        found.entries.append(
            Entry(
                points[0].at,
                "positions",
                points[0].rider,
                f"{len(points)} trail points, {found.trail_km:.1f} km, until {points[-1].at:%H:%M:%S}",
            )
        )
    found.entries.sort(key=lambda e: e.at)
    return found


def render_history(found: History, console: Console) -> None:
    """Print the order header and its timeline as a table.

    Whatever people typed (names, addresses, chat, alert messages) is printed as is, never read
    as Rich markup: ``[/]`` in a chat line would otherwise stop the command.
    """
    o = found.order
    where = escape(o["address"] or f"{o['lat']:.5f},{o['lon']:.5f}")
    rider = f" with rider {escape(o['rider'])}" if o["rider"] else ""
    console.print(
        f"[bold]Order {escape(o['id'])}[/bold] of shop {escape(o['shop'])} — [bold]{o['status']}[/bold]"
        f"{rider}; customer {escape(o['customer_name'])}, "
        f"{where}; promised {o['window_start']:%H:%M}-{o['window_end']:%H:%M}"
    )
    table = Table("time", "kind", "who", "what")
    for e in found.entries:
        table.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", Text(e.kind), Text(e.who), Text(e.what))
    console.print(table)
