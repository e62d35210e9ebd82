"""``bloomwire bench peak``: the Valentine's Day drill, the whole backbone at K x a normal day.

Starts the stack ``bloomwire up`` runs (access-controlled broker, persister, dispatch, alerts,
provisioner, the web service for websocket customers; supervised) on a fresh store in a temporary
directory, seeds the day through real MQTT clients (:mod:`~bloomwire.app.bench.peak_drill`), plays
the peak for ``duration`` seconds and reports the buyer's four rows (connection stability,
latency, concurrency, reliability) and each process's CPU and peak RSS
(:mod:`~bloomwire.app.bench.peak_figures`), beside Mosquitto's own QoS 1 ceiling measured on the
same broker first (:mod:`~bloomwire.app.bench.peak_ceiling`). With ``faults`` the peak goes on
while the faults of :mod:`~bloomwire.app.bench.peak_faults` come one after another; each gets the
same table and its recovery time. A PostgreSQL ``database_url`` names a server: the drill creates a
database of its own there and drops it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bloomwire.app.bench import peak_browser, peak_ceiling, peak_faults, temporary_settings
from bloomwire.app.bench import peak_figures as pf
from bloomwire.app.bench.peak_drill import NORMAL_ORDERS_PER_SHOP_DAY, OPEN_HOURS, OPERATOR, Drill, PeakConfig
from bloomwire.app.bench.peak_load import Journal
from bloomwire.app.bench.peak_procs import Sampler
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import SERVICES, WEB, Stack
from bloomwire.runtime.settings import Settings

__all__ = ["PeakConfig", "main", "normal_day", "reports", "run"]

#: Seconds of steady load after each fault's recovery before the next fault.
SETTLE_S = 10.0
#: --find-limit: seconds per step, the largest rate multiplier, the customer P99 it must stay under.
LIMIT_STEP_S = 20.0
LIMIT_MAX_SPEED = 64.0
LIMIT_P99_MS = 100.0
#: After the load stops: at least this long for the last acks and deliveries to arrive; then
#: until every event sent is acknowledged, or no new ack came for DRAIN_QUIET_S (a refused
#: event never is), at most DRAIN_MAX_S. A fixed 5 s counted a 10 s backlog (the 5,000-customer
#: run) as lost.
DRAIN_S = 5.0
#: Messages of each of the broker ceiling's publishers per run (riders' logins, up to 4).
CEILING_PER_PUBLISHER = 15_000
DRAIN_QUIET_S = 5.0
DRAIN_MAX_S = 120.0


class _Acks:
    """The ids acknowledged so far, read from the journal incrementally."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.ids: set[str] = set()
        self.cursor = 0

    def update(self) -> int:
        received = self.journal.received
        end = len(received)
        for r in received[self.cursor : end]:
            if r.topic.endswith("/acks"):
                self.ids.update(json.loads(r.payload).get("ids", []))
        self.cursor = end
        return len(self.ids)


def drain(journal: Journal, *, least: float = DRAIN_S, quiet: float = DRAIN_QUIET_S) -> float:
    """Wait for the backlog after the load stops (see :data:`DRAIN_S`); the seconds waited."""
    start = time.monotonic()
    acks = _Acks(journal)
    seen, changed = acks.update(), start
    while True:
        time.sleep(0.5)  # the poll's step: the condition is checked below
        now = time.monotonic()
        if (count := acks.update()) != seen:
            seen, changed = count, now
        everything = {s[2] for s in list(journal.sent)} <= acks.ids
        if now - start >= least and (everything or now - changed >= quiet or now - start >= DRAIN_MAX_S):
            return now - start


def _stack(settings: Settings, root: Path, config: PeakConfig, database_url: str | None) -> Stack:
    own = temporary_settings(
        settings, root, database_url=database_url or f"sqlite:///{root / 'peak.db'}", web_listen_port=0
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
    sqlite = database_url is None or database_url.startswith("sqlite")
    with contextlib.ExitStack() as cleanup:
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bloomwire-bench-peak-"))
        if not sqlite:
            assert database_url is not None
            database_url = cleanup.enter_context(peak_faults.fresh_postgres(database_url))
            progress(f"store: a fresh PostgreSQL database {database_url.rsplit('/', 1)[1]}")
        stack = _stack(settings, Path(tmp), config, database_url)
        progress("starting the stack")
        stack.start()
        sampler = Sampler(_pids(stack))
        journal = Journal()
        drill = Drill(stack.settings, config, journal)
        try:
            sampler.start()
            steps = Steps(faults=faults, find_limit=find_limit, sqlite=sqlite)
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
    progress("measuring Mosquitto's QoS 1 ceiling on this broker (mosquitto_pub -l → mosquitto_sub)")
    ceiling = peak_ceiling.measure(
        stack.settings,
        [peak_ceiling.Publisher(r, f"riders/{r}/ceiling") for r in drill.riders],  # no service reads it
        OPERATOR,
        "riders/+/ceiling",
        messages=CEILING_PER_PUBLISHER * min(4, len(drill.riders)),
    )
    if steps.faults:
        drill.through_proxy(peak_faults.IMPAIRED_RIDER)
    progress(f"connecting {config.shops} shops and {config.riders} riders")
    drill.connect_staff()
    drill.seed(progress)
    browser_accesses = drill.seed_browser_orders() if config.browsers else {}
    progress(f"connecting {config.customers} customers ({config.ws_share:.0%} over websockets)")
    drill.connect_customers()
    if browser_accesses:
        progress(f"opening {len(browser_accesses)} tracking pages in Chromium")
    with peak_browser.opened(stack.settings, browser_accesses) as pages:
        windows, limit, browsers = _load(stack, drill, sampler, steps, progress, pages)
    progress("draining")
    waited = drain(drill.journal)
    progress(f"drained in {waited:.1f} s")
    sampler.sample()
    matched = pf.match(drill.journal, drill.plan)
    out: dict[str, Any] = {"config": asdict(config), "normal_day": normal_day(config)}
    out["ceiling"] = None if ceiling is None else ceiling.as_dict()
    out["emqx_reference"] = peak_ceiling.EMQX_MOSQUITTO_QOS1
    out["windows"] = [_window(drill, sampler, matched, w, at) for w, at in windows]
    for w, (window, _at) in zip(out["windows"], windows, strict=True):
        w["note"] = window.note
    out["drop_reasons"] = dict(drill.journal.drop_reasons)
    out["browsers"] = browsers
    if limit:
        out["limit"] = [_window(drill, sampler, matched, w, at) for w, at in limit]
    return out


Windows = list[tuple[pf.Window, float | None]]


def _load(
    stack: Stack,
    drill: Drill,
    sampler: Sampler,
    steps: Steps,
    progress: Callable[[str], None],
    pages: peak_browser.Pages,
) -> tuple[Windows, Windows, dict[str, Any] | None]:
    """The peak, then the faults and the limit steps; the browser pages' figures at the end."""
    windows: Windows = []
    limit: Windows = []
    browsers = None
    with _running(drill):
        t0 = time.time()
        _tick(progress, drill, t0, drill.config.duration)
        windows.append((pf.Window("peak", t0, time.time()), None))
        if steps.faults:
            windows += _faults(stack, drill, progress, sqlite=steps.sqlite)
        if steps.find_limit:
            limit = _find_limit(drill, sampler, progress)
        if pages.tabs:
            progress("the shop writes to every browser page")
            browsers = peak_browser.chat_shown(drill, pages)
    return windows, limit, browsers


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

    for name, inject in peak_faults.faults(sqlite=sqlite).items():
        progress(f"fault: {name}")
        fault = inject(stack, drill, matched)
        recovery = fault.recovery_s
        progress(f"fault: {name}: recovered after {recovery if recovery is None else round(recovery, 2)} s")
        _tick(progress, drill, time.time(), SETTLE_S)
        window = pf.Window(name, fault.at, time.time(), recovery, fault.note)
        out.append((window, fault.at if name.startswith("broker") else None))
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
    if any(w.get("note") for w in windows):
        summary.add("fault", *(w.get("note") or "-" for w in windows))
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
    if result.get("browsers"):
        out.append(browsers_report(result["browsers"]))
    out.append(anchors_report(result))
    return out


def browsers_report(b: dict[str, Any]) -> Report:
    """The customers in the browser page: how many went live, and a shop line to each page."""
    table = Report(
        "customers in the browser (/track in Chromium, through the web service's /mqtt)", ("figure", "value")
    )
    table.add(
        "pages live",
        f"{b['pages']} of {b['asked']}"
        + ("" if b["pages"] == b["asked"] else f" (stopped by {b['stopped_by']})")
        + f", all live {b['all_live_s']} s after the first was opened",
    )
    table.add("shop chat → shown on the page (end of the run)", _lat(b["shop_chat_to_page_ms"]))
    return table


def anchors_report(result: dict[str, Any]) -> Report:
    """The broker's own QoS 1 ceiling (same run) and the published reference, beside the drill."""
    table = Report("anchors: what the broker alone does, beside the drill", ("figure", "value"))
    ceiling = result.get("ceiling")
    per_s = ceiling["per_s"] if ceiling else None
    if ceiling:
        table.add(
            f"Mosquitto QoS 1 ceiling, this broker, same run ({ceiling['publishers']} x mosquitto_pub -l "
            "→ mosquitto_sub, access control on)",
            f"{per_s:.0f} msg/s median (runs {', '.join(str(r) for r in ceiling.get('runs_per_s', []))}) · "
            f"{ceiling['arrived']}/{ceiling['sent']} arrived in the worst run, each checked",
        )
    else:
        table.add("Mosquitto QoS 1 ceiling, same run", "not measured (no mosquitto_pub/mosquitto_sub)")
    steps = [*result["windows"][:1], *result.get("limit", [])]
    for w in steps:
        delivered = w["rows"]["concurrency"]["broker_delivered_per_s"]
        share = f" = {delivered / per_s:.1%} of the ceiling" if per_s and delivered else ""
        table.add(f"drill, {w['window']}: broker delivered", f"{delivered} msg/s{share}")
    table.add("published reference", peak_ceiling.EMQX_MOSQUITTO_QOS1)
    return table


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
