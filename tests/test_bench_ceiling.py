"""The broker's QoS 1 ceiling (``bench ingest`` and ``bench peak``): parallel publishers, every
message checked, run after run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloomwire.app.bench import private_stack
from bloomwire.app.bench.ingest import CEILING_PUBLISHERS, ceiling_users, measure_ceiling
from bloomwire.app.bench.peak_ceiling import LINES_PER_PUBLISHER, Ceiling, publishers_for
from bloomwire.runtime.settings import Settings


def test_no_publisher_is_fed_more_lines_than_mosquitto_pub_reads() -> None:
    assert publishers_for(200_000, 4, CEILING_PUBLISHERS) == 4
    assert publishers_for(300_000, 4, CEILING_PUBLISHERS) * LINES_PER_PUBLISHER >= 300_000
    assert publishers_for(100_000, 1, 2) == 2
    assert LINES_PER_PUBLISHER < 65_535
    with pytest.raises(ValueError, match="publishers"):
        publishers_for(CEILING_PUBLISHERS * LINES_PER_PUBLISHER + 1, 4, CEILING_PUBLISHERS)


def test_a_run_in_which_a_message_was_lost_does_not_count() -> None:
    ceiling = Ceiling(2, 1000, rates=[900.0, 1500.0, 1100.0], delivered=[1000, 999, 1000])
    assert ceiling.median == 1000.0
    d = ceiling.as_dict()
    assert (d["spread_per_s"], d["arrived"], d["sent"], d["per_s"]) == ([900, 1100], 999, 1000, 1000)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ceiling_counts_every_message_of_every_run(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    with private_stack(settings, ceiling_users(), name="ceiling-test") as (live, _tmp):
        ceiling = measure_ceiling(live, messages=3_000, publishers=3, runs=2)
    assert ceiling is not None
    assert ceiling.publishers == 3
    assert ceiling.delivered == [3_000, 3_000]
    assert all(r > 0 for r in ceiling.rates)
    assert min(ceiling.rates) <= ceiling.median <= max(ceiling.rates)
