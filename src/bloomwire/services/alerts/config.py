"""Alert thresholds: built-in defaults, a ``[defaults]`` table and ``[shops.<id>]`` overrides.

A rules file is TOML (see ``default_rules.toml`` next to this module for every key). Anything
wrong with it raises :class:`~bloomwire.errors.ConfigError` naming the file, the line and the key,
so a typo stops the service at start-up instead of silently using a default.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

from bloomwire.contract.events import ASSISTANT_RULES, AlertRule, Severity
from bloomwire.contract.topics import check_id
from bloomwire.errors import ConfigError, TopicError

#: The rules file shipped with the service; documents every key with its built-in default.
DEFAULT_RULES_FILE = Path(__file__).with_name("default_rules.toml")

#: Built-in severity of each rule.
DEFAULT_SEVERITY: Mapping[AlertRule, Severity] = MappingProxyType(
    {
        AlertRule.OVERDUE: Severity.CRITICAL,
        AlertRule.ETA_SLIP: Severity.WARNING,
        AlertRule.STALE_POSITION: Severity.WARNING,
        AlertRule.RIDER_OFFLINE: Severity.CRITICAL,
        AlertRule.UNASSIGNED: Severity.WARNING,
        AlertRule.CUSTOMER_UNREACHABLE: Severity.CRITICAL,
        AlertRule.DELIVERY_FAILED: Severity.CRITICAL,
        AlertRule.HANDOVER_CODE: Severity.WARNING,
    }
)

MAX_FOLLOWUP_TEXT = 2000


def _default_severity() -> Mapping[AlertRule, Severity]:
    return DEFAULT_SEVERITY


@dataclass(frozen=True)
class Thresholds:
    """The knobs of every rule for one shop. Durations are minutes unless the name says ``_h``."""

    #: overdue: minutes after the end of the promised window before the order counts as overdue.
    overdue_grace_min: float = 5
    #: eta_slip: minutes the ETA may run past the end of the promised window.
    eta_slip_min: float = 5
    #: stale_position: minutes without a position from a rider carrying an order.
    stale_position_min: float = 5
    #: rider_offline: minutes a rider carrying orders must stay offline (reconnects are common).
    rider_offline_min: float = 2
    #: unassigned: minutes after creation an order may wait for a rider to accept it.
    unassigned_min: float = 10
    #: handover_code: wrong handover codes a rider may enter on one order before the alert.
    handover_wrong_codes: float = 3
    #: Minutes an open alert may stay unacknowledged before it is re-notified (escalated).
    escalate_after_min: float = 15
    #: Hours after delivery the customer gets the follow-up message.
    followup_after_h: float = 2.0
    followup_text: str = "How were the flowers? Reply here if anything was not perfect."
    #: IANA time zone used for the HH:MM times in alert sentences.
    timezone: str = "UTC"
    #: Rules this shop does not want.
    disabled: frozenset[AlertRule] = frozenset()
    severity: Mapping[AlertRule, Severity] = field(default_factory=_default_severity, hash=False)

    @cached_property
    def overdue_grace(self) -> timedelta:
        return timedelta(minutes=self.overdue_grace_min)

    @cached_property
    def eta_slip(self) -> timedelta:
        return timedelta(minutes=self.eta_slip_min)

    @cached_property
    def stale_position(self) -> timedelta:
        return timedelta(minutes=self.stale_position_min)

    @cached_property
    def rider_offline(self) -> timedelta:
        return timedelta(minutes=self.rider_offline_min)

    @cached_property
    def unassigned(self) -> timedelta:
        return timedelta(minutes=self.unassigned_min)

    @cached_property
    def escalate_after(self) -> timedelta:
        return timedelta(minutes=self.escalate_after_min)

    @cached_property
    def followup_after(self) -> timedelta:
        return timedelta(hours=self.followup_after_h)

    @cached_property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def severity_of(self, rule: AlertRule) -> Severity:
        """The severity this shop gives ``rule``."""
        return self.severity.get(rule, DEFAULT_SEVERITY[rule])

    def enabled(self, rule: AlertRule) -> bool:
        """False if the shop switched ``rule`` off."""
        return rule not in self.disabled


@dataclass(frozen=True)
class RulesConfig:
    """Thresholds for every shop: the defaults plus per-shop overrides."""

    defaults: Thresholds = field(default_factory=Thresholds)
    shops: Mapping[str, Thresholds] = field(default_factory=dict, hash=False)
    source: Path | None = None

    def for_shop(self, shop: str) -> Thresholds:
        """The thresholds of ``shop`` (the defaults unless the file overrides them)."""
        return self.shops.get(shop, self.defaults)


# --- loading ----------------------------------------------------------------------------------

_NON_NEGATIVE = frozenset({"overdue_grace_min", "eta_slip_min", "rider_offline_min"})
_POSITIVE = frozenset(
    {"stale_position_min", "unassigned_min", "escalate_after_min", "followup_after_h", "handover_wrong_codes"}
)
_KEYS = tuple(f.name for f in fields(Thresholds))
_TOP_KEYS = ("defaults", "shops")
#: The rules this service evaluates (the assistant's hand-over rule is not one).
_RULE_NAMES = tuple(r.value for r in AlertRule if r not in ASSISTANT_RULES)
_SEVERITY_NAMES = tuple(s.value for s in Severity)
_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")
_TOML_LINE = re.compile(r"\(at line (\d+)")


class _LocatedError(Exception):
    """An error at a key path; turned into a :class:`ConfigError` with the file and line."""

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _table_name(path: tuple[str, ...]) -> str:
    return "[" + ".".join(path) + "]" if path else "the top level"


def _show(value: Any) -> str:
    """A value as the user wrote it (TOML spelling for booleans), cut to a readable length."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(table: tuple[str, ...], key: str, choices: tuple[str, ...]) -> _LocatedError:
    return _LocatedError(
        (*table, key), f"unknown key {key!r} in {_table_name(table)}{_suggest(key, choices)}"
    )


def _bad(table: tuple[str, ...], key: str, problem: str) -> _LocatedError:
    """``key 'unassigned_min' in [shops.s1] must be a positive number, got 'ten'``."""
    return _LocatedError((*table, key), f"key {key!r} in {_table_name(table)} {problem}")


def _number(table: tuple[str, ...], key: str, value: Any) -> float:
    positive = key in _POSITIVE
    want = "a positive number" if positive else "a number >= 0"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise _bad(table, key, f"must be {want}, got {_show(value)}")
    return float(value)


def _severity(
    table: tuple[str, ...], value: Any, base: Mapping[AlertRule, Severity]
) -> Mapping[AlertRule, Severity]:
    if not isinstance(value, dict):
        raise _bad(table, "severity", f"must be a table of rule = severity, got {_show(value)}")
    sub = (*table, "severity")
    merged = dict(base)
    for rule, sev in value.items():
        if rule not in _RULE_NAMES:
            raise _unknown(sub, rule, _RULE_NAMES)
        if sev not in _SEVERITY_NAMES:
            names = ", ".join(map(repr, _SEVERITY_NAMES))
            hint = _suggest(sev, _SEVERITY_NAMES) if isinstance(sev, str) else ""
            raise _bad(sub, rule, f"must be one of {names}, got {_show(sev)}{hint}")
        merged[AlertRule(rule)] = Severity(sev)
    return MappingProxyType(merged)


def _disabled(table: tuple[str, ...], value: Any) -> frozenset[AlertRule]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(table, "disabled", f"must be a list of rule names, got {_show(value)}")
    for name in value:
        if name not in _RULE_NAMES:
            hint = _suggest(name, _RULE_NAMES)
            raise _bad(table, "disabled", f"names unknown rule {name!r}{hint}")
    return frozenset(AlertRule(v) for v in value)


def _text(table: tuple[str, ...], key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(table, key, f"must be a non-empty string, got {_show(value)}")
    if len(value) > MAX_FOLLOWUP_TEXT:
        raise _bad(table, key, f"is {len(value)} characters long (max {MAX_FOLLOWUP_TEXT})")
    return value.strip()


def _timezone(table: tuple[str, ...], value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(table, "timezone", f"must be a time zone name, got {_show(value)}")
    try:
        ZoneInfo(value)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise _bad(table, "timezone", f"names an unknown time zone {value!r}") from None
    return value


def _apply(base: Thresholds, table: tuple[str, ...], values: Any) -> Thresholds:
    """``base`` with the keys of one TOML table applied, each checked."""
    if not isinstance(values, dict):
        raise _LocatedError(table, f"{_table_name(table)} must be a table, got {_show(values)}")
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _KEYS:
            raise _unknown(table, key, _KEYS)
        if key == "severity":
            changes[key] = _severity(table, value, base.severity)
        elif key == "disabled":
            changes[key] = _disabled(table, value)
        elif key == "followup_text":
            changes[key] = _text(table, key, value)
        elif key == "timezone":
            changes[key] = _timezone(table, value)
        else:
            changes[key] = _number(table, key, value)
    return replace(base, **changes)


def _build(data: Mapping[str, Any]) -> RulesConfig:
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown((), key, _TOP_KEYS)
    defaults = _apply(Thresholds(), ("defaults",), data.get("defaults", {}))
    shops_table = data.get("shops", {})
    if not isinstance(shops_table, dict):
        raise _LocatedError(("shops",), f"[shops] must be a table, got {_show(shops_table)}")
    shops: dict[str, Thresholds] = {}
    for shop, values in shops_table.items():
        try:
            check_id(shop, "shop id")
        except TopicError as exc:
            raise _LocatedError(("shops", shop), f"[shops.{shop}]: {exc}") from None
        shops[shop] = _apply(defaults, ("shops", shop), values)
    return RulesConfig(defaults=defaults, shops=MappingProxyType(shops))


def load_rules(path: Path | None) -> RulesConfig:
    """Read a rules file; ``None`` gives the built-in defaults.

    Raises :class:`ConfigError` naming the file, line and key of the first problem.
    """
    if path is None:
        return RulesConfig()
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: rules file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read rules file: {exc.strerror or exc}") from None
    return parse_rules(text, name=name, source=path)


def parse_rules(text: str, *, name: str = "rules.toml", source: Path | None = None) -> RulesConfig:
    """Like :func:`load_rules` for text already in memory (``name`` is used in messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_message(name, text, str(exc))) from None
    try:
        config = _build(data)
    except _LocatedError as exc:
        line = _locate(text, exc.path)
        where = f"{name} line {line}" if line else name
        raise ConfigError(f"{where}: {exc.message}") from None
    return replace(config, source=source)


def _syntax_message(name: str, text: str, message: str) -> str:
    """``rules.toml line 3, column 7: invalid TOML: Expected '=' ... — near 'stale 5'``."""
    pos = _TOML_POS.search(message) or _TOML_LINE.search(message)
    if pos is None:
        return f"{name}: invalid TOML: {message}"
    detail = message[: pos.start()].rstrip()
    line_no = int(pos.group(1))
    where = f"line {line_no}" + (f", column {pos.group(2)}" if pos.re is _TOML_POS else "")
    lines = text.splitlines()
    near = ""
    if 1 <= line_no <= len(lines) and lines[line_no - 1].strip():
        snippet = lines[line_no - 1].strip()
        near = f" near {snippet[:80]!r}"
        key = _key_of(snippet)
        if key:
            near += f" (key {key!r})"
    return f"{name} {where}: invalid TOML: {detail}{near}"


# --- finding the line of a key ----------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*(?P<name>[^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"^\s*(?P<key>[A-Za-z0-9_\-.\"' ]+?)\s*=")
_LEADING_KEY = re.compile(r"^\s*(?P<key>[A-Za-z0-9_\-]+)")


def _split_dotted(name: str) -> tuple[str, ...]:
    parts: list[str] = []
    for raw in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', name):
        part = raw.strip()
        if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return tuple(p for p in parts if p != "")


def _key_of(line: str) -> str | None:
    """The key a (possibly broken) ``key = value`` line is about."""
    match = _KEY_LINE.match(line)
    if match:
        return ".".join(_split_dotted(match.group("key")))
    match = _LEADING_KEY.match(line)
    return match.group("key") if match else None


def _locate(text: str, path: tuple[str, ...]) -> int | None:
    """1-based line defining ``path`` (or the nearest enclosing key or table), None if unknown."""
    if not path:
        return None
    table: tuple[str, ...] = ()
    best_line: int | None = None
    best_len = 0
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER.match(line)
        if header:
            table = _split_dotted(header.group("name"))
            defined = table
        else:
            match = _KEY_LINE.match(line)
            if not match:
                continue
            defined = table + _split_dotted(match.group("key"))
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
        if defined == path:
            return number
        common = len(defined) if path[: len(defined)] == defined else 0
        if common > best_len:
            best_line, best_len = number, common
    return best_line
