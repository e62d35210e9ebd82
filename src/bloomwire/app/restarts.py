"""When to restart a service that exited, and when to call it a crash loop (``bloomwire up``).

Pure bookkeeping over a clock, so it is tested without processes: :class:`Restarts` is told
about exits and starts and answers with the delay before the next start. The delay doubles with
every exit inside the window (0.25 s, 0.5 s, 1 s, ... up to ``max_delay``). ``loop_exits`` exits
inside ``window_s`` make a crash loop: it is reported (status topic, log, metrics) and the
service is still retried at the longest delay, so a service waiting for e.g. its database comes
back by itself; a service that then runs ``stable_s`` without exiting is out of the loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How quickly to restart, and what counts as a crash loop."""

    first_delay: float = 0.25
    max_delay: float = 30.0
    window_s: float = 60.0
    loop_exits: int = 5
    stable_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an exit."""

    delay: float
    #: Exits counted: inside the window, or since the crash loop began.
    exits: int
    #: Seconds from the first of those exits to this one.
    span_s: float
    #: True when this exit starts a crash loop (:attr:`in_loop` stays true until it is stable).
    loop_started: bool
    in_loop: bool

    @property
    def reason(self) -> str:
        """The crash-loop reason for the status topic and the log."""
        return f"crash loop: {self.exits} exits in {self.span_s:.0f} s; next start in {self.delay:g} s"


@dataclass
class _Book:
    exits: deque[float] = field(default_factory=deque)
    started_at: float | None = None
    in_loop: bool = False
    restarts: int = 0
    #: First exit and number of exits of the current crash loop.
    loop_since: float = 0.0
    loop_exits: int = 0


class Restarts:
    """Exits, starts and crash loops of each service (not thread-safe: one supervisor thread)."""

    def __init__(
        self, policy: RestartPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self._books: dict[str, _Book] = {}

    def _book(self, name: str) -> _Book:
        return self._books.setdefault(name, _Book())

    def started(self, name: str, *, restart: bool = False) -> None:
        """``name`` was (re)started now."""
        book = self._book(name)
        book.started_at = self.clock()
        if restart:
            book.restarts += 1

    def exited(self, name: str) -> Decision:
        """``name`` exited now: how long to wait before starting it again."""
        p, book, now = self.policy, self._book(name), self.clock()
        book.exits.append(now)
        while book.exits and book.exits[0] <= now - p.window_s:
            book.exits.popleft()
        book.started_at = None
        n = len(book.exits)
        if book.in_loop:
            book.loop_exits += 1
            return Decision(p.max_delay, book.loop_exits, now - book.loop_since, False, True)
        delay = min(p.first_delay * 2 ** (n - 1), p.max_delay)
        if n < p.loop_exits:
            return Decision(delay, n, now - book.exits[0], False, False)
        book.in_loop, book.loop_since, book.loop_exits = True, book.exits[0], n
        return Decision(p.max_delay, n, now - book.loop_since, True, True)

    def check_stable(self, name: str) -> bool:
        """True (once) when ``name`` has run ``stable_s`` since its start and leaves its crash loop."""
        book = self._book(name)
        if not book.in_loop or book.started_at is None:
            return False
        if self.clock() - book.started_at < self.policy.stable_s:
            return False
        book.in_loop = False
        book.exits.clear()
        return True

    def restarts(self, name: str) -> int:
        """How often ``name`` was restarted."""
        return self._book(name).restarts

    def in_loop(self, name: str) -> bool:
        """True while ``name`` is in a crash loop."""
        return self._book(name).in_loop

    def looping(self) -> list[str]:
        """Services in a crash loop now."""
        return [n for n, b in self._books.items() if b.in_loop]
