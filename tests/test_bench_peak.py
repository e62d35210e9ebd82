"""``bloomwire bench peak`` end to end on a tiny day: the four rows, and nothing lost at that load."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bloomwire.app.bench import peak_figures as pf
from bloomwire.app.bench.peak import DRAIN_MAX_S, drain
from bloomwire.app.bench.peak_load import Journal
from bloomwire.app.bench.peak_proxy import LossyProxy

ROWS = {"connection_stability", "latency", "concurrency", "reliability"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_peak_reports_the_four_rows_and_loses_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    out_json = tmp_path / "peak.json"
    tiny = ["--shops", "2", "--riders", "4", "--customers", "6", "--ws-share", "0.5", "--duration", "12"]
    tiny += ["--browsers", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bloomwire", "bench", "peak", *tiny, "--json", str(out_json)],
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    result = json.loads(out_json.read_text())
    [peak] = result["windows"]
    assert peak["window"] == "peak"
    assert set(peak["rows"]) == ROWS
    rel = peak["rows"]["reliability"]
    # 4 riders x ~3 positions to their customers, plus the shops' chat lines to customers and riders
    assert rel["expected"] > 10
    assert rel["delivered"] == rel["expected"]
    assert rel["stored"] == rel["sent"] > 0
    assert rel["lost"] == 0
    assert rel["duplicated"] == 0
    latency = peak["rows"]["latency"]
    assert latency["rider_to_customer_ms"]["n"] > 0
    assert latency["rider_to_stored_ms"]["n"] > 0
    assert latency["shop_command_to_rider_inbox_ms"]["n"] > 0
    assert (
        peak["rows"]["connection_stability"]["clients"] == 1 + 2 + 4 + 6
    )  # operator, shops, riders, customers
    assert {"broker", "persister", "dispatch", "alerts", "provisioner", "web", "load generator"} <= set(
        peak["processes"]
    )
    assert "connection stability" in done.stdout.decode(errors="replace")
    browsers = result["browsers"]  # the /track page in Chromium, a shop line shown on each
    assert browsers["pages"] == 2 and browsers["shop_chat_to_page_ms"]["n"] == 2
    assert result["ceiling"]["arrived"] == result["ceiling"]["sent"] > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_bench_peak_faults_get_a_column_each_and_everyone_comes_back(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    out_json = tmp_path / "peak.json"
    tiny = ["--shops", "1", "--riders", "3", "--customers", "4", "--ws-share", "0.5", "--duration", "5"]
    if store == "postgresql":  # a server: the drill creates its own database there, and drops it
        server = request.getfixturevalue("postgres_admin_url").replace(
            "postgresql:", "postgresql+psycopg:", 1
        )
        tiny += ["--database-url", server]
    done = subprocess.run(
        [sys.executable, "-m", "bloomwire", "bench", "peak", *tiny, "--faults", "--json", str(out_json)],
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=390,
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    result = json.loads(out_json.read_text())
    windows = {w["window"]: w for w in result["windows"]}
    database = (
        "database unwritable (chmod + exclusive lock)"
        if store == "sqlite"
        else "database restarted (connections refused, backends terminated)"
    )
    network = "rider network delayed and lossy (r1)"
    assert set(windows) == {"peak", "broker kill -9", "persister kill -9", database, network}
    for w in windows.values():
        assert set(w["rows"]) == ROWS
        assert w["rows"]["reliability"]["lost"] == 0, w["window"]
    broker = windows["broker kill -9"]
    stability = broker["rows"]["connection_stability"]
    assert stability["dropped_clients"] == stability["clients"] == 1 + 1 + 3 + 4
    assert stability["reconnected"] == stability["dropped_clients"]
    assert broker["recovery_s"] is not None
    assert windows["persister kill -9"]["recovery_s"] is not None
    assert windows["persister kill -9"]["processes"]["persister"]["pids"] == 2  # killed, started again
    assert windows[database]["recovery_s"] is not None
    stored = windows[database]["rows"]["reliability"]
    assert stored["stored"] == stored["sent"] > 0  # the positions sent meanwhile, stored after
    assert windows[network]["recovery_s"] is not None and "r1 through a proxy" in windows[network]["note"]
    ceiling = result["ceiling"]
    assert ceiling["arrived"] == ceiling["sent"] > 0 and ceiling["per_s"] > 0
    assert "37.3k msg/s" in done.stdout.decode(errors="replace")


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.mark.timeout(60)
def test_lossy_proxy_delays_loses_in_order_and_recovers() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy = LossyProxy(server.server_address[:2])
        port = proxy.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

                def round_trip(payload: bytes) -> float:
                    t0 = time.monotonic()
                    sock.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        got += sock.recv(65536)
                    assert got == payload
                    return time.monotonic() - t0

                clean = round_trip(b"hello")
                proxy.impair(0.1, 0.0)
                delayed = round_trip(b"hello")
                proxy.impair(0.1, 1.0)  # every chunk lost once: + a 200 ms RTO each way
                lossy = round_trip(b"hello")
                proxy.impair(0.01, 0.5)
                ordered = b"".join(b"%05d," % i for i in range(2000))
                round_trip(ordered)  # in order, nothing missing
                proxy.clear()
                again = round_trip(b"hello")
        finally:
            server.shutdown()
            proxy.stop()
    assert 0.2 <= delayed < 0.2 + 1.0, delayed
    assert lossy >= 0.6, lossy
    assert clean < 0.2 and again < 0.2, (clean, again)
    assert proxy.lost_chunks >= 2


def test_drain_waits_for_the_backlog_and_not_for_a_refused_event() -> None:
    """After the load: done when every event sent is acknowledged; a refused one (never
    acknowledged) ends the wait once no ack has come for the quiet time."""
    journal = Journal()
    for eid in ("e1", "e2"):
        journal.sent_one("rider-event", eid, "r1")

    def ack_later(eid: str, after: float) -> None:
        threading.Timer(
            after, journal.got, ("r1", "riders/r1/inbox/acks", json.dumps({"ids": [eid]}).encode())
        ).start()

    ack_later("e1", 0.2)
    ack_later("e2", 1.5)
    waited = drain(journal, least=0.5, quiet=30.0)
    assert any(b'"e2"' in r.payload for r in journal.received), "it waited for the last ack"
    assert waited < 30.0, "and ended with it, not by the quiet time"
    journal.sent_one("rider-event", "refused", "r1")
    assert drain(journal, least=0.5, quiet=1.0) < DRAIN_MAX_S, "the quiet time ends the wait"


def test_broker_rate_of_a_window_shorter_than_two_sys_samples() -> None:
    """$SYS counts every 10 s: a 9 s fault window holds one sample; the one before starts it."""
    samples = [(0.0, 100.0), (10.0, 600.0), (20.0, 700.0)]
    assert pf._sys_rate(samples, pf.Window("fault", 5.0, 14.0)) == 50.0
    assert pf._sys_rate(samples, pf.Window("fault", 5.0, 25.0)) == 30.0
