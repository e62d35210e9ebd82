"""The notices' sentences: ``templates.toml`` (one table per language), filled in with facts."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from datetime import datetime, tzinfo
from functools import cache
from importlib import resources

from bloomwire.contract.events import AmendField, Language, NoticeKind, OrderAmendment


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


def _when(value: object, tz: tzinfo) -> str:
    """A window bound of an amendment's changes (RFC 3339) as a clock time; ``?`` if it is none."""
    if isinstance(value, datetime):
        return clock(value, tz)
    return clock(datetime.fromisoformat(value), tz) if isinstance(value, str) else "?"


def _changed(said: Mapping[str, str], amendment: OrderAmendment, tz: tzinfo, window_end: datetime) -> str:
    """What an amendment changed, in words: the new window and address themselves, else the field.

    ``window_end`` is the order's (the store's, after the change) for a window whose start alone
    changed; a new position beside a new address is that address, not news of its own.
    """
    changes = amendment.changes
    parts: list[str] = []
    if AmendField.WINDOW_START in changes or AmendField.WINDOW_END in changes:
        start = changes.get(AmendField.WINDOW_START)
        end = changes.get(AmendField.WINDOW_END)
        parts.append(
            said["change_window" if start is not None else "change_window_end"].format(
                window_start=_when(start.new if start else None, tz),
                window_end=_when(end.new, tz) if end else clock(window_end, tz),
            )
        )
    if AmendField.ADDRESS in changes:
        parts.append(said["change_address"].format(address=changes[AmendField.ADDRESS].new))
    skip = {AmendField.WINDOW_START, AmendField.WINDOW_END, AmendField.ADDRESS}
    if AmendField.ADDRESS in changes:
        skip.add(AmendField.POSITION)
    parts += [said[f"change_{field.value}"] for field in AmendField if field in changes and field not in skip]
    return said["change_separator"].join(parts)


def _amended(said: Mapping[str, str], values: dict[str, str], amendment: OrderAmendment) -> str:
    """An amendment notice: who changed what ("at your request" or "the shop changed"), and why."""
    key = "amended_customer" if amendment.asked_by == "customer" else "amended_shop"
    text = said[key].format(**values)
    if amendment.reason.strip():
        text += said["amended_reason"].format(reason=amendment.reason.strip())
    return text


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
    proof: tuple[str, ...] = (),
    amendment: OrderAmendment | None = None,
) -> str:
    """The sentence of a notice of ``kind`` in ``lang``; then those ``proof`` names (templates'
    keys) add; for ``amended``, what ``amendment`` changed and why."""
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
    elif kind is NoticeKind.AMENDED and amendment is not None:
        values["changes"] = _changed(said, amendment, tz, window_end)
        return _amended(said, values, amendment)
    return "".join([said[key].format(**values), *(said["proof_separator"] + said[p] for p in proof)])
