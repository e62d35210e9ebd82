"""Delivery photos (issue 16): what a rider's device may send on ``riders/R/orders/O/photo``.

The payload is the image itself, not JSON: a JPEG or PNG of at most :data:`MAX_PHOTO_BYTES`
(the broker's 256 KiB ``max_packet_size`` must also hold the topic and the packet's header),
between :data:`MIN_SIDE` and :data:`MAX_SIDE` pixels a side. :func:`check_photo` is the one
check, used by the device before it sends and by the persister before it stores.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Final

from PIL import Image, UnidentifiedImageError

from bloomwire.contract.events import PHOTO_FORMATS, PhotoRef
from bloomwire.errors import PayloadError

#: Largest photo accepted: 250 KiB leaves room for the MQTT header under the broker's 256 KiB.
MAX_PHOTO_BYTES: Final = 250 * 1024
MIN_SIDE: Final = 16
MAX_SIDE: Final = 4096
#: A phone camera's 16 MP at most: a 250 KiB PNG of flat colour may decode to far more bytes.
MAX_PIXELS: Final = 16_000_000


def check_photo(data: bytes) -> PhotoRef:
    """What ``data`` is if it is an acceptable photo, else :class:`PayloadError` saying why."""
    if not data:
        raise PayloadError("photo is empty")
    if len(data) > MAX_PHOTO_BYTES:
        raise PayloadError(f"photo is {len(data)} bytes (max {MAX_PHOTO_BYTES})")
    width, height, fmt = _image_facts(data)
    if fmt not in PHOTO_FORMATS:
        raise PayloadError(f"photo is {fmt or 'an unknown format'}; send a JPEG or PNG")
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise PayloadError(f"photo {side} is {value} px (allowed {MIN_SIDE} to {MAX_SIDE})")
    return PhotoRef(
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=PHOTO_FORMATS[fmt],
        width=width,
        height=height,
        size=len(data),
    )


def _image_facts(data: bytes) -> tuple[int, int, str]:
    """Width, height and format of ``data``, decoded in full (a truncated file is refused too)."""
    try:
        with warnings.catch_warnings():
            # A decompression bomb is a refusal, not a warning (filterwarnings = error elsewhere).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = str(img.format or "")
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise PayloadError(f"photo is {width}x{height} px (at most {MAX_PIXELS:,} pixels)")
                if fmt == "JPEG":  # decoded at 1/8 scale: the whole stream is read, a fraction kept
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except PayloadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadError("photo is not an image (expected a JPEG or PNG)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PayloadError(f"photo is damaged: {exc}") from None
    return width, height, fmt
