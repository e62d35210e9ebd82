"""The customer's tracking link: ``<web>/track#s=S&o=O&c=C&u=LOGIN&p=PASSWORD``.

Everything after ``#`` stays in the browser (it is never sent in a request, so no server log
can hold the password); the page posts it to ``/api/enrol``. The shop dashboard builds the same
link from the retained access message (``web/src/lib/links.js``): keep the two in step.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from bloomwire.contract.events import CustomerAccess
from bloomwire.runtime.settings import Settings

TRACK_PATH = "/track"
SHOP_PATH = "/shop"
#: The running web service writes its address here (``DATA_DIR/web/url``) for the other commands.
URL_FILE = Path("web") / "url"
_FIELDS = {"s": "shop", "o": "order", "c": "customer", "u": "username", "p": "password"}


def tracking_link(base_url: str, shop: str, order: str, customer: str, username: str, password: str) -> str:
    """The link a customer opens to follow ``order``."""
    fragment = urlencode({"s": shop, "o": order, "c": customer, "u": username, "p": password})
    return f"{base_url.rstrip('/')}{TRACK_PATH}#{fragment}"


def link_for_access(base_url: str, access: CustomerAccess) -> str:
    """The link for the provisioner's ``customer.access_granted`` message of an order."""
    return tracking_link(
        base_url, access.shop, access.order, access.customer, access.username, access.password
    )


def parse_tracking_link(link: str) -> dict[str, str]:
    """The fields of a tracking link (``shop``, ``order``, ...); missing ones are absent."""
    values = parse_qs(urlsplit(link).fragment, keep_blank_values=False)
    return {name: values[key][0] for key, name in _FIELDS.items() if key in values}


def record_web_url(settings: Settings, url: str) -> None:
    """Note where the web service of ``settings.data_dir`` answers (read by :func:`web_url`)."""
    path = settings.data_dir / URL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(url + "\n", encoding="utf-8")


def web_url(settings: Settings) -> str | None:
    """Where people open the pages: ``public_url``, the configured port, or what the web service
    of this data dir recorded when it started; None when nothing says."""
    if settings.public_url or settings.web_port:
        return settings.web_url
    try:
        recorded = (settings.data_dir / URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return recorded or None
