"""Figures in the docs are written by the command that measured them (``--record KEY``)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bloomwire.app.bench.report import Report, command_line, record
from bloomwire.errors import BloomwireError

NOW = datetime(2026, 12, 3, 9, 30, tzinfo=UTC)


def _repo(tmp_path: Path, readme: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


def test_record_replaces_only_its_block_and_says_where_and_when(tmp_path: Path) -> None:
    root = _repo(
        tmp_path,
        "# Figures\n<!-- measured:ingest -->\nold, typed by hand\n<!-- /measured:ingest -->\n"
        "<!-- measured:other -->\nuntouched\n<!-- /measured:other -->\n",
    )
    (root / "docs" / "performance.md").write_text(
        "x\n<!-- measured:ingest -->\n<!-- /measured:ingest -->\ny\n", encoding="utf-8"
    )
    table = Report("Bloomwire ingest benchmark")
    table.add("persisted (ev/s)", 4992)
    table.add("a | in a cell", "x")
    written = record("ingest", [table], command="bloomwire bench ingest --rate 5000", root=root, now=NOW)
    assert written == [root / "README.md", root / "docs" / "performance.md"]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "old, typed by hand" not in readme
    assert "untouched" in readme
    assert "Measured by `bloomwire bench ingest --rate 5000` on 2026-12-03 09:30 UTC, commit" in readme
    assert "| persisted (ev/s) | 4992 |" in readme
    assert "cores, load average" in readme and " ms" in readme.split("anchor", 1)[1].splitlines()[0]
    assert "| a \\| in a cell | x |" in readme
    assert "| persisted (ev/s) | 4992 |" in (root / "docs" / "performance.md").read_text(encoding="utf-8")


def test_record_without_markers_says_where_to_put_them(tmp_path: Path) -> None:
    root = _repo(tmp_path, "# no markers here\n")
    with pytest.raises(BloomwireError, match=r"<!-- measured:ingest -->"):
        record("ingest", [Report("t")], command="bloomwire bench ingest", root=root, now=NOW)
    with pytest.raises(BloomwireError, match="lower-case"):
        record("Bad Key", [Report("t")], command="x", root=root)


def test_command_line_drops_the_record_option() -> None:
    assert command_line(["bench", "ingest", "--record", "k", "--rate", "0"]) == (
        "bloomwire bench ingest --rate 0"
    )
    assert command_line(["bench", "ingest", "--record=k"]) == "bloomwire bench ingest"
