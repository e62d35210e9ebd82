"""Amendments in access-control mode (issue 18): the customer's login, minted by the provisioner
before the change, keeps working and sees the order with its new values (the whole stack under
``Stack(settings, access=True)``, as ``bloomwire up`` runs it)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from test_access_stack import MakeClient, _create, _drain, _requirements, _until

from bloomwire.app.supervisor import Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.settings import Settings


def test_a_customer_login_minted_before_an_amendment_sees_the_new_values(
    tmp_path: Path, mqtt_client: MakeClient
) -> None:
    _requirements()
    settings = Settings(data_dir=tmp_path, broker_port=0, broker_ws_port=0, database_url="")
    stack = Stack(settings, access=True, shops=["s1"], riders=["r1"])
    try:
        stack.start(timeout=40)
        assert stack.broker is not None
        shop = mqtt_client("s1", (tmp_path / "secrets" / "s1").read_text().strip(), broker=stack.broker)
        shop.subscribe(topics.shop_filter("s1"))
        order = "o-amend"
        _create(shop, order)
        access_topic = topics.access_topic("s1", order)
        access = ev.CustomerAccessGrantedEvent.model_validate_json(
            _until(shop, lambda t, p: t == access_topic and bool(p))
        ).data
        state_topic = topics.order_topic("s1", order, topics.OrderChannel.STATE)
        customer = mqtt_client(access.username, access.password, broker=stack.broker)
        for f in access.topics:
            customer.subscribe(f)
        state = ev.OrderState.model_validate_json(_until(customer, lambda t, _p: t == state_topic))

        new_end = state.window.end + timedelta(hours=1)
        amend = ev.OrderAmendEvent(
            source="shops/s1",
            data=ev.OrderAmendment(
                order=order,
                window_end=new_end,
                address="Lindenallee 4",
                lat=52.53,
                lon=13.41,
                asked_by="customer",
                reason="at her sister's",
            ),
        )
        shop.publish(topics.shop_command("s1", topics.Command.AMEND_ORDER), ev.encode(amend), qos=1)
        status_topic = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
        told = ev.decode(_until(customer, lambda t, p: t == status_topic and amend.id.encode() in p))
        assert isinstance(told, ev.OrderAmendedEvent)
        assert told.data.changes[ev.AmendField.ADDRESS].new == "Lindenallee 4"

        def amended(t: str, p: bytes) -> bool:
            return t == state_topic and ev.OrderState.model_validate_json(p).last_amendment is not None

        state = ev.OrderState.model_validate_json(_until(customer, amended))
        assert state.window.end == new_end
        assert state.destination == ev.Place(lat=52.53, lon=13.41, address="Lindenallee 4")

        # The same login, connecting again, still gets the order (the provisioner revoked nothing).
        customer.disconnect()
        again = mqtt_client(access.username, access.password, broker=stack.broker)
        again.subscribe(state_topic)
        state = ev.OrderState.model_validate_json(_until(again, lambda t, _p: t == state_topic))
        assert (state.window.end, state.last_amendment and state.last_amendment.reason) == (
            new_end,
            "at her sister's",
        )
        assert not [p for t, p in _drain(shop, 0.5) if t == access_topic and not p], "access not cleared"
    finally:
        stack.stop()
