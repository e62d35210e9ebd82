"""``bloomwire bench web``: the shop dashboard under load, and many customer pages at once, in Chromium.

Dashboard: a password-file broker and the web service (child processes, as in production); a
publisher stands in for the persister and keeps 500 open orders (retained states) and 200
riders moving (each rider's position every 5 s on its order's location topic, its retained
state every 10 s). Inside the page: publish → DOM updated per position (the message carries
its publish time; the dashboard's per-frame hook reports when the frame that drew it ran),
frames dropped (gaps between animation frames), JS heap (Chrome DevTools Protocol); and the
web service's and the broker's CPU over the run.

Customer pages: an access-controlled stack (persister, provisioner, web), N orders created by a
shop, N pages each opened on its own tracking link (each enrols and logs in through the
bridge); then the shop writes a chat line on every order: shop publish → line shown on the
customer's page, and the renderer memory of the N pages.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import WEB, Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import BloomwireError
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.links import link_for_access

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOP = "s1"
PUBLISHER = "bench-web-pub"
CENTRE = (52.52, 13.405)
#: Collects publish → DOM latencies and frame gaps inside the dashboard.
PAGE_PROBE = """
window.__bench = { lat: [], gaps: [], long: [], last: 0 };
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__bench.long.push(e.duration);
}).observe({ type: 'longtask' });
const frame = (t) => {
  const b = window.__bench;
  if (b.last) b.gaps.push(t - b.last);
  b.last = t;
  requestAnimationFrame(frame);
};
requestAnimationFrame(frame);
"""
HOOK = """() => window.bloomwireDashboard.hooks.push((applied) => {
  const now = Date.now();
  for (const a of applied) {
    if (a.name === 'order_location' && a.body) window.__bench.lat.push(now - Date.parse(a.body.position.at));
  }
})"""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far."""
    if not pid:
        return 0.0
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _pss_mb(pids: list[int]) -> float:
    """Proportional set size of processes (shared pages counted once across them), MB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def _parent(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def _our_renderers() -> list[int]:
    """Chromium renderer processes started by this process (not other users' browsers)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"--type=renderer" not in (entry / "cmdline").read_bytes():
                continue
            pid = int(entry.name)
            for _ in range(8):
                pid = _parent(pid)
                if pid in (me, 0, 1):
                    break
            if pid == me:
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def _browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BloomwireError("bench web needs Playwright: run `make setup` (dev extras)") from exc
    if not Path(CHROMIUM).exists():
        raise BloomwireError("bench web needs /usr/bin/chromium: run `make setup`")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _client(settings: Settings, username: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=paho.MQTTv5)
    client.username_pw_set(username, (settings.data_dir / "secrets" / username).read_text().strip())
    client.connect(settings.broker_host, settings.broker_port)
    client.loop_start()
    return client


# --- the dashboard ---------------------------------------------------------------------------------


def _order_state(order: str, rider: str | None, status: str, now: datetime, i: int) -> bytes:
    lat, lon = CENTRE[0] + (i % 25) * 0.002, CENTRE[1] + (i // 25) * 0.002
    state = ev.OrderState(
        order=order,
        shop=SHOP,
        status=OrderStatus(status),
        rider=rider,
        customer=f"Customer {i}",
        window=ev.Window(start=now + timedelta(minutes=i % 120), end=now + timedelta(minutes=60 + i % 120)),
        updated_at=now,
        destination=ev.Place(lat=lat, lon=lon, address=f"Street {i}"),
    )
    return ev.encode(state)


def _position(rider: int, tick: int) -> ev.Position:
    lat = CENTRE[0] - 0.03 + (rider % 20) * 0.003 + tick * 0.0001
    lon = CENTRE[1] - 0.03 + (rider // 20) * 0.006 + tick * 0.0001
    return ev.Position(lat=lat, lon=lon, at=datetime.now(UTC), speed_kmh=18.0)


#: Customer pages opened at a time; a batch not live within BATCH_LIVE_S means the CPU is the limit.
BATCH = 10
BATCH_LIVE_S = 60.0
#: Share of the machine's memory left to everything else: opening stops below it.
MEMORY_RESERVE = 0.25
#: In a customer page: the wall-clock time the first chat line was drawn (the page's own clock).
CHAT_PROBE = """() => {
  window.__chatShown = 0;
  const seen = () => {
    if (!window.__chatShown && document.querySelector('.chat-text')) {
      window.__chatShown = performance.timeOrigin + performance.now();
    }
  };
  new MutationObserver(seen).observe(document.body, { childList: true, subtree: true });
  seen();
}"""
#: Chrome's cumulative main-thread timers (seconds), read before and after the riders move.
MAIN_THREAD = ("TaskDuration", "ScriptDuration", "RecalcStyleDuration", "LayoutDuration")


def _seed_orders(pub: paho.Client, orders: int, out: int) -> None:
    """Retained states of ``orders`` open orders, the first ``out`` en route with a rider each."""
    now = datetime.now(UTC)
    for i in range(orders):
        status = "en_route" if i < out else ("created" if i % 3 else "accepted")
        rider = f"r{i + 1}" if i < out else None
        pub.publish(
            topics.order_topic(SHOP, f"o{i + 1}", "state"),
            _order_state(f"o{i + 1}", rider, status, now, i),
            qos=1,
            retain=True,
        )


def _open_dashboard(page: Any, live: Settings, orders: int) -> float:
    """Log the shop in; seconds until every order has its row on the board."""
    page.add_init_script(PAGE_PROBE)
    page.goto(f"{live.web_url}/shop")
    started = time.monotonic()
    page.fill("#login-user", SHOP)
    page.fill("#login-password", (live.data_dir / "secrets" / SHOP).read_text().strip())
    page.click("#login-submit")
    page.wait_for_function(
        f"() => window.bloomwireDashboard && window.bloomwireDashboard.board.rows.size >= {orders}",
        timeout=60_000,
    )
    return time.monotonic() - started


def _metrics(cdp: Any, gc: bool = False) -> dict[str, float]:
    """Chrome's Performance metrics (after a garbage collection when asked)."""
    if gc:
        cdp.send("HeapProfiler.collectGarbage")
    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}


def _top_functions(profile: dict[str, Any], n: int = 12) -> list[tuple[str, float]]:
    """Self time (ms) per function of a CPU profile, the ``n`` largest."""
    nodes = {node["id"]: node["callFrame"] for node in profile["nodes"]}
    self_us: dict[str, float] = {}
    for node_id, delta in zip(profile["samples"], profile["timeDeltas"], strict=False):
        frame = nodes[node_id]
        where = frame["url"].rsplit("/", 1)[-1]
        name = (
            f"{frame['functionName'] or '(anonymous)'} {where}:{frame['lineNumber'] + 1}"
            if where
            else frame["functionName"]
        )
        self_us[name] = self_us.get(name, 0.0) + delta
    ranked = sorted(self_us.items(), key=lambda kv: -kv[1])[:n]
    return [(name, us / 1000) for name, us in ranked]


def _measure(
    page: Any, stack: Stack, pub: paho.Client, riders: int, seconds: float, profile: bool
) -> dict[str, Any]:
    """Move the riders for ``seconds``; what the page and the processes did meanwhile."""
    page.evaluate(HOOK)
    page.evaluate("() => { const b = window.__bench; b.lat = []; b.gaps = []; b.long = []; }")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    if profile:
        cdp.send("Profiler.enable")
        cdp.send("Profiler.setSamplingInterval", {"interval": 500})
        cdp.send("Profiler.start")
    before = _metrics(cdp, gc=True)
    web_pid = stack.children[WEB].pid
    broker_pid = stack.broker.pid if stack.broker else None
    cpu0, bcpu0, t0 = _cpu_s(web_pid), _cpu_s(broker_pid), time.monotonic()
    sent = _move_riders(pub, riders, seconds)
    time.sleep(1.0)
    elapsed = time.monotonic() - t0
    probe = page.evaluate("() => window.__bench")
    after = _metrics(cdp)
    top = _top_functions(cdp.send("Profiler.stop")["profile"]) if profile else []
    heap_end = _metrics(cdp, gc=True)["JSHeapUsedSize"]
    return {
        "elapsed": elapsed,
        "positions_sent": sent,
        "probe": probe,
        "main": {k: (after.get(k, 0.0) - before.get(k, 0.0)) / elapsed for k in MAIN_THREAD},
        "heap_mb": (before.get("JSHeapUsedSize", 0) / 2**20, heap_end / 2**20),
        "nodes": after.get("Nodes", 0),
        "web_cpu": (_cpu_s(web_pid) - cpu0) / elapsed,
        "broker_cpu": (_cpu_s(broker_pid) - bcpu0) / elapsed,
        "top": top,
    }


def bench_dashboard(
    settings: Settings, *, orders: int, riders: int, seconds: float, profile: bool = False
) -> dict[str, Any]:
    """Run the dashboard part; returns its figures."""
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-web-") as tmp:
        own = settings.model_copy(
            update={"data_dir": Path(tmp), "broker_port": 0, "web_port": 0, "database_url": ""}
        )
        stack = Stack(own, services=(WEB,), extra_users=[SHOP, PUBLISHER])
        live = stack.start()
        pub = _client(live, PUBLISHER)
        out = min(riders, orders)
        try:
            _seed_orders(pub, orders, out)
            with _browser() as browser:
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                loaded_s = _open_dashboard(page, live, orders)
                figures = _measure(page, stack, pub, out, seconds, profile)
        finally:
            pub.loop_stop()
            pub.disconnect()
            stack.stop()
    gaps = figures["probe"]["gaps"]
    return {
        **figures,
        "orders": orders,
        "riders": out,
        "seconds": seconds,
        "loaded_s": loaded_s,
        "latencies": figures["probe"]["lat"],
        "long_tasks": figures["probe"]["long"],
        "frames": len(gaps),
        "dropped": sum(max(0, round(g / (1000 / 60)) - 1) for g in gaps),
        "long_frames": sum(1 for g in gaps if g > 50),
    }


def _move_riders(pub: paho.Client, riders: int, seconds: float) -> int:
    """Each rider's position every 5 s (spread evenly), its retained state every 10 s."""
    interval = 5.0 / max(riders, 1)
    sent, tick, start = 0, 0, time.monotonic()
    while time.monotonic() - start < seconds:
        for r in range(riders):
            due = start + tick * 5.0 + r * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            position = _position(r, tick)
            location = ev.OrderLocation(order=f"o{r + 1}", rider=f"r{r + 1}", position=position)
            pub.publish(topics.order_topic(SHOP, f"o{r + 1}", "location"), ev.encode(location), qos=0)
            if tick % 2 == 0:
                state = ev.RiderState(
                    rider=f"r{r + 1}",
                    presence="online",
                    on_duty=True,
                    load=1,
                    capacity=3,
                    position=position,
                    updated_at=position.at,
                )
                pub.publish(topics.shop_rider_state(SHOP, f"r{r + 1}"), ev.encode(state), qos=1, retain=True)
            sent += 1
        tick += 1
    return sent


# --- customer pages --------------------------------------------------------------------------------


def bench_customers(settings: Settings, *, pages: int) -> dict[str, Any]:
    """Open ``pages`` tracking pages at once; time a chat line from the shop to each."""
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-track-") as tmp:
        own = settings.model_copy(
            update={"data_dir": Path(tmp), "broker_port": 0, "web_port": 0, "database_url": ""}
        )
        stack = Stack(own, services=("persister", WEB), access=True, shops=[SHOP], riders=[])
        live = stack.start(timeout=90)
        accesses: dict[str, ev.CustomerAccess] = {}
        shop = _client(live, SHOP)

        def on_access(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            if msg.payload and topics.parse_order_topic(msg.topic).channel == topics.ACCESS:
                access = ev.CustomerAccessGrantedEvent.model_validate_json(msg.payload).data
                accesses.setdefault(access.order, access)

        shop.on_message = on_access
        try:
            shop.subscribe(topics.all_orders_filter(None, shop=SHOP), 1)
            start = ev.now() + timedelta(minutes=30)
            for i in range(pages):
                created = ev.OrderCreateEvent(
                    source=f"{topics.SHOPS}/{SHOP}",
                    data=ev.OrderCreated(
                        order=f"c{i + 1}",
                        customer=ev.Customer(name=f"Customer {i}", lat=52.52, lon=13.40),
                        window=ev.Window(start=start, end=start + timedelta(hours=1)),
                        items=["roses"],
                    ),
                )
                shop.publish(
                    topics.shop_command(SHOP, topics.Command.CREATE_ORDER), ev.encode(created), qos=1
                )
            deadline = time.monotonic() + 120
            while len(accesses) < pages and time.monotonic() < deadline:
                time.sleep(0.1)
            with _browser() as browser:
                tabs, stopped_by, all_live_s = _open_pages(browser, live, accesses)
                rss, memory = _pss_mb(_our_renderers()), _memory_mb()
                for _, tab in tabs:  # each page notes when its line appears: timed in parallel
                    tab.evaluate(CHAT_PROBE)
                sent_at: dict[str, float] = {}
                for order, _ in tabs:
                    line = ev.OrderChatPostedEvent(
                        source=f"{topics.SHOPS}/{SHOP}", data=ev.OrderChat(order=order, text=f"hello {order}")
                    )
                    sent_at[order] = time.time() * 1000
                    shop.publish(topics.shop_command(SHOP, topics.Command.CHAT), ev.encode(line), qos=1)
                latencies = []
                for order, tab in tabs:
                    tab.wait_for_function("() => window.__chatShown", timeout=60_000)
                    latencies.append(tab.evaluate("() => window.__chatShown") - sent_at[order])
        finally:
            shop.loop_stop()
            shop.disconnect()
            stack.stop()
    return {
        "asked": pages,
        "pages": len(tabs),
        "stopped_by": stopped_by,
        "all_live_s": all_live_s,
        "rss_mb": rss,
        "chat_ms": latencies,
        "mem": memory,
    }


def _memory_mb() -> tuple[float, float]:
    """(available, total) memory of the machine, MB."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    return int(info["MemAvailable"].split()[0]) / 1024, int(info["MemTotal"].split()[0]) / 1024


def _all_live(tabs: list[tuple[str, Any]], timeout: float) -> bool:
    """Wait until every tab says it is online; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _, tab in tabs:
        while tab.locator("#conn[data-state=online]").count() == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    return True


def _open_pages(
    browser: Any, live: Settings, accesses: dict[str, ev.CustomerAccess]
) -> tuple[list[tuple[str, Any]], str, float]:
    """Open a page per tracking link, ``BATCH`` at a time, until all are live or a limit stops it.

    Returns the live tabs, what stopped the opening, and seconds from the first page to the last live.
    """
    tabs: list[tuple[str, Any]] = []
    opened = time.monotonic()
    items = sorted(accesses.items(), key=lambda kv: int(kv[0][1:]))
    for i in range(0, len(items), BATCH):
        available, total = _memory_mb()
        if available < MEMORY_RESERVE * total:
            return tabs, f"memory ({available:.0f} of {total:.0f} MB left)", time.monotonic() - opened
        batch = []
        for order, access in items[i : i + BATCH]:
            tab = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
            tab.goto(link_for_access(live.web_url, access))
            batch.append((order, tab))
        if not _all_live(batch, BATCH_LIVE_S):
            for _, tab in batch:
                tab.context.close()
            return (
                tabs,
                f"CPU ({len(batch)} more pages not live within {BATCH_LIVE_S:.0f} s)",
                time.monotonic() - opened,
            )
        tabs += batch
    return tabs, f"--pages {len(items)} (no limit reached)", time.monotonic() - opened


def _customers_report(c: dict[str, Any]) -> Report:
    chat = c["chat_ms"] or [float("nan")]
    available, total = c["mem"]
    each = c["rss_mb"] / max(c["pages"], 1)
    report = Report(f"customer tracking pages open at once (up to {c['asked']}, {BATCH} at a time)")
    report.add("pages live at once", f"{c['pages']}, stopped by {c['stopped_by']}")
    report.add("all live", f"{c['all_live_s']:.1f} s after the first was opened (each enrols, then logs in)")
    report.add(
        "shop chat → customer page",
        f"P50 {statistics.median(chat):.0f} ms · P99 {_pct(chat, 99):.0f} ms "
        f"(all {len(c['chat_ms'])} lines sent at once)",
    )
    report.add("renderer memory (PSS)", f"{c['rss_mb']:.0f} MB for {c['pages']} pages ({each:.0f} MB each)")
    room = max(0.0, available - MEMORY_RESERVE * total) / max(each, 1)
    report.add(
        "memory left",
        f"{available:.0f} of {total:.0f} MB: room for ~{room:.0f} more pages "
        f"above the {MEMORY_RESERVE:.0%} reserve",
    )
    return report


def _dashboard_report(d: dict[str, Any]) -> Report:
    lat, main, longs = d["latencies"], d["main"], d["long_tasks"]
    report = Report(
        f"shop dashboard: {d['orders']} open orders, {d['riders']} riders moving "
        f"(a position every 5 s each) for {d['seconds']:.0f} s"
    )
    report.add("dashboard load", f"{d['orders']} orders on the board {d['loaded_s']:.1f} s after login")
    report.add(
        "publish → DOM updated",
        f"P50 {_pct(lat, 50):.0f} ms · P99 {_pct(lat, 99):.0f} ms · "
        f"max {max(lat, default=float('nan')):.0f} ms (n={len(lat)} of {d['positions_sent']} positions)",
    )
    report.add(
        "frames",
        f"{d['frames']} drawn, ~{d['dropped']} dropped "
        f"({d['dropped'] / max(d['frames'] + d['dropped'], 1):.1%}), {d['long_frames']} longer than 50 ms",
    )
    report.add(
        "long tasks (> 50 ms)",
        f"{len(longs)}, {sum(longs) / 1000:.1f} s in all, longest {max(longs, default=0):.0f} ms",
    )
    report.add(
        "main thread per second",
        f"busy {main['TaskDuration'] * 1000:.0f} ms: script {main['ScriptDuration'] * 1000:.0f}, "
        f"style {main['RecalcStyleDuration'] * 1000:.0f}, layout {main['LayoutDuration'] * 1000:.0f}",
    )
    heap0, heap1 = d["heap_mb"]
    report.add(
        "JS heap (after GC)",
        f"{heap0:.1f} MB before the riders moved → {heap1:.1f} MB after · {d['nodes']:.0f} DOM nodes",
    )
    report.add("CPU", f"web service {d['web_cpu']:.1%} of a core · broker {d['broker_cpu']:.1%}")
    return report


def main(
    settings: Settings,
    console: Console,
    *,
    orders: int,
    riders: int,
    seconds: float,
    pages: int,
    profile: bool = False,
) -> list[Report]:
    """Both parts; prints and returns their tables."""
    reports: list[Report] = []
    if orders:
        console.print(
            f"dashboard: {orders} open orders, {riders} riders moving (a position every 5 s) "
            f"for {seconds:.0f} s …"
        )
        d = bench_dashboard(settings, orders=orders, riders=riders, seconds=seconds, profile=profile)
        reports.append(_dashboard_report(d))
        if profile:
            reports.append(
                Report(
                    "dashboard script self time (CPU profile)",
                    ("function", "ms"),
                    [(f, f"{ms:.0f}") for f, ms in d["top"]],
                )
            )
    if pages:
        console.print(f"customer pages: up to {pages} tracking pages at once, {BATCH} at a time …")
        reports.append(_customers_report(bench_customers(settings, pages=pages)))
    for report in reports:
        console.print(report.rich())
    return reports
