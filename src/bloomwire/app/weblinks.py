"""What ``bloomwire demo`` (and ``up``) tell a person about the web pages while the stack runs:
the shop dashboard's address and login, and the tracking links of the first orders."""

from __future__ import annotations

import asyncio
import contextlib
import os

from rich.console import Console

from bloomwire.app.supervisor import OPERATOR, service_settings
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.links import SHOP_PATH, link_for_access


def dashboard_line(settings: Settings, shop: str, *, show_password: bool) -> str:
    """Where the dashboard is and how to log in to it."""
    secret = settings.data_dir / "secrets" / shop
    if show_password and secret.is_file():
        login = f"login {shop}, password {secret.read_text(encoding='utf-8').strip()}"
    else:
        login = f"login {shop}, password in {secret}"
    return f"shop dashboard: {settings.web_url}{SHOP_PATH} ({login})"


async def announce_links(settings: Settings, console: Console, *, count: int = 3) -> None:
    """Print the tracking links of the first ``count`` orders whose access is published
    (access-control mode), as the operator; runs until cancelled."""
    conn = Connection(service_settings(settings, OPERATOR), f"{OPERATOR}-links-{os.getpid()}")
    conn.subscribe(topics.ALL_ACCESS_FILTER, qos=1)
    conn.start()
    shown: set[str] = set()
    try:
        while len(shown) < count:
            await conn.wait_message(1.0)
            for msg in conn.drain(100):
                if not msg.payload or len(shown) >= count:
                    continue
                with contextlib.suppress(ValueError):
                    access = ev.CustomerAccessGrantedEvent.model_validate_json(msg.payload).data
                    if access.order not in shown:
                        shown.add(access.order)
                        link = link_for_access(settings.web_url, access)
                        console.print(f"tracking link of order {access.order}: {link}", soft_wrap=True)
        await asyncio.Event().wait()  # keep quiet until cancelled
    finally:
        await conn.stop(announce_offline=False)
