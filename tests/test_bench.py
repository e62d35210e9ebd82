"""``bloomwire bench ingest`` end to end on a small run: it must count what it claims to count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_ingest_stores_every_event_and_reports_its_figures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bloomwire",
            "bench",
            "ingest",
            "--events",
            "600",
            "--rate",
            "300",
            "--riders",
            "3",
            "--no-ceiling",
        ],
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=170,
    )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    figures = json.loads(out[out.index("{") :])
    assert (figures["stored"], figures["lost"], figures["duplicated"]) == (600, 0, 0)
    assert 0 < figures["canonical_p50_ms"] <= figures["canonical_p99_ms"]
    assert figures["persisted_per_s"] > 0
