"""``bloomwire bench mqtt-clients`` on a small run, and its mqtt5 prototype against a real broker.

The benchmark's figures are only worth something if every client really carried every event:
the runs must count all of them, and the prototype must hand over every byte it was sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bloomwire.app.bench import mqttclients
from bloomwire.app.bench.mqtt5link import Mqtt5Link
from bloomwire.runtime.broker import Mosquitto

EVENTS = 400


@pytest.mark.timeout(180)
def test_every_client_carries_every_event_through_the_pipeline() -> None:
    runs = mqttclients.run_all(mqttclients.CLIENT_COMMANDS, events=EVENTS, runs=1, persist_us=50)
    assert sorted(r.client for r in runs) == ["mqtt5", "paho", "tuned"]
    for run in runs:
        assert run.events == EVENTS, run  # received; the child waits for every republish's PUBACK
        assert 1 <= run.batches <= EVENTS
        assert run.cpu_s > 0 and run.wall_s > 0
    table = mqttclients.summary(runs)
    assert [row[0] for row in table.rows] == [r.client for r in runs]
    assert next(row for row in table.rows if row[0] == "tuned")[3] == "1.00×"


async def _link(broker: Mosquitto, user: str) -> Mqtt5Link:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(Mqtt5Link, broker.host, broker.port)
    await link.connect(user, broker.users[user], session_expiry_s=60)
    return link


@pytest.mark.timeout(60)
def test_the_mqtt5_prototype_delivers_what_was_published_byte_for_byte(tmp_path: Path) -> None:
    users = {"reader": "pw-reader", "writer": "pw-writer"}
    sent = [f"event {k}".encode() for k in range(2000)]
    sent.insert(1000, bytes(range(256)) * 800)  # 200 KiB: spans several reads

    async def body(broker: Mosquitto) -> None:
        reader, writer = await _link(broker, "reader"), await _link(broker, "writer")
        await reader.subscribe("t/in")
        writer.republish("t/in", sent)
        writer.flush()
        got: list[bytes] = []
        while len(got) < len(sent):
            got += await asyncio.wait_for(reader.next_batch(500), 10)
            reader.ack()
        await asyncio.wait_for(writer.drained(), 10)
        assert got == sent, "lost, reordered or altered"
        assert writer.refused == 0
        await reader.disconnect()
        again = await _link(broker, "reader")  # same persistent session: everything was acked
        writer.republish("t/in", [b"after"])
        writer.flush()
        assert await asyncio.wait_for(again.next_batch(10), 10) == [b"after"]
        await again.disconnect()
        await writer.disconnect()

    with Mosquitto(tmp_path / "broker", users=users) as broker:
        asyncio.run(body(broker))
