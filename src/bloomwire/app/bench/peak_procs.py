"""CPU seconds and peak RSS of every process of the drill, sampled from ``/proc`` once a second.

Processes are followed by name (``broker``, each service, ``load generator``): a process killed
and started again is a new pid under the same name, and its CPU adds up across pids.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_peak_mb(pid: int) -> float | None:
    """``VmHWM``: the most resident memory ``pid`` ever had (MB)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler:
    """Samples ``pids()`` (name -> pid) every ``period`` seconds in a thread."""

    def __init__(self, pids: Callable[[], dict[str, int]], period: float = 1.0) -> None:
        self.pids = pids
        self.period = period
        self.samples: list[tuple[float, str, int, float, float]] = []  # (at, name, pid, cpu, rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> None:
        """Read every process now."""
        now = time.time()
        for name, pid in self.pids().items():
            cpu, rss = cpu_s(pid), rss_peak_mb(pid)
            if cpu is not None:
                self.samples.append((now, name, pid, cpu, rss or 0.0))

    def usage(self, t0: float, t1: float) -> dict[str, dict[str, Any]]:
        """Per name: CPU seconds used within [t0, t1], share of one core, and peak RSS (MB)."""
        first: dict[tuple[str, int], float] = {}
        last: dict[tuple[str, int], float] = {}
        rss: dict[str, float] = {}
        for at, name, pid, cpu, mb in self.samples:
            if not t0 - self.period <= at <= t1 + self.period:
                continue
            first.setdefault((name, pid), cpu)
            last[(name, pid)] = cpu
            rss[name] = max(rss.get(name, 0.0), mb)
        out: dict[str, dict[str, Any]] = {}
        seconds = max(t1 - t0, 1e-9)
        for (name, pid), cpu in last.items():
            entry = out.setdefault(name, {"cpu_s": 0.0, "pids": 0})
            entry["cpu_s"] += cpu - first[(name, pid)]
            entry["pids"] += 1
        for name, entry in out.items():
            entry["cpu_s"] = round(entry["cpu_s"], 2)
            entry["core_share"] = round(entry["cpu_s"] / seconds, 3)
            entry["rss_peak_mb"] = round(rss.get(name, 0.0), 1)
        return out
