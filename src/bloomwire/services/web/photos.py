"""Delivery photos for the pages (issue 16): served only to whoever proved access to the order.

The proof is the tracking link, as for ``/api/enrol``: a page that has traded its link for a
device login (:mod:`.enrolment`) also gets a photo token; the shop's dashboard, which reads the
same link from the order's retained access message, asks ``/api/photo-token`` with it (the
order login is checked against the broker, :func:`login_accepted`). A token is an HMAC of the
shop and order under this installation's key (``DATA_DIR/web/photo.key``).
``GET /api/photo/S/O?t=TOKEN`` checks it, then reads the order's photo reference from the store
and the bytes from the photo store. A token of one order opens no other; a closed order's token
stops once its link has expired.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import queue
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bloomwire.runtime.settings import Settings
from bloomwire.store.photos import PhotoStore

KEY_FILE = Path("web") / "photo.key"


def load_key(data_dir: Path) -> bytes:
    """The installation's photo-token key, made (owner-only) on first use."""
    path = data_dir / KEY_FILE
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
    return key


@dataclass(frozen=True, slots=True)
class PhotoAccess:
    """Mints and checks photo tokens (one per order)."""

    key: bytes

    def token(self, shop: str, order: str) -> str:
        """The token of ``order`` of ``shop``: given to a page that proved its link."""
        return hmac.new(self.key, f"order/{shop}/{order}".encode(), hashlib.sha256).hexdigest()

    def allows(self, token: str, shop: str, order: str) -> bool:
        """Whether ``token`` opens the photo of ``order`` of ``shop``."""
        return hmac.compare_digest(token.encode(), self.token(shop, order).encode())


@dataclass(frozen=True, slots=True)
class Photo:
    """A photo to send: its bytes, media type and content address."""

    data: bytes
    content_type: str
    sha256: str


def read_photo(store: PhotoStore, ref: dict[str, object] | None) -> Photo | None:
    """The photo an order's ``photo`` column names, if it is kept."""
    if not ref:
        return None
    sha, kind = str(ref.get("sha256", "")), str(ref.get("content_type", ""))
    data = store.get(sha)
    if data is None or kind not in ("image/jpeg", "image/png"):
        return None
    return Photo(data, kind, sha)


def login_accepted(settings: Settings, username: str, password: str, timeout: float = 10.0) -> bool:
    """Whether the broker accepts ``username``/``password`` (one short MQTT session; blocking).

    Only for an order's first login (the tracking link's): pages and shops never hold a session
    with it, so this connection kicks nobody (one username is one session, docs/design.md §5).
    """
    answers: queue.Queue[bool] = queue.Queue()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=username,
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )
    client.username_pw_set(username, password)
    if settings.broker_tls:
        ca = str(settings.broker_ca_file) if settings.broker_ca_file else None
        client.tls_set(ca_certs=ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        answers.put(not rc.is_failure)

    def on_disconnect(_c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        answers.put(False)

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(settings.broker_host, settings.broker_port, keepalive=10, clean_start=True)
    except OSError:
        return False
    client.loop_start()
    try:
        return answers.get(timeout=timeout)
    except queue.Empty:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
