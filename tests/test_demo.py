"""``bloomwire demo`` end to end, as CI runs it: no TTY, a short day, a clean exit, nothing left running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    env["COLUMNS"] = "200"
    done = subprocess.run(
        [sys.executable, "-m", "bloomwire", "demo", "--minutes", "1", "--orders", "5", "--riders", "3"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=280,
        check=False,
    )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    text = " ".join(re.sub("[│┃┌┐└┘─┬┴├┤┼]", " ", out).split())  # table borders out of the way
    assert "with access control" in text  # every client kept to its own topics
    assert "Bloomwire demo summary" in text
    assert re.search(r"LOST 0\b", text), text
    assert "stored twice 0" in text
    assert re.search(r"orders 5: delivered \d+ · failed \d+", text), text
    assert "5/5 orders ended as seed 7 planned" in text
    assert re.search(r"publish→canonical P50 \d+ ms · P99 \d+ ms", text), text
    assert "Stopped cleanly" in text
    assert "Traceback" not in out
    # Without a terminal the live view becomes progress lines.
    assert "orders " in text and "finished" in text
    assert (tmp_path / "var" / "demo" / "bloomwire.db").exists()
    assert _processes_mentioning(str(tmp_path)) == []
