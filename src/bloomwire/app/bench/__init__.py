"""Benchmarks behind `bloomwire bench`; each prints figures, none asserts on time."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bloomwire.app.supervisor import Stack
from bloomwire.runtime.settings import Settings


def temporary_settings(settings: Settings, root: Path, **extra: object) -> Settings:
    """``settings`` for a stack of the benchmark's own in ``root``: free ports, nothing kept, no
    operator login (the stack makes its own); ``extra`` sets more (a store, the web port)."""
    update: dict[str, object] = {
        "data_dir": root,
        "broker_port": 0,
        "broker_listen_port": 0,
        "broker_listen_ws_port": 0,
        "metrics_port": 0,
        "broker_username": None,
        "broker_password": None,
    }
    return settings.model_copy(update={**update, **extra})


@contextlib.contextmanager
def private_stack(settings: Settings, users: Sequence[str], *, name: str) -> Iterator[tuple[Settings, Path]]:
    """A broker and persister of their own on a fresh SQLite store in a temporary directory.

    Yields the running stack's settings and the directory; everything is stopped and removed on
    exit. ``users`` are the broker accounts the benchmark connects with.
    """
    with tempfile.TemporaryDirectory(prefix=f"bloomwire-bench-{name}-") as tmp:
        own = temporary_settings(settings, Path(tmp), database_url=f"sqlite:///{tmp}/bench.db")
        stack = Stack(own, services=("persister",), extra_users=users)
        try:
            yield stack.start(), Path(tmp)
        finally:
            stack.stop()
