"""The pieces of supervision, stable ports and metrics that need no broker: restart policy, port
book, $SYS parsing, refusal labels, the metrics hook of :class:`Service`."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from bloomwire.app.bench import metrics as bench_metrics
from bloomwire.app.restarts import RestartPolicy, Restarts
from bloomwire.app.status import ServiceView, StatusReport, scrape, total
from bloomwire.contract.asyncapi import build_document
from bloomwire.contract.events import ServiceState, ServiceStatus
from bloomwire.errors import BrokerError
from bloomwire.runtime import ports
from bloomwire.runtime.metrics import Figure, FiguresCollector, PortInUseError, ServiceMetrics, serve
from bloomwire.runtime.settings import Settings
from bloomwire.runtime.sysstats import BrokerStats, metric_name, number
from bloomwire.services.persister.metrics import kind_label, reason_label, sent_at


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- restart policy -------------------------------------------------------------------------------


def test_backoff_doubles_then_a_crash_loop_is_declared_once() -> None:
    clock = Clock()
    r = Restarts(RestartPolicy(first_delay=0.5, max_delay=30, window_s=60, loop_exits=5), clock)
    delays = []
    for _ in range(4):
        d = r.exited("persister")
        assert not d.in_loop and not d.loop_started
        delays.append(d.delay)
        clock.now += d.delay + 1
        r.started("persister", restart=True)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    fifth = r.exited("persister")
    assert fifth.loop_started and fifth.in_loop and fifth.delay == 30
    assert fifth.reason.startswith("crash loop: 5 exits in ")
    assert r.looping() == ["persister"]
    clock.now += 31
    r.started("persister", restart=True)
    sixth = r.exited("persister")  # still in the loop: reported again, not started again
    assert sixth.in_loop and not sixth.loop_started and sixth.delay == 30 and sixth.exits == 6
    assert r.restarts("persister") == 5
    assert r.restarts("dispatch") == 0 and not r.in_loop("dispatch")


def test_exits_outside_the_window_do_not_count() -> None:
    clock = Clock()
    r = Restarts(RestartPolicy(first_delay=1, window_s=60, loop_exits=3), clock)
    assert r.exited("alerts").delay == 1
    clock.now += 61
    assert r.exited("alerts").delay == 1  # the first exit left the window
    clock.now += 1
    assert r.exited("alerts").delay == 2
    clock.now += 1
    assert r.exited("alerts").loop_started


def test_a_stable_run_ends_the_crash_loop() -> None:
    clock = Clock()
    r = Restarts(RestartPolicy(loop_exits=2, stable_s=60), clock)
    r.exited("dispatch")
    assert r.exited("dispatch").loop_started
    r.started("dispatch", restart=True)
    clock.now += 59
    assert not r.check_stable("dispatch") and r.in_loop("dispatch")
    clock.now += 2
    assert r.check_stable("dispatch") and not r.in_loop("dispatch")
    assert not r.check_stable("dispatch")  # once
    assert r.exited("dispatch").delay == RestartPolicy().first_delay  # counting starts afresh


# --- port book ------------------------------------------------------------------------------------


@pytest.fixture
def held() -> Iterator[int]:
    """A port some other program listens on for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_first_claim_takes_the_wanted_port_or_a_free_one_and_records_it(tmp_path: Path, held: int) -> None:
    book = ports.PortBook(tmp_path)
    wanted = ports.free_port()
    assert book.claim("mqtt", wanted) == wanted
    other = book.claim("websockets", held)  # the default is taken: a free one instead
    assert other not in (held, wanted) and ports.is_free("127.0.0.1", other)
    assert json.loads((tmp_path / ports.PORTS_FILE).read_text()) == {"mqtt": wanted, "websockets": other}
    again = ports.PortBook(tmp_path)  # a later start reuses what was recorded, whatever it asks for
    assert again.claim("mqtt", 0) == wanted and again.claim("websockets", 1234) == other
    assert again.fresh == set()


def test_a_recorded_port_taken_later_is_an_error_or_replaced(tmp_path: Path, held: int) -> None:
    (tmp_path / ports.PORTS_FILE).write_text(json.dumps({"mqtt": held, "metrics/persister": held}))
    book = ports.PortBook(tmp_path)
    assert book.claim("mqtt", 0) == held
    with pytest.raises(BrokerError, match=rf"port {held} \(mqtt, recorded in .*\) is in use"):
        book.check_free("mqtt", held)
    metrics = book.claim("metrics/persister", 0, replace_taken=True)
    assert metrics != held and book.ports["metrics/persister"] == metrics


def test_an_explicit_setting_replaces_the_record(tmp_path: Path) -> None:
    first = ports.PortBook(tmp_path).claim("mqtt", 0)
    later = ports.PortBook(tmp_path)  # the next start
    wanted = ports.free_port()
    assert later.claim("mqtt", wanted) == first  # a default: the record wins
    assert later.claim("mqtt", wanted, insist=True) == wanted  # set by the operator: it wins
    assert ports.read_ports(tmp_path)["mqtt"] == wanted
    assert later.claim("mqtt", first, insist=True) == wanted  # chosen by this start: kept


def test_metrics_ports_follow_the_base(tmp_path: Path) -> None:
    assert ports.default_metrics_port(19100, "up") == 19100
    assert ports.default_metrics_port(19100, "alerts") == 19103
    assert ports.default_metrics_port(0, "alerts") == 0
    assert ports.default_metrics_port(19100, "reports") == 0  # unknown service: a free port
    (tmp_path / ports.PORTS_FILE).write_text("[1, 2]")
    with pytest.raises(BrokerError, match="not a JSON object"):
        ports.PortBook(tmp_path)


def test_public_addresses_default_to_the_broker() -> None:
    s = Settings(broker_host="10.0.0.5", broker_port=18830, broker_ws_port=19001)
    assert (s.public_broker_host, s.public_broker_port, s.public_broker_ws_port) == ("10.0.0.5", 18830, 19001)
    told = s.model_copy(
        update={"public_host": "shop.example", "public_mqtt_port": 8883, "public_ws_port": 443}
    )
    assert (told.public_broker_host, told.public_broker_port, told.public_broker_ws_port) == (
        "shop.example",
        8883,
        443,
    )
    assert Settings(broker_port=1).public_broker_ws_port is None


# --- metrics --------------------------------------------------------------------------------------


def test_sys_topics_become_metrics() -> None:
    assert metric_name("$SYS/broker/clients/connected") == "mosquitto_clients_connected"
    assert metric_name("$SYS/broker/retained messages/count") == "mosquitto_retained_messages_count"
    assert metric_name("services/x/status") is None
    assert number(b"1234 seconds") == 1234.0 and number(b"0.55") == 0.55 and number(b"mosquitto 2.0") is None
    stats = BrokerStats()
    stats.update("$SYS/broker/clients/connected", b"7")
    stats.update("$SYS/broker/messages/received", b"120")
    stats.update("$SYS/broker/version", b"mosquitto version 2.0.11")
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    assert "mosquitto_clients_connected 7.0" in text
    assert "# TYPE mosquitto_messages_received_total counter" in text
    assert "mosquitto_messages_received_total 120.0" in text
    assert "version" not in text
    assert stats.value("clients/connected") == 7


def test_refusal_reasons_become_bounded_labels() -> None:
    assert reason_label("order 'o-42' is not assigned to rider 'r7'") == "order … is not assigned to rider …"
    assert reason_label("order o42 is delivered") == "order … is delivered"
    assert reason_label("1 validation error for X\ndata.status\n  bad") == "… validation error for X"
    assert kind_label("riders/r1/orders/o1/status") == "status"
    assert kind_label("nowhere/at/all") == "unknown"
    assert sent_at(b'{"time": "2026-01-01T00:00:00+00:00"}') == 1767225600.0
    assert sent_at(b'{"_type": "location", "tst": 1700000000}') == 1700000000.0
    assert sent_at(b"not json") is None and sent_at(b'{"time": "soon"}') is None


def test_exporter_serves_the_registry_and_refuses_a_taken_port(held: int) -> None:
    metrics = ServiceMetrics("demo")
    metrics.received({"riders/+/location": 3})
    metrics.handled({"riders/+/location": 3}, 0.002)
    metrics.watch(queued=lambda: 4, oldest=lambda: None, ready=lambda: True)
    metrics.registry.register(FiguresCollector(lambda: [Figure("demo_things", "Things", 2.0, {"k": "v"})]))
    exporter = serve(metrics.registry, "127.0.0.1", 0)
    try:
        samples = scrape(f"http://127.0.0.1:{exporter.port}/metrics")
    finally:
        exporter.close()
    assert total(samples, "bloomwire_messages_received_total", route="riders/+/location") == 3
    assert total(samples, "bloomwire_messages_handled_total") == 3
    assert total(samples, "bloomwire_batch_size_count") == 1
    assert total(samples, "bloomwire_queue_messages") == 4
    assert total(samples, "bloomwire_service_ready", service="demo") == 1
    assert total(samples, "demo_things_total", k="v") == 2
    with pytest.raises(PortInUseError):
        serve(CollectorRegistry(), "127.0.0.1", held)


def test_status_report_is_online_only_when_every_service_is() -> None:
    online = ServiceStatus(state=ServiceState.ONLINE)
    report = StatusReport(broker="mqtt://x:1")
    assert not report.all_online  # nothing known is not "all online"
    report.services = {"a": ServiceView("a", online), "b": ServiceView("b", online)}
    assert report.all_online
    report.services["b"].crash_loop = True
    assert not report.all_online
    report.services["b"] = ServiceView("b", ServiceStatus(state=ServiceState.DEGRADED, reason="store down"))
    assert not report.all_online


def test_the_asyncapi_server_entries_name_the_default_listen_ports() -> None:
    servers = build_document()["servers"]
    fields = Settings.model_fields
    assert servers["mosquitto"]["variables"]["port"]["default"] == str(fields["broker_listen_port"].default)
    websockets = servers["mosquitto-websockets"]["variables"]["port"]["default"]
    assert websockets == str(fields["broker_listen_ws_port"].default)


def test_bench_metrics_prints_a_row_per_batch_size() -> None:
    (report,) = bench_metrics.main(events=2_000, console=Console(file=io.StringIO()))
    assert [row[0] for row in report.rows] == [str(n) for n in bench_metrics.BATCH_SIZES]
    assert all(float(cell) >= 0 for row in report.rows for cell in row[1:])
