"""Alert thresholds: defaults, per-shop overrides and clear errors for broken rules files."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from bloomwire.contract.events import ASSISTANT_RULES, AlertRule, Severity
from bloomwire.errors import ConfigError
from bloomwire.services.alerts.config import (
    DEFAULT_RULES_FILE,
    RulesConfig,
    Thresholds,
    load_rules,
    parse_rules,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_built_in_defaults() -> None:
    config = load_rules(None)
    assert config == RulesConfig()
    t = config.for_shop("any-shop")
    assert t == Thresholds()
    assert (t.overdue_grace_min, t.eta_slip_min, t.stale_position_min) == (5, 5, 5)
    assert (t.unassigned_min, t.escalate_after_min, t.followup_after_h) == (10, 15, 2.0)
    assert t.followup_text.startswith("How were the flowers?")
    assert t.severity_of(AlertRule.OVERDUE) is Severity.CRITICAL
    assert t.overdue_grace == timedelta(minutes=5)
    assert t.followup_after == timedelta(hours=2)


def test_shipped_file_documents_exactly_the_defaults() -> None:
    config = load_rules(DEFAULT_RULES_FILE)
    assert config.defaults == Thresholds()
    assert dict(config.shops) == {}
    assert config.source == DEFAULT_RULES_FILE
    text = DEFAULT_RULES_FILE.read_text(encoding="utf-8")
    for key in Thresholds.__dataclass_fields__:
        assert f"{key} =" in text or f"[defaults.{key}]" in text, key
    for rule in AlertRule:
        assert (f"{rule.value} =" in text) is (rule not in ASSISTANT_RULES), rule


def test_shop_overrides_layer_on_the_defaults_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[defaults]
unassigned_min = 8
overdue_grace_min = 0
timezone = "UTC"

[defaults.severity]
eta_slip = "info"

[shops.s1]
unassigned_min = 5
stale_position_min = 7.5
disabled = ["eta_slip"]
followup_text = "  Thanks from Rosa!  "

[shops.s1.severity]
overdue = "warning"

[shops."s-2"]
severity = { unassigned = "critical" }
""",
    )
    config = load_rules(path)
    s1, s2, other = config.for_shop("s1"), config.for_shop("s-2"), config.for_shop("s3")
    assert (s1.unassigned_min, s2.unassigned_min, other.unassigned_min) == (5, 8, 8)
    assert s1.overdue_grace_min == 0
    assert s1.stale_position == timedelta(minutes=7.5)
    assert not s1.enabled(AlertRule.ETA_SLIP)
    assert s2.enabled(AlertRule.ETA_SLIP)
    assert s1.followup_text == "Thanks from Rosa!"
    assert s1.severity_of(AlertRule.OVERDUE) is Severity.WARNING
    assert s1.severity_of(AlertRule.ETA_SLIP) is Severity.INFO  # from [defaults.severity]
    assert s2.severity_of(AlertRule.UNASSIGNED) is Severity.CRITICAL
    assert s2.severity_of(AlertRule.OVERDUE) is Severity.CRITICAL
    assert other is config.defaults


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_rules(write(tmp_path, "# nothing\n")).defaults == Thresholds()


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        (
            "[defaults]\nunassigned_min = 10\n\n[shops.s1]\nstale_postion = 4\n",
            5,
            ["unknown key 'stale_postion' in [shops.s1]", "did you mean 'stale_position_min'?"],
        ),
        (
            "[defaults]\noverdue_grace_min = 5\n\n\nunassigned_min = 'ten'\n",
            5,
            ["key 'unassigned_min'", "must be a positive number, got 'ten'"],
        ),
        ("[defaults]\nstale_position_min = -3\n", 2, ["'stale_position_min'", "got -3"]),
        ("[defaults]\nunassigned_min = 0\n", 2, ["'unassigned_min'", "positive", "got 0"]),
        ("[defaults]\novERDUE_grace_min = 1\n", 2, ["unknown key 'ovERDUE_grace_min'"]),
        ("[defaults]\neta_slip_min = true\n", 2, ["'eta_slip_min'", "got true"]),
        ("[defaults]\neta_slip_min = -1\n", 2, ["'eta_slip_min'", "a number >= 0"]),
        ("[defaults]\nescalate_after_min = nan\n", 2, ["'escalate_after_min'"]),
        ("[defaults]\nfollowup_text = ''\n", 2, ["'followup_text'", "non-empty"]),
        ("[defaults]\ntimezone = 'Mars/Base'\n", 2, ["'timezone'", "'Mars/Base'"]),
        ("[defaults]\ndisabled = ['eta_slp']\n", 2, ["'disabled'", "did you mean 'eta_slip'?"]),
        ("[defaults]\ndisabled = 'eta_slip'\n", 2, ["'disabled'", "list of rule names"]),
        (
            "[shops.s1]\nunassigned_min = 5\n[shops.s1.severity]\noverdue = 'crit'\n",
            4,
            ["key 'overdue' in [shops.s1.severity]", "did you mean 'critical'?"],
        ),
        (
            "[shops.s1]\nseverity = { overdu = 'critical' }\n",
            2,
            ["unknown key 'overdu' in [shops.s1.severity]", "did you mean 'overdue'?"],
        ),
        ("[shops.s1]\nseverity = 'loud'\n", 2, ["key 'severity' in [shops.s1]"]),
        ("[default]\nunassigned_min = 5\n", 1, ["unknown key 'default'", "'defaults'"]),
        ("shops = 3\n", 1, ["[shops] must be a table"]),
        ("[shops]\ns1 = 3\n", 2, ["[shops.s1] must be a table"]),
        ("[shops.'a b']\nunassigned_min = 5\n", 1, ["shop id 'a b'"]),
        (
            '[defaults]\nfollowup_text = """\nunassigned_min = 1\n"""\nunassigned_min = "x"\n',
            5,
            ["'unassigned_min'"],
        ),
    ],
)
def test_bad_values_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {line}: "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "where", "fragments"),
    [
        (
            "[defaults]\nunassigned_min = 5\nstale_position 5\n",
            "line 3, column 16",
            ["'stale_position'"],
        ),
        ("[defaults]\nunassigned_min = 5\nunassigned_min = 6\n", "line 3", ["'unassigned_min'"]),
        ("[defaults\nunassigned_min = 5\n", "line 1", ["invalid TOML"]),
        ("[defaults]\neta_slip_min = 5 min\n", "line 2", ["'eta_slip_min'"]),
    ],
)
def test_syntax_errors_name_the_line_and_key(
    tmp_path: Path, text: str, where: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path} {where}"), message
    assert "invalid TOML" in message
    for fragment in fragments:
        assert fragment in message, message


def test_parse_rules_names_the_given_file() -> None:
    with pytest.raises(ConfigError, match=r"^rules\.toml line 2: key 'unassigned_min'"):
        parse_rules("[defaults]\nunassigned_min = 'ten'\n")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_rules(tmp_path / "nope.toml")
    binary = tmp_path / "rules.toml"
    binary.write_bytes(b"[defaults]\nfollowup_text = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_rules(binary)
