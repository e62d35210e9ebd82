"""Proof of delivery (issue 16): the handover code and the delivery photo, in the persister.

Desk tests (the projector over a real store) for what is accepted and refused; the tests
through a real broker (and the alerts service, and the web service) are in test_proof_stack.py.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine
from test_persister import (
    SHOP,
    Clock,
    Desk,
    Msg,
    accepted_order,
    acked_ids,
    count,
    payloads,
    raw,
    refusals,
    rows,
    status,
)

from bloomwire.app.clients.base import UsageError
from bloomwire.app.clients.outbox import Outbox
from bloomwire.app.clients.rider import photo_event, sample_photo
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.contract.photo import MAX_PHOTO_BYTES, check_photo
from bloomwire.errors import PayloadError
from bloomwire.services.persister.projector import Projector
from bloomwire.store import open_store
from bloomwire.store.models import DEAD_LETTERS, EVENTS, ORDERS
from bloomwire.store.photos import FilePhotoStore


class ProofDesk(Desk):
    """A desk whose projector keeps photos under ``root``."""

    def __init__(self, engine: Engine, clock: Clock, root: Path) -> None:
        self.photos = FilePhotoStore(root)
        super().__init__(engine, clock)

    def _start(self) -> Projector:
        projector = Projector(self.engine, clock=self.clock, photos=self.photos)
        projector.load()
        return projector


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    store = open_store(database_url)
    yield store
    store.dispose()


@pytest.fixture
def desk(engine: Engine, tmp_path: Path) -> Iterator[ProofDesk]:
    d = ProofDesk(engine, Clock(), tmp_path / "photos")
    yield d
    d.projector.close()


def image(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), colour: str = "red") -> bytes:
    """A small real image."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def photo(rider: str, order: str, data: bytes) -> Msg:
    """A rider's photo on ``riders/R/orders/O/photo``, with the id the backbone derives."""
    return raw(
        topics.rider_order_photo(rider, order),
        data,
        ev.photo_event_id(rider, order, hashlib.sha256(data).hexdigest()),
    )


def deliver(rider: str, order: str, code: str | None = None) -> Msg:
    data = ev.OrderStatusChanged(order=order, status=OrderStatus.DELIVERED, code=code)
    event = ev.OrderStatusChangedEvent(source=f"riders/{rider}", data=data)
    return Msg(topics.rider_order_status(rider, order), ev.encode(event), event.id)


def arrived(order: str, rider: str, *, required: bool) -> list[Msg]:
    """``order`` created (code required or not), accepted, picked up and at the door."""
    msgs = accepted_order(SHOP, order, rider)
    create = ev.decode(msgs[0].payload)
    assert isinstance(create, ev.OrderCreateEvent)
    data = create.data.model_copy(update={"handover_code_required": required})
    first = create.model_copy(update={"data": data})
    msgs[0] = Msg(msgs[0].topic, ev.encode(first), first.id)
    return [*msgs, status(rider, order, "picked_up"), status(rider, order, "arrived")]


def the_code(engine: Engine, order: str) -> str:
    [row] = rows(engine, ORDERS, ORDERS.c.id == order)
    code = row["handover_code"]
    assert isinstance(code, str) and len(code) == 4 and code.isdigit()
    return code


def test_every_order_gets_a_code_its_customer_and_shop_see(desk: ProofDesk, engine: Engine) -> None:
    r = desk.ok(arrived("o1", "r1", required=True)[0])
    code = the_code(engine, "o1")
    [state] = payloads(r, topics.order_topic(SHOP, "o1", "state"))
    assert (state["handover_code"], state["handover_code_required"]) == (code, True)
    desk.ok(arrived("o2", "r1", required=False)[0])
    codes = {the_code(engine, o) for o in ("o1", "o2")}
    assert len(codes) in (1, 2)  # random, not derived from the id
    assert not any(code in o.payload.decode() for o in r.outbound if o.topic.startswith("riders/"))


def test_a_required_code_refuses_a_wrong_one_and_takes_the_right_one(desk: ProofDesk, engine: Engine) -> None:
    desk.ok_each(arrived("o1", "r1", required=True))
    code = the_code(engine, "o1")
    wrong = "0000" if code != "0000" else "1111"
    for attempt, sent in enumerate((wrong, None), start=1):
        r = desk.send(deliver("r1", "o1", sent))
        assert r.refused == 1
        [reason] = refusals(r)
        assert reason.startswith("handover_code:") and f"wrong attempts: {attempt}" in reason
        assert payloads(r, topics.rider_inbox("r1", "errors")), "the rider is told"
        assert payloads(r, topics.shop_errors(SHOP)), "the shop is told"
    [row] = rows(engine, ORDERS, ORDERS.c.id == "o1")
    assert (row["status"], row["handover_failures"]) == ("arrived", 2)
    assert count(engine, DEAD_LETTERS) == 2
    msg = deliver("r1", "o1", code)
    r = desk.ok(msg)
    assert acked_ids(r, topics.rider_inbox("r1", "acks")) == [msg.id]
    [published] = payloads(r, topics.order_topic(SHOP, "o1", "status"))
    assert published["data"]["status"] == "delivered" and "code" not in published["data"]


def test_a_code_not_required_is_not_asked_for(desk: ProofDesk, engine: Engine) -> None:
    desk.ok_each([*arrived("o1", "r1", required=False), deliver("r1", "o1")])
    assert rows(engine, ORDERS, ORDERS.c.id == "o1")[0]["status"] == "delivered"


def test_a_photo_is_checked_stored_by_content_and_referenced(desk: ProofDesk, engine: Engine) -> None:
    desk.ok_each(arrived("o1", "r1", required=False))
    data = image("PNG")
    msg = photo("r1", "o1", data)
    r = desk.ok(msg)
    assert acked_ids(r, topics.rider_inbox("r1", "acks")) == [msg.id]
    [fact] = payloads(r, topics.order_topic(SHOP, "o1", "status"))
    ref = fact["data"]["photo"]
    assert fact["type"] == "order.photo_attached" and ref["content_type"] == "image/png"
    assert desk.photos.get(ref["sha256"]) == data
    [state] = payloads(r, topics.order_topic(SHOP, "o1", "state"))
    assert state["photo"] == ref
    r = desk.send(msg)  # a re-send, later: the same event, acknowledged again
    assert (r.duplicates, r.refused) == (1, 0) and acked_ids(r, topics.rider_inbox("r1", "acks")) == [msg.id]
    desk.ok(deliver("r1", "o1"))
    assert rows(engine, ORDERS, ORDERS.c.id == "o1")[0]["photo"] == ref
    assert count(engine, EVENTS, EVENTS.c.type == "order.photo_attached") == 1


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"Roses are red, this is not a JPEG\n", "not an image"),
        (image("GIF"), "send a JPEG or PNG"),
        (image(size=(8, 8)), "width is 8 px"),
        (b"\xff\xd8\xff" + b"x" * (MAX_PHOTO_BYTES + 1), f"max {MAX_PHOTO_BYTES}"),
        (image()[:300], "damaged"),
    ],
)
def test_a_bad_photo_is_refused_and_the_delivery_is_not_lost(
    desk: ProofDesk, engine: Engine, payload: bytes, why: str
) -> None:
    desk.ok_each(arrived("o1", "r1", required=False))
    msg = photo("r1", "o1", payload)
    r = desk.send(msg)
    assert r.refused == 1 and why in refusals(r)[0], refusals(r)
    [told] = payloads(r, topics.rider_inbox("r1", "errors"))
    assert told["id"] == msg.id, "the device knows which photo was refused"
    [dead] = rows(engine, DEAD_LETTERS)
    assert dead["payload"].startswith("base64:") or dead["payload"].startswith("Roses")
    desk.ok(deliver("r1", "o1"))
    assert rows(engine, ORDERS, ORDERS.c.id == "o1")[0]["status"] == "delivered"


def test_only_the_orders_rider_sends_its_photo(desk: ProofDesk) -> None:
    desk.ok_each(arrived("o1", "r1", required=False))
    r = desk.send(photo("r2", "o1", image()))
    assert r.refused == 1 and "not assigned to rider 'r2'" in refusals(r)[0]


def test_the_riders_outbox_keeps_a_photo_until_acked(tmp_path: Path) -> None:
    data = sample_photo("o1")
    out = photo_event("r1", "o1", data)
    assert (out.kind, out.topic) == ("photo", topics.rider_order_photo("r1", "o1"))
    assert out.id == ev.photo_event_id("r1", "o1", hashlib.sha256(data).hexdigest())
    box = Outbox(tmp_path / "outbox.db")
    try:
        box.add(out.id, out.kind, out.topic, out.payload)
        [kept] = box.pending()
        assert kept.payload == data
        assert [e.id for e in box.ack([out.id])] == [out.id]
    finally:
        box.close()
    with pytest.raises(UsageError, match="not an image"):
        photo_event("r1", "o1", b"not a photo")


def test_check_photo_names_what_it_is() -> None:
    ref = check_photo(image("JPEG", (320, 200)))
    assert (ref.content_type, ref.width, ref.height) == ("image/jpeg", 320, 200)
    with pytest.raises(PayloadError, match="empty"):
        check_photo(b"")
