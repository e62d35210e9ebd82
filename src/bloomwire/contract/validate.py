"""Guards every inbound payload passes before anything looks at it (issue #11).

Each guard refuses one kind of impossible input with a reason that names the rule: JSON nested too
deep, control characters in text, numbers that are strings, booleans or not finite, times that
cannot be put in UTC or are outside :class:`TimeBounds`. The field types are checked by pydantic
in Rust (no Python call per field); :func:`bloomwire.contract.events.describe_validation_error`
words their errors with :func:`text_problem` and :func:`utc_problem`. The functions raise
:class:`PayloadError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Final

from pydantic import AllowInfNan, AwareDatetime, Field, Strict, StringConstraints

from bloomwire.errors import PayloadError

#: Deepest JSON nesting accepted. The deepest contract payload has 4 levels (envelope, data,
#: ``candidates``, one candidate); 16 leaves room for clients' extra fields while staying far
#: below what any parser on the way recurses into (Python's json: ~1,000; pydantic's: 200).
MAX_DEPTH: Final = 16

# A JSON string, escapes included; an unterminated one runs to the end (possessive and anchored,
# so the scan stays linear whatever the input).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\[\s\S]?)*+(?:"|\Z)')
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))


def check_depth(raw: bytes) -> None:
    """Raise :class:`PayloadError` if the JSON text ``raw`` nests deeper than :data:`MAX_DEPTH`.

    Cheap: brackets are counted first (a usual event has a handful), and only a payload with more
    than :data:`MAX_DEPTH` opening brackets is scanned, brackets inside strings left out.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for char in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if char in b"[{" else -1
        if depth > MAX_DEPTH:
            raise PayloadError(f"payload nests deeper than {MAX_DEPTH} levels of JSON arrays/objects")


# --- text ---------------------------------------------------------------------------------------

#: C0 and C1 control characters but newline and tab, and lone UTF-16 surrogates.
_FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
#: The same rule as a pattern pydantic checks in Rust (a Python validator per field cost ~1 us
#: an event); pydantic itself refuses lone surrogates before the pattern sees them.
TEXT_PATTERN: Final = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*$"


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text: a control character (but ``\\n``, ``\\t``), a lone surrogate."""
    found = _FORBIDDEN_CHARS.search(value)
    if found is None:
        return None
    code = ord(found.group())
    what = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return f"text contains {what} (U+{code:04X} at {found.start()}); only \\n and \\t are allowed"


def check_text(value: str) -> str:
    """``value``, or ``ValueError`` saying what :func:`text_problem` finds.

    NUL is refused by PostgreSQL in text (and stored by SQLite): refusing it here gives the same
    verdict on both stores. Other controls have no place in a chat line or a name either.
    """
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: Put last in the ``Annotated`` of every inbound text field (after its ``StringConstraints``).
TEXT_GUARD: Final = StringConstraints(pattern=TEXT_PATTERN)
#: Inbound text of any length: a string without control characters (but newline and tab).
Text = Annotated[str, TEXT_GUARD]

# --- numbers --------------------------------------------------------------------------------------

#: A JSON number (integer or not), finite; never a string or a boolean.
Number = Annotated[float, Strict(), AllowInfNan(False)]
#: A JSON integer; never a string, a boolean or a number with a fraction.
Count = Annotated[int, Strict()]

# --- time -----------------------------------------------------------------------------------------


#: The first and last instants a timezone-aware time can be converted to UTC in (the stores keep
#: UTC): ``0001-01-01T00:00:00+05:00`` and ``9999-12-31T23:59:59-05:00`` lie outside.
EARLIEST_UTC: Final = datetime(1, 1, 1, tzinfo=UTC)
LATEST_UTC: Final = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
#: What pydantic's errors say of those bounds (``ctx``), to explain them.
UTC_LIMITS: Final = frozenset({"0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"})

#: A timezone-aware time that can be converted to UTC (compared in Rust: no Python validator).
Instant = Annotated[AwareDatetime, Field(ge=EARLIEST_UTC, le=LATEST_UTC)]


def utc_problem(value: object) -> str:
    """The reason for a time outside :data:`EARLIEST_UTC` .. :data:`LATEST_UTC`."""
    shown = value.isoformat() if isinstance(value, datetime) else str(value)
    return f"{shown} cannot be expressed in UTC (out of range)"


@dataclass(frozen=True, slots=True)
class TimeBounds:
    """How far from the receiver's clock an inbound time may be (Settings ``event_*`` fields).

    ``future_skew_s``: 5 minutes; phone clocks drift and are set by hand, but an event cannot
    happen in the future. ``max_age_s``: 7 days; a device's outbox re-sends what it could not
    deliver, and a week offline is the longest we wait for. ``eta_horizon_s``: 2 days; no
    flower delivery is expected later than that.
    """

    future_skew_s: float = 300.0
    max_age_s: float = 7 * 86_400.0
    eta_horizon_s: float = 2 * 86_400.0


#: Further from now than any bound (about 30 billion years), in seconds.
_FAR: Final = 1e18


#: The defaults, for code that has no Settings at hand (tests, tools).
DEFAULT_TIME_BOUNDS: Final = TimeBounds()


def check_time(field: str, at: datetime, now: datetime, bounds: TimeBounds) -> None:
    """Raise :class:`PayloadError` if ``at`` is outside ``bounds`` around ``now``."""
    seconds = at.timestamp()
    age = now.timestamp() - seconds
    if -bounds.future_skew_s <= age <= bounds.max_age_s:
        return  # the usual case, on every inbound event: no text made for a refusal
    check_epoch(field, seconds, now, bounds, shown=at.isoformat())


def check_epoch(
    field: str, seconds: float, now: datetime, bounds: TimeBounds, *, shown: str | None = None
) -> None:
    """:func:`check_time` for epoch seconds (OwnTracks ``tst``), compared as numbers (never converted)."""
    # Clamped first: comparing a huge int with a float is exact, converting it may overflow.
    age = now.timestamp() - max(-_FAR, min(seconds, _FAR))
    if -age > bounds.future_skew_s:
        raise PayloadError(
            f"{field}: {_shown(seconds, shown)} is more than {bounds.future_skew_s:g} s in the future "
            "(event_future_skew_s); is the sender's clock right?"
        )
    if age > bounds.max_age_s:
        raise PayloadError(
            f"{field}: {_shown(seconds, shown)} is more than {bounds.max_age_s:g} s old (event_max_age_s); "
            "too old to be taken as news"
        )


def _shown(seconds: float, shown: str | None) -> str:
    """The time as a refusal names it (made only when refusing: it costs more than the check)."""
    return shown if shown is not None else _epoch_text(seconds)


def check_eta(field: str, eta: datetime, now: datetime, bounds: TimeBounds) -> None:
    """Raise :class:`PayloadError` if an ETA lies beyond ``bounds.eta_horizon_s`` from now or is too old."""
    ahead = eta.timestamp() - now.timestamp()
    if ahead > bounds.eta_horizon_s:
        raise PayloadError(
            f"{field}: {eta.isoformat()} is more than {bounds.eta_horizon_s:g} s ahead "
            "(ETA horizon); no delivery is expected that late"
        )
    if -ahead > bounds.max_age_s:
        raise PayloadError(
            f"{field}: {eta.isoformat()} is more than {bounds.max_age_s:g} s old (event_max_age_s)"
        )


def _epoch_text(seconds: float) -> str:
    """Epoch seconds as given, with the UTC time when there is one."""
    shown = str(seconds)
    if 0 <= seconds < 253_402_300_800 and math.isfinite(seconds):  # before year 10000
        return f"{shown} ({datetime.fromtimestamp(seconds, UTC).isoformat()})"
    return shown
