"""``bench web --connections``: the fleet's packet reader, and a small fleet through the real
web service counting every message it was sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloomwire.app.bench import wsfleet
from bloomwire.runtime.settings import Settings


def _publish(topic: str, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    return b"\x30" + wsfleet._varint(len(body)) + body


def test_packets_split_across_and_within_frames() -> None:
    big = _publish("bench/ws/1", b"y" * 300)  # a two-byte remaining length
    stream = _publish("bench/ws/0", b"1.5") + big + b"\x20\x02\x00\x00"
    buf = bytearray()
    got: list[tuple[int, bytes]] = []
    # A frame may end anywhere, even inside a remaining length.
    for lo, hi in ((0, 1), (1, 4), (4, 200), (200, len(stream))):
        buf += stream[lo:hi]
        got += wsfleet.split_packets(buf)
    assert [first for first, _ in got] == [0x30, 0x30, 0x20]
    assert got[0][1].endswith(b"1.5") and got[1][1].endswith(b"y" * 300)
    assert buf == bytearray()


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_a_small_fleet_gets_every_message_through_the_web_service(tmp_path: Path) -> None:
    figures = wsfleet.run(Settings(data_dir=tmp_path / "var"), connections=20, seconds=5.0)
    assert figures.held == 20
    assert figures.expected == 20 and figures.delivered == 20 and figures.dropped == 0
    assert 0 < figures.p50_ms <= figures.p99_ms <= figures.max_ms
    assert figures.web_kb_per_conn > 0
