"""The clients against a real Mosquitto and a real persister (child process): rider, shop, customer.

* The rider outbox: a ``bloomwire rider run`` process is SIGKILLed with unacknowledged status and
  chat events, the broker crashes (SIGKILL, its queue lost), the app starts again: every event is
  stored exactly once.
* A reconnecting rider app re-sends what was not acknowledged.
* ``track`` shows its own order and nothing else; ``shop watch --once`` renders a snapshot.
* Bad input: unknown orders, a missing credential, no broker: clear messages and exit codes.

The pure parts (outbox file, views, window and coordinate parsing) are in ``test_clients_units.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from conftest import Broker
from rich.console import Console
from sqlalchemy import Engine
from typer.testing import CliRunner

from bloomwire.app.cli import app
from bloomwire.app.clients.access import ProvisionedAccess, customer_username
from bloomwire.app.clients.base import Client, Outcome, UsageError, connect, release
from bloomwire.app.clients.commands import _refusal_code
from bloomwire.app.clients.outbox import Outbox
from bloomwire.app.clients.rider import RiderDevice
from bloomwire.app.clients.shop import OrderDraft, ShopTerminal
from bloomwire.app.clients.track import CustomerTracker
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import ensure_secret, free_port
from bloomwire.runtime.mqtt import Connection, Message
from bloomwire.runtime.settings import Settings
from bloomwire.store import open_store
from bloomwire.store.models import CHAT, EVENTS, ORDERS

T = TypeVar("T")
SHOP = "rosen-mitte"
HERE = (52.5249, 13.4027)
THERE = (52.5300, 13.4200)


# --- a backbone of the test's own ---------------------------------------------------------------


class Persister:
    """``bloomwire service run persister`` as a child process, as in production."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**env, "BLOOMWIRE_BROKER_USERNAME": "persister"}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bloomwire", "service", "run", "persister"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None


@dataclass
class Backbone:
    """A broker, a persister and a store; users are provisioned with passwords in the data dir."""

    broker: Broker
    data_dir: Path
    database_url: str
    engine: Engine
    persister: Persister

    @property
    def settings(self) -> Settings:
        """Settings of a client process (no identity of its own)."""
        return Settings(
            data_dir=self.data_dir,
            broker_host=self.broker.host,
            broker_port=self.broker.port,
            database_url=self.database_url,
        )

    @property
    def env(self) -> dict[str, str]:
        """Environment of a ``bloomwire`` child process pointing at this backbone."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
        return {
            **inherited,
            "BLOOMWIRE_BROKER_HOST": self.broker.host,
            "BLOOMWIRE_BROKER_PORT": str(self.broker.port),
            "BLOOMWIRE_DATA_DIR": str(self.data_dir),
            "BLOOMWIRE_DATABASE_URL": self.database_url,
            "BLOOMWIRE_LOG_LEVEL": "WARNING",
        }

    def start_persister(self) -> None:
        """Start the persister and wait until it says online (so it has subscribed)."""
        self.persister.start()
        asyncio.run(service_online(self.settings, "persister", self.user("operator")))

    def user(self, name: str) -> str:
        """Provision ``name`` (password in DATA_DIR/secrets, account on the broker)."""
        password = ensure_secret(self.data_dir, name)
        self.broker.add_user(name, password)
        return password

    def scalar(self, query: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def rows(self, query: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(query))


@pytest.fixture
def backbone(fresh_broker: Broker, tmp_path: Path) -> Iterator[Backbone]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = open_store(url)  # migrated before the persister starts
    bb = Backbone(fresh_broker, data_dir, url, engine, Persister({}, tmp_path / "persister.log"))
    bb.user("persister")
    bb.user("operator")  # watches services/persister/status
    bb.persister.env = {**bb.env, "BLOOMWIRE_BROKER_USERNAME": "persister", "BLOOMWIRE_LOG_LEVEL": "INFO"}
    bb.start_persister()
    yield bb
    bb.persister.stop()
    engine.dispose()


class _StatusWatch(Client):
    """The operator watching one service's retained status (a client that releases its sockets)."""

    what = "operator"
    status = b""

    def handle(self, msg: Message) -> None:
        self.status = msg.payload


async def service_online(settings: Settings, name: str, password: str, timeout: float = 60) -> None:
    """Wait until ``services/NAME/status`` says online."""
    watch = _StatusWatch(settings, "operator", password)
    watch.subscribe([topics.service_status(name)])
    await watch.start()
    try:
        await eventually(lambda: watch.status == b"online", timeout, f"{name} online")
    finally:
        await watch.stop()


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def draft(order: str, name: str = "Anna Schmidt") -> OrderDraft:
    now = ev.now()
    return OrderDraft(
        customer_name=name,
        lat=THERE[0],
        lon=THERE[1],
        window=ev.Window(start=now + timedelta(minutes=30), end=now + timedelta(minutes=90)),
        address="Kastanienallee 12, Berlin",
        items=["12 red roses"],
        order=order,
        pickup=HERE,
    )


async def accepted_order(bb: Backbone, order: str, rider: str, outbox: Path) -> None:
    """Create ``order`` at the shop, assign it to ``rider``, and let the rider's app accept it."""
    terminal = ShopTerminal(bb.settings, SHOP, bb.user(SHOP))
    await terminal.start()
    box = Outbox(outbox)
    device = RiderDevice(bb.settings, rider, bb.user(rider), box)
    accepted: list[str] = []

    class Accept:
        def offer(self, offer: ev.DispatchOfferedEvent) -> None:
            accepted.append(device.reply(offer.data.offer, True))

        def chat(self, chat: ev.OrderChatPostedEvent) -> None: ...
        def stored(self, entries: Any) -> None: ...
        def refused(self, entry: Any, refusal: ev.Refusal) -> None: ...

    device.listener = Accept()
    await device.start()
    try:
        created = await terminal.create_order(draft(order))
        assert created.outcome.stored, created.outcome.reason
        await eventually(lambda: terminal.view.orders.get(order) is not None, what="order state")
        # The persister knows the rider once its presence is stored: retry until it is.
        for _ in range(50):
            outcome = await terminal.assign(order, rider)
            if outcome.stored:
                break
            assert "offline" in outcome.reason or "unknown rider" in outcome.reason, outcome.reason
            await asyncio.sleep(0.1)
        await eventually(lambda: bool(accepted), what="the offer")
        assert (await device.wait(accepted[0])).stored
        await eventually(lambda: terminal.view.orders[order].status == "accepted", what="accepted")
    finally:
        await device.stop()
        box.close()
        await terminal.stop()


# --- the outbox across a kill and a broker crash ------------------------------------------------


@pytest.mark.timeout(180)
def test_outbox_survives_app_kill_and_broker_crash(backbone: Backbone, tmp_path: Path) -> None:
    bb = backbone
    rider, order = "r1", "o-kill"
    outbox = tmp_path / "r1-outbox.db"
    run(accepted_order(bb, order, rider, outbox))

    bb.persister.stop()  # nothing gets acknowledged from here on
    app_proc = subprocess.Popen(
        [
            sys.executable, "-m", "bloomwire", "rider", "run", rider,
            "--outbox", str(outbox), "--at", "52.5249,13.4027", "--interval", "0.5", "--offers", "accept",
        ],
        env=bb.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert app_proc.stdin is not None
        app_proc.stdin.write(
            f"status {order} picked_up\nchat {order} got the roses\n"
            f"status {order} en_route\nchat {order} ten minutes away\n".encode()
        )
        app_proc.stdin.flush()
        deadline = time.monotonic() + 30
        while True:
            box = Outbox(outbox)
            try:
                sent = [e for e in box.pending() if e.kind != "location" and e.attempts >= 1]
            finally:
                box.close()
            if len(sent) == 4:
                break
            assert app_proc.poll() is None, app_proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the rider app did not publish its events"
            time.sleep(0.1)
        ids = [e.id for e in sent]
    finally:
        app_proc.kill()  # SIGKILL: no clean disconnect, nothing flushed
        out, _ = app_proc.communicate(timeout=30)
    assert app_proc.returncode == -signal.SIGKILL, out.decode()

    bb.broker.kill()  # the broker crashes too: what it queued since its last autosave is gone
    bb.broker.start()
    bb.start_persister()

    async def restart_app() -> int:
        box = Outbox(outbox)
        device = RiderDevice(bb.settings, rider, bb.user(rider), box)
        try:
            assert box.count(records_only=True) == 4
            await device.start()  # re-sends everything the outbox holds
            await eventually(lambda: box.count(records_only=True) == 0, 60, "acks of the re-sent events")
            return device.resends
        finally:
            await device.stop()
            box.close()

    resends = run(restart_app())
    assert resends >= 4
    stored = bb.rows(sa.select(EVENTS.c.id, EVENTS.c.type).where(EVENTS.c.id.in_(ids)))
    assert sorted(r.id for r in stored) == sorted(ids)  # each exactly once (and the id is unique)
    assert bb.scalar(sa.select(sa.func.count()).select_from(CHAT).where(CHAT.c.order_id == order)) == 2
    assert bb.scalar(sa.select(ORDERS.c.status).where(ORDERS.c.id == order)) == "en_route"


@pytest.mark.timeout(120)
def test_reconnecting_app_resends_what_was_not_acknowledged(backbone: Backbone, tmp_path: Path) -> None:
    bb = backbone
    rider, order = "r2", "o-reconnect"
    outbox = tmp_path / "r2-outbox.db"
    run(accepted_order(bb, order, rider, outbox))

    async def scenario() -> list[str]:
        box = Outbox(outbox)
        device = RiderDevice(bb.settings, rider, bb.user(rider), box)
        await device.start()
        try:
            bb.persister.stop()
            ids = [device.status(order, "picked_up"), device.chat(order, "on my way")]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(bb.broker.kill)  # the app sees the connection drop …
            await asyncio.to_thread(bb.broker.start)
            await eventually(lambda: device.conn.generation >= 2, 30, "the reconnection")
            await asyncio.to_thread(bb.start_persister)
            outcomes = [await device.wait(i, 60) for i in ids]  # … and re-sends on its own
            assert all(o.stored for o in outcomes), outcomes
            assert box.count(records_only=True) == 0
            return ids
        finally:
            await device.stop()
            box.close()

    ids = run(scenario())
    assert bb.scalar(sa.select(sa.func.count()).select_from(EVENTS).where(EVENTS.c.id.in_(ids))) == 2


# --- customer and shop views --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_track_shows_only_its_own_order(backbone: Backbone) -> None:
    bb = backbone

    async def scenario() -> tuple[str, CustomerTracker]:
        terminal = ShopTerminal(bb.settings, SHOP, bb.user(SHOP), access=ProvisionedAccess(bb.user))
        await terminal.start()
        try:
            mine = await terminal.create_order(draft("o-mine", "Clara Weber"))
            other = await terminal.create_order(draft("o-other", "Ben Nowak"))
            assert mine.access is not None and mine.access.password
            assert mine.access.username == customer_username("o-mine")
            tracker = CustomerTracker(bb.settings, SHOP, "o-mine", mine.access.password, destination=THERE)
            await tracker.start()
            try:
                await eventually(lambda: tracker.view.state is not None, what="retained state")
                assert (await terminal.chat("o-other", "other order: gate code 1234")).stored
                assert (await terminal.chat("o-mine", "your roses are being tied")).stored
                said = await tracker.chat("please ring twice")
                assert said.stored, said.reason
                await eventually(lambda: len(tracker.view.chat) == 2, what="both chat lines")
                console = Console(record=True, width=120)
                console.print(tracker.view.render())
                return console.export_text(), tracker
            finally:
                await tracker.stop()
                assert other.outcome.stored
        finally:
            await terminal.stop()

    text, tracker = run(scenario())
    assert "o-mine" in text and "your roses are being tied" in text and "please ring twice" in text
    assert "o-other" not in text and "gate code" not in text and "Ben Nowak" not in text
    assert tracker.view.foreign == 0
    assert all(t[2] != "other order: gate code 1234" for t in tracker.view.chat)
    author = bb.scalar(sa.select(CHAT.c.author_role).where(CHAT.c.text == "please ring twice"))
    assert author == "customer"


@pytest.mark.timeout(120)
def test_shop_watch_once_renders_a_snapshot(backbone: Backbone) -> None:
    bb = backbone

    async def create() -> None:
        terminal = ShopTerminal(bb.settings, SHOP, bb.user(SHOP))
        await terminal.start()
        try:
            for order, name in (("o-w1", "Greta Fischer"), ("o-w2", "Noah Becker")):
                assert (await terminal.create_order(draft(order, name))).outcome.stored
            assert (await terminal.cancel("o-w2", reason="customer called")).stored
        finally:
            await terminal.stop()

    run(create())
    result = CliRunner().invoke(app, ["shop", "watch", "--shop", SHOP, "--once"], env=bb.env)
    assert result.exit_code == 0, result.output
    assert f"Shop {SHOP}" in result.output
    assert "o-w1" in result.output and "created" in result.output and "Greta Fischer" in result.output
    assert "o-w2" in result.output and "cancelled" in result.output


@pytest.mark.timeout(120)
def test_shop_and_track_commands_end_to_end(backbone: Backbone) -> None:
    bb = backbone
    bb.user(SHOP)
    env = bb.env
    runner = CliRunner()
    window = f"{(ev.now() + timedelta(hours=1)).isoformat()}/{(ev.now() + timedelta(hours=2)).isoformat()}"
    created = runner.invoke(
        app,
        [
            "shop", "order", "create", "--shop", SHOP, "--name", "Mia Wolf", "--at", "52.53,13.42",
            "--window", window, "--item", "Peonies", "--order-id", "o-cli",
        ],
        env=env,
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    assert "order o-cli created" in created.output and "username c-o-cli" in created.output
    coded = runner.invoke(
        app,
        [
            "shop", "order", "create", "--shop", SHOP, "--name", "Ida Roth", "--at", "52.53,13.42",
            "--window", window, "--order-id", "o-cli-code", "--require-code",
        ],
        env=env,
    )  # fmt: skip
    assert coded.exit_code == 0, coded.output
    required = sa.select(ORDERS.c.id, ORDERS.c.handover_code_required, ORDERS.c.handover_code)
    rows = {r.id: r for r in bb.rows(required.where(ORDERS.c.id.in_(["o-cli", "o-cli-code"])))}
    assert rows["o-cli-code"].handover_code_required and rows["o-cli-code"].handover_code
    assert not rows["o-cli"].handover_code_required
    assert "--require-code" in runner.invoke(app, ["shop", "order", "create", "--help"]).output

    bb.user(customer_username("o-cli"))
    tracked = runner.invoke(app, ["track", "o-cli", "--shop", SHOP, "--once", "--chat", "hello"], env=env)
    assert tracked.exit_code == 0, tracked.output
    assert "Order o-cli" in tracked.output and "created" in tracked.output and "hello" in tracked.output

    unknown = runner.invoke(app, ["shop", "cancel", "o-nope", "--shop", SHOP], env=env)
    assert unknown.exit_code == 2 and "unknown order 'o-nope'" in unknown.output

    bad_rider = runner.invoke(app, ["shop", "assign", "o-cli", "r-nobody", "--shop", SHOP], env=env)
    assert bad_rider.exit_code == 2 and "unknown rider 'r-nobody'" in bad_rider.output

    not_mine = runner.invoke(app, ["track", "o-none", "--shop", SHOP, "--password", "x"], env=env)
    assert not_mine.exit_code == 1 and "refused" in not_mine.output  # no such account on the broker


# --- bad input ----------------------------------------------------------------------------------


def test_usage_errors_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"BLOOMWIRE_DATA_DIR": str(tmp_path), "BLOOMWIRE_BROKER_PORT": str(free_port())}
    create = "shop order create --shop s1 --name A"
    cases = [
        (f"{create} --at 52.5,13.4 --window 16:00-14:00", "promised window end must be after its start"),
        (f"{create} --at 95,13.4 --window 23:58-23:59", "latitude 95.0 is outside -90..90"),
        (f"{create} --at 52.5 --window 10-12", "must be LAT,LON"),
        ("shop watch --shop s1 --once", "no password for shop 's1'"),
        ("rider status r1 o1 flying", "unknown status 'flying'"),
        ("rider status r1 o1 accepted", "a rider cannot report 'accepted'"),
        ("rider fail r1 o1 --reason tired", "unknown failure reason 'tired'"),
        ("rider status r/1 o1 arrived", "contains '/'"),
        ("track o1 --shop s1", "no password for customer 'c-o1'"),
        ("demo --minutes 0", "--minutes must be positive"),
        ("simulate --flat-tyre 2", "flat_tyre must be between 0 and 1"),
    ]
    for command, message in cases:
        args = command.split()
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output


def test_client_without_a_broker_port_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["shop", "watch", "--shop", "s1", "--password", "pw", "--once"],
        env={"BLOOMWIRE_DATA_DIR": str(tmp_path), "BLOOMWIRE_BROKER_PORT": "0"},
    )
    assert result.exit_code == 2 and "set BLOOMWIRE_BROKER_PORT" in result.output


def test_broker_down_is_retried_then_reported(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path, broker_port=port, broker_username="s1", broker_password="pw")
    notes: list[str] = []

    async def attempt() -> None:
        conn = Connection(settings, "s1")
        try:
            await connect(conn, what="shop", timeout=2.5, on_retry=notes.append)
        finally:
            release(conn)

    with pytest.raises(BrokerError, match=rf"could not reach the MQTT broker at 127.0.0.1:{port}"):
        run(attempt())
    assert notes and "not reachable" in notes[0] and "retrying" in notes[0]


@pytest.mark.timeout(120)
def test_wrong_password_is_not_retried(broker: Broker, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, broker_host=broker.host, broker_port=broker.port,
        broker_username="nobody-here", broker_password="wrong",
    )  # fmt: skip

    async def attempt() -> None:
        conn = Connection(settings, "nobody-here")
        # Refused at once with the broker's reason (a retry until the timeout would say "could
        # not reach the MQTT broker" instead).
        with pytest.raises(BrokerError, match="refused shop 'nobody-here': Not authorized"):
            await connect(conn, what="shop", timeout=60)
        release(conn)

    run(attempt())


def test_rider_command_queues_for_a_running_app(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    holder = Outbox(path)
    assert holder.lock()  # as `rider run` does
    try:
        env = {"BLOOMWIRE_DATA_DIR": str(tmp_path), "BLOOMWIRE_BROKER_PORT": str(free_port())}
        result = CliRunner().invoke(
            app, ["rider", "chat", "r1", "o1", "back in 5", "--outbox", str(path)], env=env
        )
        assert result.exit_code == 0, result.output
        assert "the running rider app" in result.output
        assert [e.kind for e in holder.unsent()] == ["chat"]
    finally:
        holder.close()


def test_outcome_of_a_refused_command_names_unknown_ids() -> None:
    assert _refusal_code("unknown order 'x'") == 2
    assert _refusal_code("unknown rider 'r9'") == 2
    assert _refusal_code("rider 'r1' is offline") == 1
    assert Outcome("i", False, "x").stored is False
    with pytest.raises(UsageError):
        raise UsageError("x")
