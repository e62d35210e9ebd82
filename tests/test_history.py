"""``bloomwire history ORDER``: an order's whole story from the store, in order, on both stores."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog
from rich.console import Console
from sqlalchemy import Engine
from test_persister import (
    BASE_LAT,
    BASE_LON,
    DEG_PER_M,
    SHOP,
    Clock,
    Desk,
    Msg,
    ack_alert,
    chat,
    create_order,
    customer_chat,
    location,
    offer,
    raise_alert,
    reply,
    status,
)
from typer.testing import CliRunner, Result

from bloomwire.app.cli import app
from bloomwire.app.history import load_history, render_history
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import BloomwireError
from bloomwire.store import open_store

#: Where each line of the story happened, minutes after the order was created.
STORY = [
    (0.0, "created", "for Ann"),
    (0.2, "offer", "offered to r1"),
    (0.4, "reply", "accepted offer of-o1"),
    (5.0, "status", "picked_up"),
    (5.5, "positions", "10 trail points, 0.9 km"),
    (6.0, "chat", "Leaving the shop now"),
    (7.0, "alert", "[warning] running late"),
    (8.0, "chat", "Please ring twice [/] or knock [bold]hard[/bold]"),
    (9.0, "alert", "acknowledged by Mia"),
    (10.0, "status", "en_route"),
    (20.0, "alert", "resolved"),
    (25.0, "status", "arrived"),
    (26.0, "status", "delivered"),
]


def at(msg: Msg, when: datetime) -> Msg:
    """``msg`` as if sent at ``when`` (its CloudEvents ``time``)."""
    body = json.loads(msg.payload)
    body["time"] = when.isoformat()
    return Msg(msg.topic, json.dumps(body).encode(), msg.id)


def resolve_alert(alert_id: str) -> Msg:
    event = ev.AlertResolvedEvent(
        source="services/alerts", data=ev.AlertResolved(alert=alert_id, reason="arrived")
    )
    return Msg(topics.service_events("alerts"), ev.encode(event), event.id)


@pytest.fixture
def store(database_url: str) -> Iterator[Engine]:
    engine = open_store(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def story(store: Engine) -> datetime:
    """Order o1 of shop s1 from creation to delivery, an hour ago; returns when it was created."""
    t0 = (ev.now() - timedelta(hours=1)).replace(microsecond=0)
    desk = Desk(store, Clock())

    def m(minutes: float) -> datetime:
        return t0 + timedelta(minutes=minutes)

    desk.ok(at(create_order(SHOP, "o1", name="Ann"), m(0)))
    desk.ok(at(offer("o1", "r1"), m(0.2)))
    desk.ok(at(reply("r1", "of-o1", "o1"), m(0.4)))
    desk.ok(at(status("r1", "o1", "picked_up"), m(5)))
    # Ten pings, 100 m and 30 s apart: ten trail points, 900 m between the first and the last.
    first = int(m(5.5).timestamp())
    for k in range(10):
        desk.ok(location("r1", BASE_LAT + k * 100 * DEG_PER_M, BASE_LON, first + 30 * k))
    desk.ok(at(chat("r1", "o1", "Leaving the shop now"), m(6)))
    desk.ok(at(raise_alert("o1", "al-1", "running late"), m(7)))
    desk.ok(at(customer_chat("c-o1", "Please ring twice [/] or knock [bold]hard[/bold]"), m(8)))
    desk.ok(at(ack_alert(SHOP, "al-1"), m(9)))
    desk.ok(at(status("r1", "o1", "en_route"), m(10)))
    desk.ok(at(resolve_alert("al-1"), m(20)))
    desk.ok(at(status("r1", "o1", "arrived"), m(25)))
    desk.ok(at(status("r1", "o1", "delivered"), m(26)))
    # Another order's story does not leak into this one.
    desk.ok(create_order(SHOP, "o2", name="Bea"), offer("o2", "r2"))
    desk.ok(chat("r2", "o2", "Not this one"))
    desk.projector.close()
    return t0


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """A runner for ``bloomwire``; the CLI sets logging up for the process, undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield CliRunner()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def history(cli: CliRunner, data_dir: Path, database_url: str | None, *args: str) -> Result:
    env = {"COLUMNS": "220", "BLOOMWIRE_DATABASE_URL": database_url}
    return cli.invoke(app, ["--data-dir", str(data_dir), "history", *args], env=env)


def test_history_prints_the_timeline_in_order(
    cli: CliRunner, story: datetime, database_url: str, tmp_path: Path
) -> None:
    result = history(cli, tmp_path / "data", database_url, "o1")
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert "Order o1 of shop s1" in header and "delivered" in header and "rider r1" in header
    assert "customer Ann" in header
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == len(STORY), "\n".join(rows)
    for row, (minutes, kind, what) in zip(rows, STORY, strict=True):
        cells = [c.strip() for c in row.strip("│").split("│")]
        expected_time = f"{story + timedelta(minutes=minutes):%Y-%m-%d %H:%M:%S}"
        assert (cells[0], cells[1]) == (expected_time, kind), row
        assert what in cells[3], row
    assert "Not this one" not in result.stdout


def test_history_reads_positions_as_a_summary(story: datetime, database_url: str) -> None:
    found = load_history(database_url, "o1")
    assert found.trail_points == 10
    assert found.trail_km == pytest.approx(0.9, abs=0.01)
    assert [e.kind for e in found.entries].count("positions") == 1
    assert [e.at for e in found.entries] == sorted(e.at for e in found.entries)
    console = Console(record=True, width=200)
    render_history(found, console)
    text = console.export_text()
    assert "10 trail points, 0.9 km" in text
    assert text.count("running late") == 1, "an alert is told once, from its own row"


def test_unknown_order_is_a_clear_error(
    cli: CliRunner, story: datetime, database_url: str, tmp_path: Path
) -> None:
    parts = urllib.parse.urlsplit(database_url)
    if parts.hostname:  # a server: give the URL a password, which must not be printed
        database_url = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{parts.username}:hunter2@{parts.hostname}:{parts.port}")
        )
    result = history(cli, tmp_path / "data", database_url, "nope")
    assert result.exit_code == 1
    assert "error" in result.stderr and "no order 'nope'" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert "hunter2" not in result.output
    with pytest.raises(BloomwireError, match="no order 'nope'"):
        load_history(database_url, "nope")


def test_history_without_a_store_is_a_clear_error(cli: CliRunner, tmp_path: Path) -> None:
    data_dir = tmp_path / "never-used"
    result = history(cli, data_dir, None, "o1")
    assert result.exit_code == 1
    assert "no store at" in result.stderr and "Traceback" not in result.output
    assert not data_dir.exists(), "looking must not create an empty store"

    empty = tmp_path / "empty.db"
    empty.touch()  # a file that is no Bloomwire store
    result = history(cli, data_dir, f"sqlite:///{empty}", "o1")
    assert result.exit_code == 1
    assert "cannot read the store" in result.stderr and "Traceback" not in result.output
