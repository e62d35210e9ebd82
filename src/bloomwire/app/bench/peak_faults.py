"""The faults of ``bloomwire bench peak --faults``, each injected at the peak with its recovery time.

One after another: the broker and the persister ``kill -9``-ed (the supervisor starts them
again); the database restarted (PostgreSQL: connections refused and every backend terminated for
a restart's few seconds; the server itself is not ours to restart) or unwritable (SQLite: chmod and
an exclusive transaction); one rider's network delayed and lossy through a
:class:`~bloomwire.app.bench.peak_proxy.LossyProxy`. Each returns when the fault happened and how
many seconds it took to recover (None: not within :data:`RECOVERY_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bloomwire.app.bench import peak_figures as pf
from bloomwire.app.bench.peak_drill import Drill
from bloomwire.app.bench.peak_load import wait_until
from bloomwire.app.supervisor import Stack

#: How long the SQLite database stays unwritable.
UNWRITABLE_S = 20.0
#: How long a PostgreSQL "restart" refuses connections (a fast restart's downtime).
PG_RESTART_S = 5.0
#: The rider's bad network: one-way delay, share of chunks lost (resent after a TCP RTO), duration.
NET_DELAY_S = 0.3
NET_LOSS = 0.1
IMPAIRED_S = 20.0
#: The rider whose network goes bad (connected through the proxy from the start).
IMPAIRED_RIDER = "r1"
#: Longest wait for a recovery before the fault is reported as not recovered.
RECOVERY_TIMEOUT_S = 60.0

Matcher = Callable[[], pf.Matched]


@dataclass
class Fault:
    """What a fault did: when, its recovery time, and a line on what it was like."""

    at: float
    recovery_s: float | None
    note: str = ""


def _drained(matched: Matcher, at: float, back: float, what: str, who: str | None = None) -> float | None:
    """Seconds from ``back`` until every position sent in [at, back) (by ``who``) is stored."""

    def positions(m: pf.Matched) -> list[str]:
        return [
            e
            for e, (t, kind, sender) in m.sent.items()
            if kind == "position" and at <= t < back and who in (None, sender)
        ]

    def done() -> bool:
        m = matched()
        return all(e in m.acked for e in positions(m))

    try:
        wait_until(done, RECOVERY_TIMEOUT_S, what, step=0.5)
    except TimeoutError:
        return None
    m = matched()
    return max(0.0, max((m.acked[e] for e in positions(m)), default=back) - back)


def broker(stack: Stack, drill: Drill, matched: Matcher) -> Fault:
    """``kill -9`` the broker (the supervisor starts it again); seconds until every client is back."""
    proc = stack.broker
    assert proc is not None and proc.pid is not None
    at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    links = drill.journal.links

    def all_back() -> bool:
        return all(any(t > at for t, _sp in link.connects) for link in links.values())

    try:
        wait_until(all_back, RECOVERY_TIMEOUT_S, "every client back after the broker's restart", step=0.1)
    except TimeoutError:
        return Fault(at, None)
    return Fault(at, max(min(t for t, _sp in link.connects if t > at) for link in links.values()) - at)


def persister(stack: Stack, drill: Drill, matched: Matcher) -> Fault:
    """``kill -9`` the persister; seconds until a position sent after the kill is stored."""
    at = time.time()
    os.kill(stack.children["persister"].pid, signal.SIGKILL)
    found: list[float] = []

    def stored_again() -> bool:
        m = matched()
        acks = [
            m.acked[e]
            for e, (t, kind, _w) in m.sent.items()
            if kind == "position" and t >= at and e in m.acked
        ]
        if acks:
            found.append(min(acks))
        return bool(found)

    try:
        wait_until(stored_again, RECOVERY_TIMEOUT_S, "the persister storing again", step=0.5)
    except TimeoutError:
        return Fault(at, None)
    return Fault(at, found[0] - at)


def sqlite_unwritable(stack: Stack, drill: Drill, matched: Matcher) -> Fault:
    """SQLite file and folder read-only for a while; seconds from writable again until every
    position sent meanwhile is stored."""
    path = Path(stack.settings.database_url.removeprefix("sqlite:///"))
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
    return Fault(at, _drained(matched, at, back, "positions sent while unwritable stored"))


def _libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq takes it (no ``+driver``)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(scheme="postgresql"))


def postgres_restart(stack: Stack, drill: Drill, matched: Matcher) -> Fault:
    """The store's database refuses connections and every backend of it is terminated for
    :data:`PG_RESTART_S`; seconds from open again until every position sent meanwhile is stored."""
    url = stack.settings.database_url
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    admin = _libpq(urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path="/postgres")))
    db = sql.Identifier(name)
    at = time.time()
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(db))
        try:
            end = at + PG_RESTART_S
            while time.time() < end:  # a backend that was mid-connect is cut too
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                time.sleep(0.5)
        finally:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(db))
    back = time.time()
    return Fault(at, _drained(matched, at, back, "positions sent while the database was down stored"))


def network(stack: Stack, drill: Drill, matched: Matcher) -> Fault:
    """:data:`IMPAIRED_RIDER`'s link delayed and lossy for :data:`IMPAIRED_S`; seconds from clean
    again until everything that rider sent meanwhile is stored."""
    proxy = drill.proxy
    assert proxy is not None
    at = time.time()
    lost_before = proxy.lost_chunks
    proxy.impair(NET_DELAY_S, NET_LOSS)
    time.sleep(IMPAIRED_S)
    proxy.clear()
    back = time.time()
    recovery = _drained(matched, at, back, f"{IMPAIRED_RIDER}'s positions stored", who=IMPAIRED_RIDER)
    m = matched()
    stored = [
        (m.acked[e] - t) * 1000
        for e, (t, kind, who) in m.sent.items()
        if kind == "position" and who == IMPAIRED_RIDER and at <= t < back and e in m.acked
    ]
    s = pf.spread(stored)
    note = (
        f"{IMPAIRED_RIDER} through a proxy: +{NET_DELAY_S * 1000:.0f} ms each way, {NET_LOSS:.0%} of "
        f"chunks held a 200 ms RTO more ({proxy.lost_chunks - lost_before} held); its rider → stored "
        f"P50 {s['p50']} · max {s['max']} ms (n={s['n']})"
    )
    return Fault(at, recovery, note)


Inject = Callable[[Stack, Drill, Matcher], Fault]


def faults(*, sqlite: bool) -> dict[str, Inject]:
    """The faults of a run, in order (the database one depends on the store)."""
    database: dict[str, Inject] = (
        {"database unwritable (chmod + exclusive lock)": sqlite_unwritable}
        if sqlite
        else {"database restarted (connections refused, backends terminated)": postgres_restart}
    )
    return {
        "broker kill -9": broker,
        "persister kill -9": persister,
        **database,
        f"rider network delayed and lossy ({IMPAIRED_RIDER})": network,
    }


@contextlib.contextmanager
def fresh_postgres(server_url: str) -> Iterator[str]:
    """A new database on the server of ``server_url`` (the drill's store), dropped afterwards."""
    name = f"bloomwire_peak_{secrets.token_hex(4)}"
    parts = urllib.parse.urlsplit(server_url)
    admin = _libpq(urllib.parse.urlunsplit(parts._replace(path="/postgres")))
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urllib.parse.urlunsplit(parts._replace(scheme="postgresql+psycopg", path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
