"""The broker's QoS 1 ceiling of ``bench ingest``: parallel publishers, every message counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloomwire.app.bench import private_stack
from bloomwire.app.bench.ingest import (
    LINES_PER_PUBLISHER,
    MAX_PUBLISHERS,
    ceiling_users,
    measure_ceiling,
    publishers_for,
)
from bloomwire.runtime.settings import Settings


def test_no_publisher_is_fed_more_lines_than_mosquitto_pub_reads() -> None:
    assert publishers_for(200_000, 4) == 4
    assert publishers_for(300_000, 4) * LINES_PER_PUBLISHER >= 300_000
    assert LINES_PER_PUBLISHER < 65_535
    with pytest.raises(ValueError, match="publishers"):
        publishers_for(MAX_PUBLISHERS * LINES_PER_PUBLISHER + 1, 4)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ceiling_counts_every_message_of_every_run(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    with private_stack(settings, ceiling_users(), name="ceiling-test") as (live, tmp):
        ceiling = measure_ceiling(live, tmp, messages=3_000, publishers=3, runs=2)
    assert ceiling.publishers == 3
    assert ceiling.delivered == [3_000, 3_000]
    assert all(r > 0 for r in ceiling.rates)
    assert min(ceiling.rates) <= ceiling.median <= max(ceiling.rates)
