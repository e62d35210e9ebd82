"""The photo store (issue 16): delivery photos kept by content address (their sha256).

:class:`PhotoStore` is the seam: the persister puts, the web service gets, and neither knows
where the bytes live. :class:`FilePhotoStore` keeps them under ``DATA_DIR/photos/ab/abcd…``;
an object store (S3 and the like, keyed the same way) can take its place later.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_SHA256 = re.compile(r"[0-9a-f]{64}")
PHOTO_DIR = "photos"


class PhotoStore(Protocol):
    """Where delivery photos are kept, by the sha256 of their bytes."""

    def put(self, data: bytes) -> str:
        """Keep ``data`` (idempotent) and return its sha256."""
        ...

    def get(self, sha256: str) -> bytes | None:
        """The bytes of ``sha256``, or None when not kept (or not a sha256)."""
        ...


class FilePhotoStore:
    """Photos as files under ``root``, fanned out by the first two hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> FilePhotoStore:
        """The store of a data dir (``DATA_DIR/photos``)."""
        return cls(data_dir / PHOTO_DIR)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._path(sha)
        if path.exists():  # same address, same bytes
            return sha
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, synced and renamed: a crash never leaves half a photo under its address.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def get(self, sha256: str) -> bytes | None:
        if not _SHA256.fullmatch(sha256):
            return None
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError:
            return None
