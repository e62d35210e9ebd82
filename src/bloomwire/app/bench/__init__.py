"""Benchmarks behind `bloomwire bench`; each prints figures, none asserts on time."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bloomwire.app.supervisor import Stack
from bloomwire.runtime.settings import Settings


@contextlib.contextmanager
def private_stack(settings: Settings, users: Sequence[str], *, name: str) -> Iterator[tuple[Settings, Path]]:
    """A broker and persister of their own on a fresh SQLite store in a temporary directory.

    Yields the running stack's settings and the directory; everything is stopped and removed on
    exit. ``users`` are the broker accounts the benchmark connects with.
    """
    with tempfile.TemporaryDirectory(prefix=f"bloomwire-bench-{name}-") as tmp:
        own = settings.model_copy(
            update={
                "data_dir": Path(tmp),
                "database_url": f"sqlite:///{tmp}/bench.db",
                "broker_port": 0,
                "broker_listen_port": 0,  # a temporary stack: free ports, nothing kept
                "broker_listen_ws_port": 0,
                "metrics_port": 0,
                "broker_username": None,
                "broker_password": None,
            }
        )
        stack = Stack(own, services=("persister",), extra_users=users)
        try:
            yield stack.start(), Path(tmp)
        finally:
            stack.stop()
