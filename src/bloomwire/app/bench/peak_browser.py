"""Customers of ``bloomwire bench peak --browsers N`` in the browser: the real ``/track`` page.

Each page is opened in Chromium on its order's tracking link (it enrols for a login of its own
and speaks MQTT through the web service's ``/mqtt`` bridge) before the peak, stays open through
it, and at its end the shop writes a line on each order: shop publish → line shown on the page.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bloomwire.app.bench import peak_load as load
from bloomwire.app.bench import web
from bloomwire.app.bench.peak_drill import Drill
from bloomwire.app.bench.peak_figures import spread
from bloomwire.contract import events as ev
from bloomwire.runtime.settings import Settings

#: Longest wait for a line to show on a page (ms).
SHOWN_TIMEOUT_MS = 60_000


@dataclass
class Pages:
    """The open pages and how opening them went."""

    tabs: list[tuple[str, Any]] = field(default_factory=list)
    stopped_by: str = ""
    all_live_s: float = 0.0


@contextlib.contextmanager
def opened(settings: Settings, accesses: dict[str, ev.CustomerAccess]) -> Iterator[Pages]:
    """A page per access, open while the body runs (none when ``accesses`` is empty)."""
    if not accesses:
        yield Pages()
        return
    with web._browser() as browser:
        tabs, stopped_by, live_s = web._open_pages(browser, settings, accesses)
        yield Pages(tabs, stopped_by, live_s)


def chat_shown(drill: Drill, pages: Pages) -> dict[str, Any]:
    """The shop writes one line on each page's order; shop publish → shown on the page (ms)."""
    for _order, tab in pages.tabs:
        tab.evaluate(web.CHAT_PROBE)
    sent_at: dict[str, float] = {}
    for order, _tab in pages.tabs:
        shop = drill.accesses[order].shop
        topic, _eid, body = load.shop_chat(shop, order, f"Your roses for {order} are on their way")
        sent_at[order] = time.time() * 1000
        drill.clients[shop].publish(topic, body, qos=1)
    shown: list[float] = []
    for order, tab in pages.tabs:
        tab.wait_for_function("() => window.__chatShown", timeout=SHOWN_TIMEOUT_MS)
        shown.append(float(tab.evaluate("() => window.__chatShown")) - sent_at[order])
    return {
        "asked": drill.config.browsers,
        "pages": len(pages.tabs),
        "stopped_by": pages.stopped_by,
        "all_live_s": round(pages.all_live_s, 1),
        "shop_chat_to_page_ms": spread(shown),
    }
