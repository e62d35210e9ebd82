"""Delivery photos for the pages (issue 16): served only to whoever proved access to the order.

The proof is the tracking link, as for ``/api/enrol``: a page that has traded its link for a
device login (:mod:`.enrolment`) also gets a photo token; the shop's dashboard, which reads the
same link from the order's retained access message, asks ``/api/photo-token`` with it (the
order login is checked against the broker, ``bloomwire.access.enrol.login_accepted``). A token
is an HMAC of the shop and order under this installation's key (``DATA_DIR/web/photo.key``).
``GET /api/photo/S/O?t=TOKEN`` checks it, then reads the order's photo reference from the store
and the bytes from the photo store. A token of one order opens no other; a closed order's token
stops once its link has expired.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

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
