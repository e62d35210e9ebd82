"""``bloomwire demo`` end to end, as CI runs it: no TTY, a short day, a clean exit, nothing left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
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
    assert re.search(r"photos \d+/\d+ delivered orders with a delivery photo", text), text
    assert re.search(r"publish→canonical P50 \d+ ms · P99 \d+ ms", text), text
    assert "Stopped cleanly" in text
    assert "Traceback" not in out
    # The web pages: the dashboard's address and login, and a few customers' tracking links.
    assert re.search(r"shop dashboard: http://\S+/shop \(login \S+, password \S+\)", text), text
    assert re.search(r"tracking link of order \S+: http://\S+/track#s=\S+&u=cust%40", text), text
    # Without a terminal the live view becomes progress lines.
    assert "orders " in text and "finished" in text
    assert (tmp_path / "var" / "demo" / "bloomwire.db").exists()
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_keep_up_serves_the_pages_until_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    env["COLUMNS"] = "200"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bloomwire",
            "demo",
            "--minutes",
            "0.5",
            "--orders",
            "3",
            "--riders",
            "2",
            "--keep-up",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            lines.append(line)
            if "stack stays up" in line:
                break
        text = "".join(lines)
        found = re.search(r"shop dashboard: (http://\S+/shop)", text.split("stack stays up", 1)[-1])
        assert found, text
        with urllib.request.urlopen(found.group(1), timeout=10) as page:
            assert page.status == 200 and b"Shop dashboard" in page.read()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text + rest
    assert "Bloomwire demo summary" in rest and "Stopped cleanly" in rest
    assert _processes_mentioning(str(tmp_path)) == []
