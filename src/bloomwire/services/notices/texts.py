"""The notices' sentences: ``templates.toml`` (one table per language), filled in with facts."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from datetime import datetime, tzinfo
from functools import cache
from importlib import resources

from bloomwire.contract.events import Language, NoticeKind


@cache
def templates() -> Mapping[str, Mapping[str, str]]:
    """``templates.toml``: language -> key -> sentence."""
    raw = resources.files(__package__).joinpath("templates.toml").read_text(encoding="utf-8")
    return tomllib.loads(raw)


def clock(at: datetime, tz: tzinfo) -> str:
    """A time as the customer reads it: ``14:05``."""
    return f"{at.astimezone(tz):%H:%M}"


def _cause(said: Mapping[str, str], reason: str, window_end: str) -> str:
    """A delay's cause in words: a known one from the templates, else as the rider wrote it."""
    key = "reason_" + reason.strip().lower().replace(" ", "_").replace("-", "_")
    return said[key].format(window_end=window_end) if key in said else reason.replace("_", " ")


def render(
    kind: NoticeKind,
    lang: Language,
    *,
    order: str,
    now: datetime,
    tz: tzinfo,
    window_end: datetime,
    eta: datetime | None = None,
    reason: str = "",
) -> str:
    """The sentence of a notice of ``kind`` in ``lang``."""
    said = templates()[lang.value]
    end = clock(window_end, tz)
    values = {"order": order, "window_end": end}
    if eta is not None:
        values["eta_clock"] = clock(eta, tz)
        values["eta_min"] = str(max(1, math.ceil((eta - now).total_seconds() / 60)))
    key = kind.value
    if kind is NoticeKind.DELAYED:
        values["reason"] = _cause(said, reason, end)
        key = "delayed_no_eta" if eta is None else "delayed_on_time" if eta <= window_end else "delayed"
    elif kind is NoticeKind.FAILED:
        values["reason"] = said.get(f"fail_{reason}", said["fail_other"])
        values["next"] = said.get(f"next_{reason}", said["next_other"])
    return said[key].format(**values)
