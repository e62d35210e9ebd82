"""``bloomwire bench all``: each step recorded under its key with its own command; a failing step
is reported and the rest still run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bloomwire.app.bench import suite
from bloomwire.app.bench.report import Report
from bloomwire.runtime.settings import Settings


def _report(name: str) -> list[Report]:
    table = Report(name)
    table.add("figure", 1)
    return [table]


def _broken(settings: Settings, console: Console) -> list[Report]:
    raise RuntimeError("no browser here")


def test_steps_are_recorded_in_turn_and_a_failure_spares_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded: list[tuple[str, str, str]] = []

    def fake_record(key: str, reports: list[Report], *, command: str, **_: Any) -> list[Path]:
        recorded.append((key, command, reports[0].title))
        return [tmp_path / "performance.md"]

    steps = (
        suite.Step("one", "bloomwire bench one", lambda s, c: _report("first")),
        suite.Step("two", "bloomwire bench two", _broken),
        suite.Step("three", "bloomwire bench three", lambda s, c: _report("third")),
        suite.Step("four", "bloomwire bench four", lambda s, c: _report("fourth")),
    )
    monkeypatch.setattr(suite, "STEPS", steps)
    monkeypatch.setattr(suite, "record", fake_record)
    out = suite.main(Settings(data_dir=tmp_path), Console(file=None, quiet=True), skip=["four"])
    assert recorded == [("one", "bloomwire bench one", "first"), ("three", "bloomwire bench three", "third")]
    assert [r[0] for r in out.rows] == ["one", "two", "three"]
    assert out.rows[1][2] == "failed: no browser here"
    recorded.clear()
    suite.main(Settings(data_dir=tmp_path), Console(quiet=True), only=["three"])
    assert recorded == [("three", "bloomwire bench three", "third")]


def test_every_real_step_has_a_block_to_write_into() -> None:
    root = Path(__file__).resolve().parents[1]
    docs = "".join(p.read_text(encoding="utf-8") for p in [root / "README.md", *(root / "docs").glob("*.md")])
    missing = [s.key for s in suite.STEPS if f"<!-- measured:{s.key} -->" not in docs]
    assert missing == []


def test_an_unknown_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no bench step nope"):
        suite.main(Settings(data_dir=tmp_path), Console(quiet=True), only=["nope"])
