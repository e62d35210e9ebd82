"""``bloomwire bench peak`` end to end on a tiny day: the four rows, and nothing lost at that load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROWS = {"connection_stability", "latency", "concurrency", "reliability"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_peak_reports_the_four_rows_and_loses_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    out_json = tmp_path / "peak.json"
    tiny = ["--shops", "2", "--riders", "4", "--customers", "6", "--ws-share", "0.5", "--duration", "12"]
    done = subprocess.run(
        [sys.executable, "-m", "bloomwire", "bench", "peak", *tiny, "--json", str(out_json)],
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    result = json.loads(out_json.read_text())
    [peak] = result["windows"]
    assert peak["window"] == "peak"
    assert set(peak["rows"]) == ROWS
    rel = peak["rows"]["reliability"]
    # 4 riders x ~3 positions to their customers, plus the shops' chat lines to customers and riders
    assert rel["expected"] > 10
    assert rel["delivered"] == rel["expected"]
    assert rel["stored"] == rel["sent"] > 0
    assert rel["lost"] == 0
    assert rel["duplicated"] == 0
    latency = peak["rows"]["latency"]
    assert latency["rider_to_customer_ms"]["n"] > 0
    assert latency["rider_to_stored_ms"]["n"] > 0
    assert latency["shop_command_to_rider_inbox_ms"]["n"] > 0
    assert (
        peak["rows"]["connection_stability"]["clients"] == 1 + 2 + 4 + 6
    )  # operator, shops, riders, customers
    assert {"broker", "persister", "dispatch", "alerts", "provisioner", "web", "load generator"} <= set(
        peak["processes"]
    )
    assert "connection stability" in done.stdout.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_peak_faults_get_a_column_each_and_everyone_comes_back(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
    env["BLOOMWIRE_DATA_DIR"] = str(tmp_path / "var")
    out_json = tmp_path / "peak.json"
    tiny = ["--shops", "1", "--riders", "3", "--customers", "4", "--ws-share", "0.5", "--duration", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "bloomwire", "bench", "peak", *tiny, "--faults", "--json", str(out_json)],
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=290,
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    windows = {w["window"]: w for w in json.loads(out_json.read_text())["windows"]}
    assert set(windows) == {
        "peak",
        "broker kill -9",
        "persister kill -9",
        "database unwritable (chmod + exclusive lock)",
    }
    for w in windows.values():
        assert set(w["rows"]) == ROWS
    broker = windows["broker kill -9"]
    stability = broker["rows"]["connection_stability"]
    assert stability["dropped_clients"] == stability["clients"] == 1 + 1 + 3 + 4
    assert stability["reconnected"] == stability["dropped_clients"]
    assert broker["recovery_s"] is not None
    assert windows["persister kill -9"]["recovery_s"] is not None
    assert windows["persister kill -9"]["processes"]["persister"]["pids"] == 2  # killed, started again
    database = windows["database unwritable (chmod + exclusive lock)"]["rows"]["reliability"]
    assert database["stored"] == database["sent"] > 0  # the positions sent meanwhile, stored after
