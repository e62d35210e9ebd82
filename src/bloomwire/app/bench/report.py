"""Benchmark figures as tables, printed and written into the docs by the command that measured them.

A figure in the README or ``docs/`` is never typed by hand: a benchmark run with
``--record KEY`` replaces the block between ``<!-- measured:KEY -->`` and ``<!-- /measured:KEY -->``
in ``README.md`` and every ``docs/*.md`` holding it, with its tables, the command line, the date,
the commit, the machine, its load and an anchor: a fixed workload timed right then, the
same-run reference that makes blocks of different days comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from bloomwire.errors import BloomwireError

#: The repository the package runs from (an editable install): ``src/bloomwire/app/bench/`` → root.
REPO_ROOT = Path(__file__).resolve().parents[4]


@dataclass
class Report:
    """One table of figures: a title, a header row and rows of text cells."""

    title: str
    header: tuple[str, ...] = ("figure", "value")
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a row (cells are shown as ``str(cell)``)."""
        self.rows.append(tuple(str(c) for c in cells))

    def rich(self) -> Table:
        """The table for the terminal."""
        table = Table(*self.header, title=self.title)
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        """The table in Markdown, its title in bold above it."""
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def command_line(argv: Sequence[str] | None = None, *, drop: str = "--record") -> str:
    """``bloomwire …`` as it was run, without ``drop`` and its value."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == drop:
            skip = True
        elif not arg.startswith(drop + "="):
            kept.append(arg)
    return shlex.join(["bloomwire", *kept])


def machine() -> str:
    """The CPU model (from ``/proc/cpuinfo``), or the platform's processor name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine()


def anchor_ms(rounds: int = 3) -> float:
    """Milliseconds of a fixed single-threaded Python workload (JSON and hashing), best of
    ``rounds``: taken when the figures are recorded, it says how fast this host was right then, so
    two blocks' figures compare through their anchors rather than their dates."""
    doc = [
        {"id": f"e{i}", "order": f"o{i % 97}", "lat": 52.5 + i * 1e-6, "text": "x" * 40} for i in range(2000)
    ]
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(10):
            hashlib.sha256(json.dumps(json.loads(json.dumps(doc))).encode()).digest()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def provenance(root: Path, now: datetime | None = None, *, anchor: float | None = None) -> str:
    """Date, commit (and whether the tree had changes), machine, cores, load average and the
    same-run anchor (:func:`anchor_ms`) of this run."""
    now = now or datetime.now(UTC)
    commit = _git(root, "rev-parse", "--short", "HEAD") or "no commit"
    # The docs' measured blocks are what the benches write: they do not make the code "changed".
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!*.md")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    state = f"{commit} with uncommitted changes" if dirty else commit
    anchor = anchor_ms() if anchor is None else anchor
    return (
        f"{now:%Y-%m-%d %H:%M} UTC, commit {state}, {machine()}, {os.cpu_count()} cores, "
        f"load average {load:.2f}, anchor {anchor:.0f} ms"
    )


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def block(key: str, reports: Sequence[Report], *, command: str, stamp: str) -> str:
    """The text that goes between the markers of ``key``."""
    tables = "\n\n".join(r.markdown() for r in reports)
    head = f"<!-- measured:{key} -->\nMeasured by `{command}` on {stamp}."
    return f"{head}\n\n{tables}\n<!-- /measured:{key} -->"


def record(
    key: str,
    reports: Sequence[Report],
    *,
    command: str | None = None,
    root: Path = REPO_ROOT,
    now: datetime | None = None,
) -> list[Path]:
    """Replace the ``key`` block in ``README.md`` and ``docs/*.md`` under ``root``; return the files.

    Raises :class:`BloomwireError` when no file holds the block (say where to add its markers).
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", key):
        raise BloomwireError(f"record key {key!r}: use lower-case letters, digits and dashes")
    pattern = re.compile(rf"<!-- measured:{re.escape(key)} -->.*?<!-- /measured:{re.escape(key)} -->", re.S)
    text = block(key, reports, command=command or command_line(), stamp=provenance(root, now))
    written = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if not path.is_file():
            continue
        old = path.read_text(encoding="utf-8")
        new = pattern.sub(lambda _m: text, old)
        if new != old:
            path.write_text(new, encoding="utf-8")
            written.append(path)
        elif pattern.search(old):
            written.append(path)  # the same figures: nothing to change
    if not written:
        raise BloomwireError(
            f"no README.md or docs/*.md under {root} holds the block "
            f"'<!-- measured:{key} -->' … '<!-- /measured:{key} -->'; add the two markers where "
            "the figures belong"
        )
    return written
