"""``bloomwire up`` as an operator meets it: supervised services, stable addresses, metrics, status.

Real processes throughout: an access-controlled Mosquitto, the four services as children of a
:class:`~bloomwire.app.supervisor.Stack` (or of ``bloomwire up`` itself), ``mosquitto_pub`` as the
rider, ``curl`` on the metrics ports. Every port is a free one (see conftest), recorded as usual.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import MqttTestClient
from prometheus_client.parser import text_string_to_metric_families

from bloomwire.app.restarts import RestartPolicy
from bloomwire.app.status import total
from bloomwire.app.supervisor import Stack, wait_online
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.events import ServiceState, parse_service_status
from bloomwire.errors import BrokerError
from bloomwire.runtime import ports
from bloomwire.runtime.broker import find_dynsec_plugin, find_mosquitto
from bloomwire.runtime.settings import Settings
from bloomwire.store import make_engine
from bloomwire.store.models import CHAT

MakeClient = Callable[..., MqttTestClient]
SHOP, RIDER = "s1", "r1"
#: The supervisor starts a killed service again within this (0.25 s delay + 0.1 s polls); how
#: long the new process then takes to say online depends on the machine (`bloomwire bench
#: restart` measures it: no timed assertion on that here).
RESTARTED_WITHIN_S = 2.0


def _requirements() -> None:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))


@dataclass
class Addr:
    """Where a test client connects (what :class:`MqttTestClient` reads of a broker)."""

    host: str
    port: int
    ws_port: int = 0


def _secret(data_dir: Path, name: str) -> str:
    return (data_dir / "secrets" / name).read_text().strip()


def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``curl`` the metrics page (as an operator would) and parse it."""
    url = f"http://127.0.0.1:{port}/metrics"
    curl = shutil.which("curl")
    if curl:
        text = subprocess.run([curl, "-sf", url], capture_output=True, check=True, timeout=10).stdout.decode()
    else:
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


class StatusWatch:
    """An operator client on ``services/+/status``: when did each service last say what."""

    def __init__(self, client: MqttTestClient) -> None:
        self.client = client
        client.subscribe(topics.ALL_SERVICE_STATUS_FILTER)
        self.seen: list[tuple[float, str, ev.ServiceStatus]] = []

    def pump(self) -> None:
        while True:
            try:
                msg = self.client.messages.get_nowait()
            except queue.Empty:
                return
            self.seen.append((time.monotonic(), msg.topic.split("/")[1], parse_service_status(msg.payload)))

    def online_after(self, name: str, since: float, timeout: float = 60.0) -> float:
        """Seconds from ``since`` until ``name`` said online (after an offline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            went_offline = False
            for at, who, status in self.seen:
                if who != name or at < since:
                    continue
                if status.state is ServiceState.OFFLINE:
                    went_offline = True
                elif went_offline and status.state is ServiceState.ONLINE:
                    return at - since
            time.sleep(0.02)
        pytest.fail(f"{name} not online again within {timeout} s of the kill: {self.seen[-5:]}")


def _create(shop: MqttTestClient, order: str, rider: MqttTestClient | None = None) -> None:
    """Create ``order``; with ``rider``: the rider comes online (without a position, so dispatch
    offers it nothing) and the shop assigns the order to it."""
    start = ev.now() + timedelta(minutes=30)
    created = ev.OrderCreateEvent(
        source=f"shops/{SHOP}",
        data=ev.OrderCreated(
            order=order,
            customer=ev.Customer(name="Ada", lat=52.52, lon=13.40),
            window=ev.Window(start=start, end=start + timedelta(hours=1)),
        ),
    )
    shop.publish(topics.shop_command(SHOP, topics.Command.CREATE_ORDER), ev.encode(created))
    if rider is None:
        return
    rider.publish(topics.rider_presence(RIDER), b"online", retain=True)
    assigned = ev.OrderAssignEvent(source=f"shops/{SHOP}", data=ev.OrderAssigned(order=order, rider=RIDER))
    shop.publish(topics.shop_command(SHOP, topics.Command.ASSIGN), ev.encode(assigned))


def _chat_line(order: str, n: int) -> bytes:
    event = ev.OrderChatPostedEvent(
        source=f"riders/{RIDER}", data=ev.OrderChat(order=order, text=f"line {n}")
    )
    return ev.encode(event)


def _chat_count(database_url: str, order: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(CHAT.c.order_id == order)).scalar_one())
    finally:
        engine.dispose()


# --- one supervised stack for the kill / metrics / status tests -------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _requirements()
    data_dir = tmp_path_factory.mktemp("supervised")
    stack = Stack(Settings(data_dir=data_dir, database_url=""), access=True, shops=[SHOP], riders=[RIDER])
    stack.start(timeout=60)
    yield stack
    stack.stop()


def _broker(stack: Stack) -> Addr:
    assert stack.broker is not None
    return Addr(stack.broker.host, stack.broker.port, stack.broker.ws_port)


def test_kill_9_of_the_persister_loses_nothing_a_rider_publishes_across_it(
    stack: Stack, mqtt_client: MakeClient
) -> None:
    data_dir, broker = stack.settings.data_dir, _broker(stack)
    assert stack.broker is not None
    broker_pid = stack.broker.pid
    watch = StatusWatch(mqtt_client("operator", _secret(data_dir, "operator"), broker=broker))
    shop = mqtt_client(SHOP, _secret(data_dir, SHOP), broker=broker)
    order = "o-across-kill"
    rider_client = mqtt_client(RIDER, _secret(data_dir, RIDER), broker=broker)
    _create(shop, order, rider_client)
    rider_client.close()  # one login, one session: mosquitto_pub takes it over
    state = topics.order_topic(SHOP, order, topics.OrderChannel.STATE)
    shop.subscribe(state)
    _until("order assigned", lambda: _assigned(shop, state))

    login = ["-h", broker.host, "-p", str(broker.port), "-u", RIDER, "-P", _secret(data_dir, RIDER)]
    rider = subprocess.Popen(
        ["mosquitto_pub", *login, "-q", "1", "-t", topics.rider_order_chat(RIDER, order), "-l"],
        stdin=subprocess.PIPE,
    )
    assert rider.stdin is not None
    victim = stack.children["persister"].pid
    killed_at = 0.0
    for n in range(200):
        rider.stdin.write(_chat_line(order, n) + b"\n")
        rider.stdin.flush()
        if n == 80:
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(0.01)
    rider.stdin.close()
    assert rider.wait(30) == 0
    _until("a new persister", lambda: stack.children["persister"].pid != victim, timeout=RESTARTED_WITHIN_S)

    back_s = watch.online_after("persister", killed_at)
    print(f"persister online again {back_s:.2f} s after kill -9")
    assert stack.children["persister"].pid != victim
    assert stack.broker.pid == broker_pid, "the broker was restarted"
    _until("all 200 lines stored", lambda: _chat_count(stack.settings.database_url, order) == 200)
    assert stack.restarts()["persister"] >= 1
    assert stack.check() == []


def _assigned(shop: MqttTestClient, state_topic: str) -> bool:
    try:
        msg = shop.messages.get(timeout=0.2)
    except queue.Empty:
        return False
    return msg.topic == state_topic and json.loads(msg.payload).get("status") == "assigned"


@pytest.mark.parametrize("name", ["dispatch", "alerts", "provisioner"])
def test_kill_9_of_any_service_is_back_and_the_broker_untouched(
    stack: Stack, mqtt_client: MakeClient, name: str
) -> None:
    assert stack.broker is not None
    broker_pid = stack.broker.pid
    watch = StatusWatch(
        mqtt_client("operator", _secret(stack.settings.data_dir, "operator"), broker=_broker(stack))
    )
    before = stack.restarts()[name]
    victim = stack.children[name].pid
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    _until("a new process", lambda: stack.children[name].pid != victim, timeout=RESTARTED_WITHIN_S)
    back_s = watch.online_after(name, killed_at)
    print(f"{name} online again {back_s:.2f} s after kill -9")
    assert stack.restarts()[name] == before + 1
    assert stack.broker.pid == broker_pid


def test_metrics_counters_move_when_events_flow(stack: Stack, mqtt_client: MakeClient) -> None:
    data_dir = stack.settings.data_dir
    recorded = ports.read_ports(data_dir)
    persister_port = recorded[ports.metrics_key("persister")]
    order = "o-metrics"
    shop = mqtt_client(SHOP, _secret(data_dir, SHOP), broker=_broker(stack))
    rider = mqtt_client(RIDER, _secret(data_dir, RIDER), broker=_broker(stack))
    _create(shop, order, rider)
    state = topics.order_topic(SHOP, order, topics.OrderChannel.STATE)
    shop.subscribe(state)
    _until("order assigned", lambda: _assigned(shop, state))
    before = _scrape(persister_port)
    for n in range(5):
        rider.publish(topics.rider_order_chat(RIDER, order), _chat_line(order, n))
    rider.publish(topics.rider_order_chat(RIDER, "o-not-mine"), _chat_line("o-not-mine", 0))  # refused
    _until("6 more handled", lambda: _moved(persister_port, before, "bloomwire_messages_handled_total", 6))
    after = _scrape(persister_port)
    stored = "bloomwire_persister_events_total"
    assert total(after, stored, result="stored") - total(before, stored, result="stored") == 5
    assert total(after, stored, result="refused") - total(before, stored, result="refused") == 1
    (chat_route,) = [
        f for f in topics.INBOUND_FILTERS if topics.matches(f, topics.rider_order_chat(RIDER, order))
    ]
    received = "bloomwire_messages_received_total"
    assert total(after, received, route=chat_route) - total(before, received, route=chat_route) == 6
    assert total(after, "bloomwire_persister_refused_total", kind="chat") >= 1
    assert total(after, "bloomwire_persister_batch_seconds_count") > total(
        before, "bloomwire_persister_batch_seconds_count"
    )
    assert total(after, "bloomwire_persister_publish_to_commit_seconds_count") > 0
    assert total(after, "bloomwire_service_ready", service="persister") == 1

    supervisor = _scrape(recorded[ports.metrics_key(ports.SUPERVISOR)])
    assert set(dict(k)["service"] for k in supervisor["bloomwire_service_restarts_total"]) == set(
        stack.services
    )
    assert total(supervisor, "bloomwire_service_state", service="persister", state="online") == 1
    _until("$SYS figures exported", lambda: "mosquitto_clients_connected" in _scrape(recorded["metrics/up"]))
    alerts = _scrape(recorded[ports.metrics_key("alerts")])
    assert "bloomwire_alerts_raised_total" in alerts
    dispatch = _scrape(recorded[ports.metrics_key("dispatch")])
    assert total(dispatch, "bloomwire_dispatch_passes_total") > 0


def _moved(port: int, before: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, n: int) -> bool:
    return total(_scrape(port), name) - total(before, name) >= n


def test_status_command_shows_the_stack(stack: Stack) -> None:
    env = {**os.environ, "BLOOMWIRE_DATA_DIR": str(stack.settings.data_dir), "COLUMNS": "200"}
    env.pop("BLOOMWIRE_BROKER_PORT", None)
    done = subprocess.run(
        [sys.executable, "-m", "bloomwire", "status", "--interval", "0.5"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in stack.services:
        assert any(name in line and "online" in line for line in lines), done.stdout
    assert "broker:" in done.stdout and "clients" in done.stdout
    assert "alerts open" in done.stdout


def test_a_broker_that_dies_is_started_again_on_its_ports(stack: Stack) -> None:
    """Last of the module's stack tests: the broker itself is killed."""
    assert stack.broker is not None
    pid, port, ws_port = stack.broker.pid, stack.broker.port, stack.broker.ws_port
    children = {n: p.pid for n, p in stack.children.items()}
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _until("broker running again", lambda: stack.broker is not None and stack.broker.pid not in (None, pid))
    assert (stack.broker.port, stack.broker.ws_port) == (port, ws_port)
    seen = asyncio.run(wait_online(stack.settings, list(stack.services), timeout=60))
    assert all(seen[n] == "online" for n in stack.services)
    assert {n: p.pid for n, p in stack.children.items()} == children  # they reconnected, not restarted
    supervisor = _scrape(ports.read_ports(stack.settings.data_dir)[ports.metrics_key(ports.SUPERVISOR)])
    assert total(supervisor, "bloomwire_broker_restarts_total") == 1


# --- a crash loop ----------------------------------------------------------------------------------


def test_a_crash_loop_is_reported_and_retried_not_hidden(tmp_path: Path, mqtt_client: MakeClient) -> None:
    _requirements()
    rules = tmp_path / "rules.toml"
    rules.write_text("")  # the built-in thresholds
    settings = Settings(data_dir=tmp_path, database_url="", alerts_rules=rules)
    policy = RestartPolicy(first_delay=0.05, max_delay=2.0, window_s=60, loop_exits=3, stable_s=60)
    stack = Stack(settings, services=("persister", "alerts"), restart_policy=policy)
    try:
        live = stack.start(timeout=60)
        assert stack.broker is not None
        broker_pid = stack.broker.pid
        supervisor_port = ports.read_ports(tmp_path)[ports.metrics_key(ports.SUPERVISOR)]
        rules.write_text("[thresholds\n")  # alerts now refuses to start: exit 1 at every start
        os.kill(stack.children["alerts"].pid, signal.SIGKILL)
        _until("crash loop declared", lambda: stack.check() == ["alerts"])
        operator = mqtt_client("operator", _secret(tmp_path, "operator"), broker=_broker(stack))
        operator.subscribe(topics.service_status("alerts"))

        def reported() -> bool:
            try:
                msg = operator.messages.get(timeout=0.2)
            except queue.Empty:
                return False
            status = parse_service_status(msg.payload)
            return status.state is ServiceState.OFFLINE and status.reason.startswith("crash loop: ")

        _until("crash loop on services/alerts/status", reported)
        figures = _scrape(supervisor_port)
        assert total(figures, "bloomwire_service_crash_loop", service="alerts") == 1
        assert total(figures, "bloomwire_service_crash_loop", service="persister") == 0
        assert total(figures, "bloomwire_service_restarts_total", service="alerts") >= 2  # 3 exits
        assert (tmp_path / "logs" / "alerts.log").read_text().count("restarted by the supervisor") >= 2
        assert asyncio.run(wait_online(live, ["persister"], 5))["persister"] == "online"

        rules.write_text("")  # fixed: the next try (max_delay later) starts it for good
        assert asyncio.run(wait_online(live, ["alerts"], 30))["alerts"] == "online"
        assert stack.broker.pid == broker_pid
    finally:
        stack.stop()


# --- stable addresses ------------------------------------------------------------------------------


def test_a_port_lost_between_the_check_and_the_bind_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _requirements()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        real = ports.is_free
        # The check says the port is free; by the time Mosquitto binds it, it is not.
        monkeypatch.setattr(ports, "is_free", lambda host, port: port == held or real(host, port))
        settings = Settings(data_dir=tmp_path, broker_listen_port=held, database_url="")
        stack = Stack(settings, services=())
        try:
            stack.start_broker()
            assert stack.broker is not None and stack.broker.port != held
            assert ports.read_ports(tmp_path)[ports.MQTT] == stack.broker.port
        finally:
            stack.stop()


class Up:
    """``bloomwire up`` as a child process, its output read line by line."""

    def __init__(self, data_dir: Path) -> None:
        env = {**os.environ, "BLOOMWIRE_DATA_DIR": str(data_dir), "COLUMNS": "400"}
        env.pop("BLOOMWIRE_BROKER_PORT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bloomwire", "up", "--shops", SHOP, "--riders", RIDER],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if text in line:
                return line
        pytest.fail(f"`bloomwire up` never printed {text!r}:\n{''.join(self.output[-30:])}")

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(60)
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_up_keeps_its_ports_across_a_restart_and_old_customer_logins_still_work(
    tmp_path: Path, mqtt_client: MakeClient
) -> None:
    _requirements()
    up = Up(tmp_path)
    try:
        banner = up.wait_for("Bloomwire up:")
        recorded = ports.read_ports(tmp_path)
        broker = Addr("127.0.0.1", recorded[ports.MQTT], recorded[ports.WEBSOCKETS])
        assert f"mqtt://127.0.0.1:{broker.port}" in banner
        shop = mqtt_client(SHOP, _secret(tmp_path, SHOP), broker=broker)
        access_topic = topics.access_topic(SHOP, "o-kept")
        shop.subscribe(access_topic)
        _create(shop, "o-kept")
        raw = shop.expect(1, timeout=30)[0].payload
        access = ev.CustomerAccessGrantedEvent.model_validate_json(raw).data
        assert access.broker is not None
        assert (access.broker.host, access.broker.port, access.broker.ws_port) == (
            "127.0.0.1",
            broker.port,
            broker.ws_port,
        )
        shop.close()
        assert up.interrupt() == 0, "".join(up.output)
        assert "Stopped cleanly: services, then broker" in "".join(up.output)
        assert ports.is_free("127.0.0.1", broker.port), "the broker outlived `bloomwire up`"
    finally:
        up.kill()

    again = Up(tmp_path)
    try:
        banner = again.wait_for("Bloomwire up:")
        assert f"mqtt://127.0.0.1:{broker.port}" in banner
        assert ports.read_ports(tmp_path) == recorded
        customer = mqtt_client(access.username, access.password, broker=broker, connect=False)
        rc = customer.connect()
        assert not rc.is_failure, f"the customer's login no longer works: {rc}"
        customer.subscribe(topics.order_topic(SHOP, "o-kept", topics.OrderChannel.STATE))
        state = json.loads(customer.expect(1, timeout=10)[0].payload)
        assert state["order"] == "o-kept"
        assert again.interrupt() == 0, "".join(again.output)
    finally:
        again.kill()
