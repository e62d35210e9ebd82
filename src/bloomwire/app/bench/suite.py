"""``bloomwire bench all``: every benchmark with short defaults, each writing its own measured block.

Each step is one benchmark run as its own command would run it, recorded under its key with the
equivalent command line (so a block says how to measure it again alone). A step that fails (a
missing browser, an unreachable database) is reported and the others go on. The Valentine's Day
drill (``bench peak``) is not part of it: it runs minutes and has blocks of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console

from bloomwire.app.bench import access as access_bench
from bloomwire.app.bench import alerts as alerts_bench
from bloomwire.app.bench import dispatch as dispatch_bench
from bloomwire.app.bench import ingest as ingest_bench
from bloomwire.app.bench import metrics as metrics_bench
from bloomwire.app.bench import mqttclients, wsfleet
from bloomwire.app.bench import restart as restart_bench
from bloomwire.app.bench import scale as scale_bench
from bloomwire.app.bench import web as web_bench
from bloomwire.app.bench.report import Report, record
from bloomwire.runtime.settings import Settings


@dataclass(frozen=True)
class Step:
    """One benchmark of the suite: its record key, its command line and how to run it."""

    key: str
    command: str
    run: Callable[[Settings, Console], list[Report]]


def _access(settings: Settings, console: Console) -> list[Report]:
    result = access_bench.bench_access(2_000, 10, echo=console.print)
    return [Report("bloomwire bench access", ("figure",), [(line,) for line in result.lines()])]


STEPS: tuple[Step, ...] = (
    Step(
        "ingest-latency",
        "bloomwire bench ingest --events 30000 --rate 5000 --no-ceiling",
        lambda s, c: ingest_bench.main(s, events=30_000, rate=5_000, riders=50, ceiling=False, console=c),
    ),
    Step(
        "ingest-capacity",
        "bloomwire bench ingest --events 60000 --rate 0",
        lambda s, c: ingest_bench.main(s, events=60_000, rate=0, riders=50, ceiling=True, console=c),
    ),
    Step("dispatch", "bloomwire bench dispatch", lambda s, c: dispatch_bench.main(s, console=c)),
    Step(
        "alerts",
        "bloomwire bench alerts --ticks 10 --events 50",
        lambda s, c: alerts_bench.main(
            s, orders=10_000, riders=2_000, ticks=10, events=50, database_url=None, console=c
        ),
    ),
    Step(
        "scale",
        "bloomwire bench scale --orders 1000 --orders 10000 --orders 30000",
        lambda s, c: scale_bench.main(
            [1_000, 10_000, 30_000], console=c, postgres="postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    ),
    Step("metrics", "bloomwire bench metrics", lambda s, c: metrics_bench.main(events=200_000, console=c)),
    Step(
        "restart", "bloomwire bench restart --kills 1", lambda s, c: restart_bench.main(s, kills=1, console=c)
    ),
    Step(
        "mqtt-clients",
        "bloomwire bench mqtt-clients --runs 3",
        lambda s, c: mqttclients.main(
            clients=["tuned", "paho", "mqtt5"], events=30_000, runs=3, rate=0, persist_us=0.0, console=c
        ),
    ),
    Step(
        "mqtt-clients-5000",
        "bloomwire bench mqtt-clients --runs 3 --rate 5000",
        lambda s, c: mqttclients.main(
            clients=["tuned", "paho", "mqtt5"], events=30_000, runs=3, rate=5_000, persist_us=0.0, console=c
        ),
    ),
    Step("access", "bloomwire bench access --orders 2000 --repeat 10", _access),
    Step(
        "web-connections",
        "bloomwire bench web --connections 2000 --seconds 30",
        lambda s, c: wsfleet.main(s, c, connections=[2_000], seconds=30.0),
    ),
    Step(
        "web",
        "bloomwire bench web --pages 20",
        lambda s, c: web_bench.main(s, c, orders=500, riders=200, seconds=30.0, pages=20, profile=False),
    ),
)


def main(
    settings: Settings, console: Console, *, only: Sequence[str] = (), skip: Sequence[str] = ()
) -> Report:
    """Run the chosen steps in turn, record each; return (and print) what became of each."""
    unknown = sorted((set(only) | set(skip)) - {s.key for s in STEPS})
    if unknown:
        raise ValueError(f"no bench step {', '.join(unknown)}: choose from {', '.join(s.key for s in STEPS)}")
    outcome = Report("bloomwire bench all", ("key", "command", "result"))
    for step in STEPS:
        if (only and step.key not in only) or step.key in skip:
            continue
        console.rule(f"{step.key}: {step.command}")
        try:
            reports = step.run(settings, console)
            paths = record(step.key, reports, command=step.command)
        except Exception as exc:  # one broken bench must not cost the others their figures
            console.print(f"[red]{step.key} failed: {exc}[/red]")
            why = str(exc).splitlines()[0][:120] if str(exc) else repr(exc)
            outcome.add(step.key, step.command, f"failed: {why}")
            continue
        outcome.add(step.key, step.command, "recorded in " + ", ".join(p.name for p in paths))
    console.print(outcome.rich())
    return outcome
