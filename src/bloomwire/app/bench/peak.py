"""``bloomwire bench peak``: the Valentine's Day drill, the whole backbone at K x a normal day.

Starts the stack ``bloomwire up`` runs (access-controlled broker, persister, dispatch, alerts,
provisioner, the web service for websocket customers; supervised) on a fresh store in a temporary
directory, seeds the day through real MQTT clients (:mod:`~bloomwire.app.bench.peak_drill`), plays
the peak for ``duration`` seconds and reports the buyer's four rows (connection stability,
latency, concurrency, reliability) and each process's CPU and peak RSS
(:mod:`~bloomwire.app.bench.peak_figures`). With ``faults`` the peak goes on while, one after
another, the broker is ``kill -9``-ed, the persister is ``kill -9``-ed and the SQLite database is
made unwritable for a while; each fault gets the same table and its recovery time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bloomwire.app.bench import peak_figures as pf
from bloomwire.app.bench.peak_drill import NORMAL_ORDERS_PER_SHOP_DAY, OPEN_HOURS, Drill, PeakConfig
from bloomwire.app.bench.peak_load import Journal, wait_until
from bloomwire.app.bench.peak_procs import Sampler
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import SERVICES, WEB, Stack
from bloomwire.runtime.settings import Settings

__all__ = ["PeakConfig", "main", "normal_day", "reports", "run"]

#: Seconds of steady load after each fault's recovery before the next fault.
SETTLE_S = 10.0
#: How long the SQLite database stays unwritable.
UNWRITABLE_S = 20.0
#: Longest wait for a recovery before the fault is reported as not recovered.
RECOVERY_TIMEOUT_S = 60.0
#: --find-limit: seconds per step, the largest rate multiplier, the customer P99 it must stay under.
LIMIT_STEP_S = 20.0
LIMIT_MAX_SPEED = 64.0
LIMIT_P99_MS = 100.0
#: After the load stops: time for the last acks and deliveries to arrive.
DRAIN_S = 5.0


def _stack(settings: Settings, root: Path, config: PeakConfig, database_url: str | None) -> Stack:
    own = settings.model_copy(
        update={
            "data_dir": root,
            "database_url": database_url or f"sqlite:///{root / 'peak.db'}",
            "broker_port": 0,
            "broker_listen_port": 0,
            "broker_listen_ws_port": 0,
            "metrics_port": 0,
            "web_listen_port": 0,
            "broker_username": None,
            "broker_password": None,
        }
    )
    services = (*SERVICES, WEB) if config.ws_share > 0 else tuple(SERVICES)
    shops = [f"s{i}" for i in range(1, config.shops + 1)]
    riders = [f"r{i}" for i in range(1, config.riders + 1)]
    return Stack(own, services=services, access=True, shops=shops, riders=riders)


def _pids(stack: Stack) -> Callable[[], dict[str, int]]:
    def pids() -> dict[str, int]:
        out = {"load generator": os.getpid()}
        broker = stack.broker
        if broker is not None and broker.pid is not None:
            out["broker"] = broker.pid
        for name, proc in dict(stack.children).items():
            out[name] = proc.pid
        return out

    return pids


@contextlib.contextmanager
def _running(drill: Drill) -> Iterator[None]:
    """The peak's load in a thread while the body runs."""
    thread = threading.Thread(target=drill.play, name="peak-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        drill.stop.set()
        thread.join(10)


# --- faults -------------------------------------------------------------------------------------


def _first_ack_after(journal: Journal, since: float, matched: Callable[[], pf.Matched]) -> float | None:
    m = matched()
    acks = [
        m.acked[eid]
        for eid, (at, kind, _w) in m.sent.items()
        if kind == "position" and at >= since and eid in m.acked
    ]
    return min(acks) if acks else None


def fault_broker(stack: Stack, drill: Drill, matched: Callable[[], pf.Matched]) -> tuple[float, float | None]:
    """``kill -9`` the broker (the supervisor starts it again); seconds until every client is back."""
    broker = stack.broker
    assert broker is not None and broker.pid is not None
    at = time.time()
    os.kill(broker.pid, signal.SIGKILL)
    links = drill.journal.links

    def all_back() -> bool:
        return all(any(t > at for t, _sp in link.connects) for link in links.values())

    try:
        wait_until(all_back, RECOVERY_TIMEOUT_S, "every client back after the broker's restart", step=0.1)
    except TimeoutError:
        return at, None
    return at, max(min(t for t, _sp in link.connects if t > at) for link in links.values()) - at


def fault_persister(
    stack: Stack, drill: Drill, matched: Callable[[], pf.Matched]
) -> tuple[float, float | None]:
    """``kill -9`` the persister; seconds until a position sent after the kill is stored."""
    at = time.time()
    os.kill(stack.children["persister"].pid, signal.SIGKILL)
    found: list[float] = []

    def stored_again() -> bool:
        t = _first_ack_after(drill.journal, at, matched)
        if t is not None:
            found.append(t)
        return bool(found)

    try:
        wait_until(stored_again, RECOVERY_TIMEOUT_S, "the persister storing again", step=0.5)
    except TimeoutError:
        return at, None
    return at, found[0] - at


def fault_database(
    stack: Stack, drill: Drill, matched: Callable[[], pf.Matched]
) -> tuple[float, float | None]:
    """SQLite file and folder read-only for a while; seconds from writable again until every position
    sent meanwhile is stored."""
    url = stack.settings.database_url
    path = Path(url.removeprefix("sqlite:///"))
    at = time.time()
    modes = {p: p.stat().st_mode for p in (path, path.parent)}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    # chmod does not take write access from a connection already open (WAL: its -wal file is
    # open too): an exclusive transaction held meanwhile is what actually keeps the writer out.
    lock = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        time.sleep(UNWRITABLE_S)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        for p, mode in modes.items():
            p.chmod(mode)
    back = time.time()

    def drained() -> bool:
        m = matched()
        return all(
            eid in m.acked for eid, (t, kind, _w) in m.sent.items() if kind == "position" and at <= t < back
        )

    try:
        wait_until(drained, RECOVERY_TIMEOUT_S, "positions sent while unwritable stored", step=0.5)
    except TimeoutError:
        return at, None
    m = matched()
    last = max(
        (m.acked[e] for e, (t, k, _w) in m.sent.items() if k == "position" and at <= t < back), default=back
    )
    return at, max(0.0, last - back)


FAULTS: dict[str, Callable[[Stack, Drill, Callable[[], pf.Matched]], tuple[float, float | None]]] = {
    "broker kill -9": fault_broker,
    "persister kill -9": fault_persister,
    "database unwritable (chmod + exclusive lock)": fault_database,
}


# --- the run --------------------------------------------------------------------------------------


def run(
    settings: Settings,
    config: PeakConfig,
    *,
    database_url: str | None = None,
    faults: bool = False,
    find_limit: bool = False,
    progress: Callable[[str], None] = lambda _s: None,
) -> dict[str, Any]:
    """The whole drill; its figures as plain data."""
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-peak-") as tmp:
        stack = _stack(settings, Path(tmp), config, database_url)
        progress("starting the stack")
        stack.start()
        sampler = Sampler(_pids(stack))
        journal = Journal()
        drill = Drill(stack.settings, config, journal)
        try:
            sampler.start()
            steps = Steps(faults=faults, find_limit=find_limit, sqlite=database_url is None)
            return _play(stack, drill, sampler, steps, progress)
        finally:
            drill.close()
            sampler.stop()
            stack.stop()


@dataclass
class Steps:
    """What comes after the peak."""

    faults: bool = False
    find_limit: bool = False
    sqlite: bool = True


def _play(
    stack: Stack, drill: Drill, sampler: Sampler, steps: Steps, progress: Callable[[str], None]
) -> dict[str, Any]:
    config = drill.config
    progress(f"connecting {config.shops} shops and {config.riders} riders")
    drill.connect_staff()
    drill.seed(progress)
    progress(f"connecting {config.customers} customers ({config.ws_share:.0%} over websockets)")
    drill.connect_customers()
    windows: list[tuple[pf.Window, float | None]] = []
    limit: list[tuple[pf.Window, float | None]] = []
    with _running(drill):
        t0 = time.time()
        _tick(progress, drill, t0, config.duration)
        windows.append((pf.Window("peak", t0, time.time()), None))
        if steps.faults:
            windows += _faults(stack, drill, progress, sqlite=steps.sqlite)
        if steps.find_limit:
            limit = _find_limit(drill, sampler, progress)
    progress("draining")
    time.sleep(DRAIN_S)
    sampler.sample()
    matched = pf.match(drill.journal, drill.plan)
    out: dict[str, Any] = {"config": asdict(config), "normal_day": normal_day(config)}
    out["windows"] = [_window(drill, sampler, matched, w, at) for w, at in windows]
    out["drop_reasons"] = dict(drill.journal.drop_reasons)
    if limit:
        out["limit"] = [_window(drill, sampler, matched, w, at) for w, at in limit]
    return out


def _find_limit(
    drill: Drill, sampler: Sampler, progress: Callable[[str], None]
) -> list[tuple[pf.Window, float | None]]:
    """Double the position and order rates every step until customer P99 > 100 ms or a loss."""
    out: list[tuple[pf.Window, float | None]] = []
    speed = 1.0
    while speed <= LIMIT_MAX_SPEED:
        speed *= 2
        drill.speed = speed
        t0 = time.time()
        _tick(progress, drill, t0, LIMIT_STEP_S)
        window = pf.Window(f"limit x{speed:g}", t0, time.time() - DRAIN_S)
        time.sleep(DRAIN_S)  # still at this level: the step's last events arrive
        out.append((window, None))
        m = pf.match(drill.journal, drill.plan)
        p99 = pf.latency(drill.plan, m, window)["rider_to_customer_ms"]["p99"]
        lost = pf.reliability(drill.plan, m, window)["lost"]
        progress(f"find-limit: x{speed:g}: customer P99 {p99} ms, lost {lost}")
        if not p99 <= LIMIT_P99_MS or lost:
            break
    drill.speed = 1.0
    return out


def _tick(progress: Callable[[str], None], drill: Drill, t0: float, seconds: float) -> None:
    """Let the load run ``seconds``, saying how far it got once a second."""
    end = t0 + seconds
    while time.time() < end:
        time.sleep(min(1.0, max(0.0, end - time.time())))
        j = drill.journal
        progress(
            f"peak {time.time() - t0:5.0f}/{seconds:.0f} s · positions {j.count('position')} · "
            f"orders {j.count('create-order')} · received {len(j.received)}"
        )


def _faults(
    stack: Stack, drill: Drill, progress: Callable[[str], None], *, sqlite: bool
) -> list[tuple[pf.Window, float | None]]:
    out: list[tuple[pf.Window, float | None]] = []

    def matched() -> pf.Matched:
        return pf.match(drill.journal, drill.plan)

    for name, inject in FAULTS.items():
        if name.startswith("database") and not sqlite:
            progress("skipping 'database unwritable': only for SQLite (PostgreSQL restart not built)")
            continue
        progress(f"fault: {name}")
        at, recovery = inject(stack, drill, matched)
        progress(f"fault: {name}: recovered after {recovery if recovery is None else round(recovery, 2)} s")
        _tick(progress, drill, time.time(), SETTLE_S)
        window = pf.Window(name, at, time.time(), recovery)
        out.append((window, at if name.startswith("broker") else None))
    return out


def _window(
    drill: Drill, sampler: Sampler, m: pf.Matched, w: pf.Window, fault_at: float | None
) -> dict[str, Any]:
    fig = pf.figures(drill.plan, m, sampler, w)
    fig["rows"]["connection_stability"] = pf.stability(drill.journal, w, fault_at)
    return fig


def normal_day(config: PeakConfig) -> str:
    """What the multiplier multiplies, in words."""
    return (
        f"{NORMAL_ORDERS_PER_SHOP_DAY} orders per shop per {OPEN_HOURS}-hour day; x{config.multiplier:g} "
        f"over {config.shops} shops = {config.orders_per_s * 3600:.0f} new orders/hour "
        f"({config.orders_per_s:.2f}/s)"
    )


# --- reports --------------------------------------------------------------------------------------

ROWS = ("connection_stability", "latency", "concurrency", "reliability")


def _lat(d: dict[str, Any]) -> str:
    return f"avg {d['avg']} · P50 {d['p50']} · P99 {d['p99']} · max {d['max']} ms (n={d['n']})"


def _cells(w: dict[str, Any]) -> dict[str, str]:
    s, lat, c, r = (w["rows"][k] for k in ROWS)
    stab = f"{s['drops']} drops of {s['clients']} clients"
    if "reconnected" in s:
        stab += (
            f"; {s['reconnected']}/{s['dropped_clients']} back, reconnect P50 {s['reconnect_p50_s']} s · "
            f"P99 {s['reconnect_p99_s']} s; {s['sessions_resumed']} sessions resumed"
        )
    latency = "; ".join(
        f"{label}: {_lat(lat[key])}"
        for label, key in (
            ("rider → customer", "rider_to_customer_ms"),
            ("rider → stored", "rider_to_stored_ms"),
            ("shop command → rider inbox", "shop_command_to_rider_inbox_ms"),
        )
    )
    conc = (
        f"{c['events_accepted_per_s']} events accepted/s sustained, {c['events_accepted_peak_per_s']} peak; "
        f"broker delivered {c['broker_delivered_per_s']} msg/s; {c['connections_max']} connections"
    )
    rel = (
        f"delivered {r['delivered']}/{r['expected']} · stored {r['stored']}/{r['sent']} · lost {r['lost']} · "
        f"duplicated {r['duplicated']} · refused {r['refused']}"
    )
    if r["refused_reasons"]:
        rel += " (" + "; ".join(f"{n}× {reason[:80]}" for reason, n in r["refused_reasons"].items()) + ")"
    return dict(zip(ROWS, (stab, latency, conc, rel), strict=True))


def reports(result: dict[str, Any]) -> list[Report]:
    """The summary (one column per window) and the processes' CPU and memory."""
    windows = result["windows"]
    config = result["config"]
    title = (
        f"bloomwire bench peak: {config['shops']} shops, {config['riders']} riders, {config['customers']} "
        f"customers ({config['ws_share']:.0%} websockets), x{config['multiplier']:g} a normal day "
        f"({result['normal_day']})"
    )
    head = (
        "row",
        *(
            f"{w['window']} ({w['seconds']} s"
            + (f", recovered in {w['recovery_s']} s)" if w["window"] != "peak" else ")")
            for w in windows
        ),
    )
    summary = Report(title, head)
    cells = [_cells(w) for w in windows]
    for key in ROWS:
        summary.add(key.replace("_", " "), *(c[key] for c in cells))
    procs = Report(
        "processes: CPU seconds (share of one core) and peak RSS",
        ("process", *(w["window"] for w in windows)),
    )
    names = sorted({n for w in windows for n in w["processes"]})
    for name in names:
        usage: list[str] = []
        for w in windows:
            p = w["processes"].get(name)
            usage.append(f"{p['cpu_s']} s ({p['core_share']:.0%}) · {p['rss_peak_mb']} MB" if p else "-")
        procs.add(name, *usage)
    out = [summary, procs]
    if result.get("limit"):
        out.append(limit_report(result["limit"]))
    return out


def limit_report(steps: list[dict[str, Any]]) -> Report:
    """One line per step of ``--find-limit``: the load, customer P99, lost, the busiest process."""
    table = Report(
        f"find-limit: position and order rates doubled every {LIMIT_STEP_S:g} s until customer P99 > "
        f"{LIMIT_P99_MS:g} ms or a loss",
        ("step", "events accepted/s", "connections", "rider → customer P99 (ms)", "lost", "busiest process"),
    )
    for w in steps:
        rows = w["rows"]
        busiest = max(w["processes"].items(), key=lambda kv: kv[1]["core_share"], default=None)
        top = f"{busiest[0]} ({busiest[1]['core_share']:.0%} of a core)" if busiest else "-"
        table.add(
            w["window"],
            rows["concurrency"]["events_accepted_per_s"],
            rows["concurrency"]["connections_max"],
            rows["latency"]["rider_to_customer_ms"]["p99"],
            rows["reliability"]["lost"],
            top,
        )
    return table


def main(
    settings: Settings,
    config: PeakConfig,
    *,
    console: Console,
    database_url: str | None = None,
    faults: bool = False,
    find_limit: bool = False,
    json_path: Path | None = None,
) -> list[Report]:
    """Run with a progress line, print the tables and the JSON; return the tables."""
    with console.status("bench peak: starting") as status:
        result = run(
            settings,
            config,
            database_url=database_url,
            faults=faults,
            find_limit=find_limit,
            progress=lambda s: status.update(f"bench peak: {s}"),
        )
    tables = reports(result)
    for table in tables:
        console.print(table.rich())
    text = json.dumps(result, indent=1, default=str)
    if json_path is not None:
        json_path.write_text(text + "\n", encoding="utf-8")
        console.print(f"figures written to {json_path}")
    else:
        console.print_json(text)
    return tables
