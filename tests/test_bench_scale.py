"""``bloomwire bench scale``: each column measures what it names, on a small step."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bloomwire.app.bench import scale


@given(k=st.floats(min_value=0.25, max_value=3.0), c=st.floats(min_value=1e-3, max_value=1e3))
@example(k=1.0, c=1.0)
@example(k=2.0, c=0.5)
def test_exponent_recovers_the_power_of_a_power_law(k: float, c: float) -> None:
    points = [(n, c * n**k) for n in (1_000.0, 10_000.0, 100_000.0)]
    assert scale.exponent(points) == pytest.approx(k, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_step_measures_every_column_over_the_seeded_store(tmp_path: Path) -> None:
    said: list[str] = []
    now = datetime.now(UTC).replace(microsecond=0)
    step = scale.measure(200, tmp_path, now, postgres=None, say=said.append)
    # 100 created (1 event), 100 en route (5), 200 delivered history (7).
    assert step.events == 100 * 1 + 100 * 5 + 200 * 7
    assert (step.alerts, step.riders) == (40, 50)
    # Every order's retained state and every rider's, held by the broker and counted back.
    assert step.snapshots > 200
    assert step.retained == step.snapshots
    assert step.dispatch_waiting == 100
    assert step.startup_s > 0 and step.alert_tick_ms > 0 and step.dispatch_round_ms > 0
    assert step.memory_per_order_b > 0 and step.sqlite_bytes_per_event > 0
    assert step.postgres_bytes_per_event is None
    assert any("dispatch round" in m for m in said)
    table = scale.report([step, step])
    assert table.rows[-1][0] == "growth exponent"
