"""``bloomwire bench …``: the benchmarks' command line; each prints figures, ``--record KEY`` writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bloomwire.app.bench import access as access_bench
from bloomwire.app.bench import alerts as alerts_bench
from bloomwire.app.bench import assistant as assistant_bench
from bloomwire.app.bench import dispatch as dispatch_bench
from bloomwire.app.bench import ingest as ingest_bench
from bloomwire.app.bench import metrics as metrics_bench
from bloomwire.app.bench import mqttclients, suite, wsfleet
from bloomwire.app.bench import peak as peak_bench
from bloomwire.app.bench import restart as restart_bench
from bloomwire.app.bench import scale as scale_bench
from bloomwire.app.bench import web as web_bench
from bloomwire.app.bench.report import Report, record
from bloomwire.app.terminal import console, fail, make_settings
from bloomwire.errors import BloomwireError
from bloomwire.runtime.broker import find_dynsec_plugin, find_mosquitto

#: ``bench scale``'s default sweep of open orders.
SCALE_STEPS = (1_000, 10_000, 100_000)

bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the main Typer app (loaded on first use: :mod:`bloomwire.app.cli`)."""
    app.add_typer(bench_app, name="bench")


Record = Annotated[
    str | None,
    typer.Option(
        "--record",
        metavar="KEY",
        help="Also write the figures, this command line, the date and the commit into the block "
        "<!-- measured:KEY --> … <!-- /measured:KEY --> of README.md and docs/*.md.",
    ),
]


def _record(key: str | None, reports: list[Any]) -> None:
    """Write ``reports`` into the docs' ``key`` block, if asked; say where."""
    if key is None:
        return
    try:
        paths = record(key, reports)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    console.print(f"figures recorded in {', '.join(str(p) for p in paths)}")


@bench_app.command("ingest")
def bench_ingest(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(help="How many rider events to publish.")] = 20_000,
    rate: Annotated[int, typer.Option(help="Publish rate, events/s (0 = as fast as possible).")] = 5_000,
    riders: Annotated[int, typer.Option(help="Simulated riders publishing.")] = 50,
    ceiling: Annotated[bool, typer.Option(help="Also measure mosquitto_pub/sub QoS 1.")] = True,
    ceiling_runs: Annotated[int, typer.Option(help="Runs of the broker's ceiling (200k messages each).")] = 3,
    record: Record = None,
) -> None:
    """Publish rider chat events through a private broker into the persister; print figures.

    One lean QoS 1 connection sends the riders' events at the set rate (one
    write per 2 ms). Printed: events/s persisted, publish→committed (the
    device ack) and publish→canonical P50/P99, lost and duplicated events
    (checked in the store), and the mosquitto_pub→sub QoS 1 ceiling of the
    same broker with the ratio. Start with --rate 5000 for latency and
    --rate 0 for capacity.
    """
    reports = ingest_bench.main(
        make_settings(ctx),
        events=events,
        rate=rate,
        riders=riders,
        ceiling=ceiling,
        ceiling_runs=ceiling_runs,
        console=console,
    )
    _record(record, reports)


@bench_app.command("dispatch")
def bench_dispatch(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Normal mode: orders created one at a time.")] = 200,
    riders: Annotated[int, typer.Option(help="Normal mode: riders online.")] = 50,
    peak_orders: Annotated[int, typer.Option(help="Peak mode: orders waiting at once.")] = 1000,
    peak_riders: Annotated[int, typer.Option(help="Peak mode: riders.")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed of the city layout.")] = 0,
    record: Record = None,
) -> None:
    """Normal-mode decision latency (order created → offer) and the peak-mode batch time."""
    reports = dispatch_bench.main(
        make_settings(ctx),
        console=console,
        orders=orders,
        riders=riders,
        peak_orders=peak_orders,
        peak_riders=peak_riders,
        seed=seed,
    )
    _record(record, reports)


@bench_app.command("alerts")
def bench_alerts(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Live orders in the store.")] = 10_000,
    riders: Annotated[int, typer.Option(help="Riders in the store.")] = 2_000,
    ticks: Annotated[int, typer.Option(help="Ticks to time.")] = 20,
    events: Annotated[int, typer.Option(help="Failed deliveries timed event → alert.")] = 100,
    database_url: Annotated[
        str | None, typer.Option(help="Store to seed (default: a temporary SQLite file).")
    ] = None,
    record: Record = None,
) -> None:
    """One alerts tick over many live orders, and event-committed → alert-raised latency."""
    reports = alerts_bench.main(
        make_settings(ctx),
        orders=orders,
        riders=riders,
        ticks=ticks,
        events=events,
        database_url=database_url,
        console=console,
    )
    _record(record, reports)


@bench_app.command("web")
def bench_web(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Open orders on the dashboard (0 = skip the dashboard).")] = 500,
    riders: Annotated[int, typer.Option(help="Riders moving, a position every 5 s each.")] = 200,
    seconds: Annotated[float, typer.Option(help="How long the riders move.")] = 30.0,
    pages: Annotated[int, typer.Option(help="Most customer tracking pages to open at once (0 = skip).")] = 50,
    profile: Annotated[bool, typer.Option(help="Also print the dashboard's CPU profile.")] = False,
    connections: Annotated[
        list[int] | None,
        typer.Option(
            help="Instead of Chromium: hold N raw MQTT-over-websocket customer connections through "
            "/mqtt, one message each per 5 s, for --seconds (repeat for several sizes)."
        ),
    ] = None,
    record: Record = None,
) -> None:
    """The shop dashboard under load and many customer pages, measured inside Chromium.

    Prints publish → DOM updated P50/P99, frames dropped, long tasks, main-thread
    time and JS heap of the dashboard, the web service's and broker's CPU; and
    for customer pages (opened 10 at a time until --pages, the memory reserve or
    the CPU stops it) how many, the time until all are live, shop chat → page
    latency and renderer memory.
    """
    if connections:
        _record(record, wsfleet.main(make_settings(ctx), console, connections=connections, seconds=seconds))
        return
    try:
        reports = web_bench.main(
            make_settings(ctx),
            console,
            orders=orders,
            riders=riders,
            seconds=seconds,
            pages=pages,
            profile=profile,
        )
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("assistant")
def bench_assistant(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Orders whose customers ask.")] = 20,
    repeat: Annotated[int, typer.Option(help="Times the held-out lines are sent.")] = 4,
    rate: Annotated[float, typer.Option(help="Customer lines per second.")] = 20.0,
    record: Record = None,
) -> None:
    """Intent accuracy (held-out 30 % apart), hand-over rate, and answer time P50/P99."""
    try:
        reports = assistant_bench.main(
            make_settings(ctx), orders=orders, repeat=repeat, rate=rate, console=console
        )
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("restart")
def bench_restart(
    ctx: typer.Context,
    kills: Annotated[int, typer.Option(help="kill -9 of each service, one after the other.")] = 2,
    orders: Annotated[
        int,
        typer.Option(
            help="Seed this many open orders (and a fifth as many open alerts); kill only the persister."
        ),
    ] = 0,
    record: Record = None,
) -> None:
    """Seconds a service killed under a supervised stack is away (new process, online again)."""
    try:
        reports = restart_bench.main(make_settings(ctx), kills=kills, console=console, orders=orders)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("scale")
def bench_scale(
    steps: Annotated[
        list[int] | None, typer.Option("--orders", help="Open orders per step (repeat the option).")
    ] = None,
    postgres: Annotated[
        str, typer.Option(help="PostgreSQL admin URL for the bytes per event ('' = SQLite only).")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the steps' JSON here.")] = None,
    record: Record = None,
) -> None:
    """Sweep the open orders: start-up, memory, alert tick, dispatch round, retained messages and
    store bytes per event at each step, with each column's growth exponent."""
    reports = scale_bench.main(
        steps or list(SCALE_STEPS), console=console, postgres=postgres or None, json_path=json_path
    )
    _record(record, reports)


@bench_app.command("metrics")
def bench_metrics(
    events: Annotated[int, typer.Option(help="Events counted per batch size.")] = 200_000,
    record: Record = None,
) -> None:
    """CPU per event of the Prometheus figures (the Service hook and the persister's), no broker."""
    _record(record, metrics_bench.main(events=events, console=console))


@bench_app.command("access")
def bench_access(
    orders: Annotated[int, typer.Option(help="Customer accesses already live on the broker.")] = 5_000,
    repeat: Annotated[int, typer.Option(help="Mint/revoke rounds to time.")] = 15,
    burst: Annotated[
        int, typer.Option(help="Also mint this many waiting orders: one per message, then batched (0: no).")
    ] = 20,
    record: Record = None,
) -> None:
    """Time minting and revoking one customer access (and the cut-off) with N live orders."""
    try:
        find_mosquitto()
        find_dynsec_plugin()
        result = access_bench.bench_access(orders, repeat, burst=burst, echo=console.print)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, [Report("bloomwire bench access", ("figure",), [(line,) for line in result.lines()])])


@bench_app.command("mqtt-clients")
def bench_mqtt_clients(
    clients: Annotated[
        str, typer.Option(help="Comma-separated: tuned (paho tuned), paho (plain paho), mqtt5 (prototype).")
    ] = "tuned,paho,mqtt5",
    events: Annotated[int, typer.Option(help="Events per run.")] = 30_000,
    runs: Annotated[int, typer.Option(help="Runs per client, interleaved.")] = 3,
    rate: Annotated[int, typer.Option(help="Load rate, events/s (0 = as fast as possible).")] = 0,
    persist_us: Annotated[float, typer.Option(help="Busy 'persist' cost per batch, µs.")] = 0.0,
    record: Record = None,
) -> None:
    """paho plain, paho tuned and an mqtt5-codec prototype on one persist-and-republish pipeline.

    Each run is a child process receiving QoS 1 events on a persistent session from a private
    Mosquitto, republishing each at QoS 1 and acking after; printed: its CPU µs per event and
    events/s, per client (median and range of the interleaved runs), and the host's load.
    """
    try:
        reports = mqttclients.main(
            clients=[c.strip() for c in clients.split(",") if c.strip()],
            events=events,
            runs=runs,
            rate=rate,
            persist_us=persist_us,
            console=console,
        )
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("peak")
def bench_peak(
    ctx: typer.Context,
    shops: Annotated[int, typer.Option(help="Shops taking orders.")] = 20,
    riders: Annotated[int, typer.Option(help="Riders on duty, a position every 5 s each.")] = 200,
    multiplier: Annotated[
        float, typer.Option(help="Orders at K x a normal day (40 orders per shop per 10-hour day).")
    ] = 20.0,
    customers: Annotated[int, typer.Option(help="Customers following their own order.")] = 500,
    ws_share: Annotated[
        float, typer.Option(help="Share of customers over websockets (the web service's /mqtt).")
    ] = 0.2,
    duration: Annotated[float, typer.Option(help="Seconds of peak load (faults come after).")] = 90.0,
    browsers: Annotated[
        int, typer.Option(help="More customers, each following its order in the /track page in Chromium.")
    ] = 0,
    faults: Annotated[
        bool,
        typer.Option(
            help="After the peak: broker kill -9, persister kill -9, database restarted (PostgreSQL) or "
            "unwritable (SQLite), one rider's network delayed and lossy."
        ),
    ] = False,
    find_limit: Annotated[
        bool,
        typer.Option(help="Then double the position and order rates until customer P99 > 100 ms or a loss."),
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="A PostgreSQL server (postgresql+psycopg://USER@HOST:PORT/DB): the drill creates a "
            "database of its own there and drops it after (default: a fresh SQLite file)."
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures' JSON here.")] = None,
    record: Record = None,
) -> None:
    """The Valentine's Day drill: the whole stack at K x a normal day, with customers watching.

    Prints the buyer's four rows -- connection stability, latency (rider → customer, rider →
    stored, shop command → rider inbox), concurrency and reliability -- and every process's CPU
    and peak RSS; with --faults the same per fault, with its recovery time.
    """
    config = peak_bench.PeakConfig(
        shops=shops,
        riders=riders,
        multiplier=multiplier,
        customers=customers,
        ws_share=ws_share,
        duration=duration,
        browsers=browsers,
    )
    try:
        reports = peak_bench.main(
            make_settings(ctx),
            config,
            console=console,
            database_url=database_url,
            faults=faults,
            find_limit=find_limit,
            json_path=json_path,
        )
    except (BloomwireError, TimeoutError) as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("all")
def bench_all(
    ctx: typer.Context,
    only: Annotated[list[str] | None, typer.Option(help="Run only this step (repeat the option).")] = None,
    skip: Annotated[list[str] | None, typer.Option(help="Leave this step out (repeat the option).")] = None,
) -> None:
    """Every benchmark with short defaults, each writing its block into README.md and docs/*.md.

    Steps (record keys): ingest-latency, ingest-capacity, dispatch, alerts, scale, metrics,
    restart, mqtt-clients, mqtt-clients-5000, access, web-connections, web. Each block carries the
    command that measures it alone, the date, the commit, the machine, its load and the same-run
    anchor. A failing step is reported and the others go on.
    """
    try:
        outcome = suite.main(make_settings(ctx), console, only=only or (), skip=skip or ())
    except ValueError as exc:
        raise fail(str(exc)) from None
    if any(row[2].startswith("failed") for row in outcome.rows):
        raise typer.Exit(1)
