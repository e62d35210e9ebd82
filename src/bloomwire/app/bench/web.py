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
from rich.table import Table

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
window.__bench = { lat: [], gaps: [], last: 0 };
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


def bench_dashboard(
    settings: Settings, console: Console, *, orders: int, riders: int, seconds: float
) -> dict[str, Any]:
    """Run the dashboard part; returns its figures."""
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-web-") as tmp:
        own = settings.model_copy(
            update={"data_dir": Path(tmp), "broker_port": 0, "web_port": 0, "database_url": ""}
        )
        stack = Stack(own, services=(WEB,), extra_users=[SHOP, PUBLISHER])
        live = stack.start()
        pub = _client(live, PUBLISHER)
        try:
            now = datetime.now(UTC)
            out = min(riders, orders)
            for i in range(orders):
                status = "en_route" if i < out else ("created" if i % 3 else "accepted")
                rider = f"r{i + 1}" if i < out else None
                pub.publish(
                    topics.order_topic(SHOP, f"o{i + 1}", "state"),
                    _order_state(f"o{i + 1}", rider, status, now, i),
                    qos=1,
                    retain=True,
                )
            with _browser() as browser:
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                page.add_init_script(PAGE_PROBE)
                page.goto(f"{live.web_url}/shop")
                started = time.monotonic()
                page.fill("#login-user", SHOP)
                page.fill("#login-password", (live.data_dir / "secrets" / SHOP).read_text().strip())
                page.click("#login-submit")
                page.wait_for_function(
                    f"() => document.querySelectorAll('#board-body tr').length >= {orders}", timeout=60_000
                )
                loaded_s = time.monotonic() - started
                page.evaluate(HOOK)
                page.evaluate("() => { window.__bench.lat = []; window.__bench.gaps = []; }")
                cdp = page.context.new_cdp_session(page)
                cdp.send("Performance.enable")
                web_pid = stack.children[WEB].pid
                broker_pid = stack.broker.pid if stack.broker else None
                cpu0, bcpu0, t0 = _cpu_s(web_pid), _cpu_s(broker_pid), time.monotonic()
                sent = _move_riders(pub, out, seconds)
                time.sleep(1.0)
                elapsed = time.monotonic() - t0
                web_cpu, broker_cpu = (
                    (_cpu_s(web_pid) - cpu0) / elapsed,
                    (_cpu_s(broker_pid) - bcpu0) / elapsed,
                )
                probe = page.evaluate("() => window.__bench")
                metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        finally:
            pub.loop_stop()
            pub.disconnect()
            stack.stop()
    gaps = probe["gaps"]
    dropped = sum(max(0, round(g / (1000 / 60)) - 1) for g in gaps)
    return {
        "orders": orders,
        "riders": out,
        "seconds": seconds,
        "loaded_s": loaded_s,
        "positions_sent": sent,
        "latencies": probe["lat"],
        "frames": len(gaps),
        "dropped": dropped,
        "long_frames": sum(1 for g in gaps if g > 50),
        "heap_mb": metrics.get("JSHeapUsedSize", 0) / 2**20,
        "web_cpu": web_cpu,
        "broker_cpu": broker_cpu,
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


def bench_customers(settings: Settings, console: Console, *, pages: int) -> dict[str, Any]:
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
                access = ev.CustomerAccessEvent.model_validate_json(msg.payload).data
                accesses.setdefault(access.order, access)

        shop.on_message = on_access
        try:
            shop.subscribe(topics.all_orders_filter(None, shop=SHOP), 1)
            start = ev.now() + timedelta(minutes=30)
            for i in range(pages):
                created = ev.OrderCreatedEvent(
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
                opened = time.monotonic()
                tabs = []
                for order, access in sorted(accesses.items()):
                    tab = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
                    tab.goto(link_for_access(live.web_url, access))
                    tabs.append((order, tab))
                for _, tab in tabs:
                    tab.wait_for_selector("#conn[data-state=online]", timeout=120_000)
                all_live_s = time.monotonic() - opened
                rss = _pss_mb(_our_renderers())
                sent_at: dict[str, float] = {}
                for order, _ in tabs:
                    line = ev.OrderChatEvent(
                        source=f"{topics.SHOPS}/{SHOP}", data=ev.OrderChat(order=order, text=f"hello {order}")
                    )
                    sent_at[order] = time.time() * 1000
                    shop.publish(topics.shop_command(SHOP, topics.Command.CHAT), ev.encode(line), qos=1)
                latencies = []
                for order, tab in tabs:
                    tab.wait_for_selector(f".chat-text:text-is('hello {order}')", timeout=60_000)
                    shown = tab.evaluate("() => performance.timeOrigin + performance.now()")
                    latencies.append(shown - sent_at[order])
        finally:
            shop.loop_stop()
            shop.disconnect()
            stack.stop()
    return {"pages": len(accesses), "all_live_s": all_live_s, "rss_mb": rss, "chat_ms": latencies}


def main(
    settings: Settings, console: Console, *, orders: int, riders: int, seconds: float, pages: int
) -> None:
    """Both parts, printed as one table."""
    table = Table(title="bloomwire bench web", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("figure")
    if orders:
        console.print(
            f"dashboard: {orders} open orders, {riders} riders moving (a position every 5 s) "
            f"for {seconds:.0f} s …"
        )
        d = bench_dashboard(settings, console, orders=orders, riders=riders, seconds=seconds)
        lat = d["latencies"]
        table.add_row(
            "dashboard load", f"{d['orders']} orders on the board {d['loaded_s']:.1f} s after login"
        )
        table.add_row(
            "publish → DOM updated",
            f"P50 {_pct(lat, 50):.0f} ms · P99 {_pct(lat, 99):.0f} ms · "
            f"max {max(lat, default=float('nan')):.0f} ms "
            f"(n={len(lat)} of {d['positions_sent']} positions)",
        )
        table.add_row(
            "frames",
            f"{d['frames']} frames, ~{d['dropped']} dropped "
            f"({d['dropped'] / max(d['frames'] + d['dropped'], 1):.1%}), "
            f"{d['long_frames']} longer than 50 ms",
        )
        table.add_row("JS heap", f"{d['heap_mb']:.1f} MB used")
        table.add_row("CPU", f"web service {d['web_cpu']:.1%} of a core · broker {d['broker_cpu']:.1%}")
    if pages:
        console.print(f"customer pages: {pages} tracking pages at once …")
        c = bench_customers(settings, console, pages=pages)
        chat = c["chat_ms"] or [float("nan")]
        table.add_row(
            "customer pages", f"{c['pages']} pages live {c['all_live_s']:.1f} s after the first was opened"
        )
        table.add_row(
            "shop chat → customer page",
            f"P50 {statistics.median(chat):.0f} ms · P99 {_pct(chat, 99):.0f} ms "
            f"(all {len(chat)} lines sent at once)",
        )
        table.add_row(
            "renderer memory (PSS)",
            f"{c['rss_mb']:.0f} MB for {c['pages']} pages ({c['rss_mb'] / max(c['pages'], 1):.0f} MB each)",
        )
    console.print(table)
