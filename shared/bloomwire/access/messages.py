"""Payloads of the customer-access flow (CloudEvents, structured mode, like DESIGN.md §2).

* ``customer.access`` on ``shops/S/orders/O/access`` (RETAINED, QoS 1, shop S only): the order's
  first device login, published by the provisioner when the order is created and cleared
  (empty retained payload) when the access is revoked.
* ``customer.device_requested`` on ``customers/C/devices``: a device of customer C, logged in
  with any login of the order, asks for a login of its own (enrolment).
* ``customer.device`` on ``customers/C/inbox/devices``: the answer (a login, or why not).

Move these models into :mod:`bloomwire.events` when integrating.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from bloomwire.events import _Envelope

Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerEndpoint(_Data):
    """Where a customer device connects (as the provisioner knows it)."""

    host: str
    port: int = Field(ge=1, le=65535)
    ws_port: int | None = Field(default=None, ge=1, le=65535)
    tls: bool = False


class CustomerAccess(_Data):
    """The tracking access of one order, for the shop to hand to its customer."""

    shop: Id
    order: Id
    customer: Id
    username: Id
    password: str = Field(repr=False)
    #: Exactly these topics may be subscribed to (and are delivered).
    topics: list[str]
    #: Publish a ``customer.device_requested`` here to get a login per device ...
    enrol_topic: str
    #: ... and read the answer here (``customers/C/inbox/devices``).
    reply_topic: str
    max_devices: int
    broker: BrokerEndpoint | None = None


class CustomerAccessEvent(_Envelope):
    type: Literal["customer.access"] = "customer.access"
    data: CustomerAccess


class DeviceRequest(_Data):
    """Nothing to say: the topic names the customer, the login proves it."""

    label: Annotated[str, StringConstraints(max_length=100)] = ""


class DeviceRequestEvent(_Envelope):
    type: Literal["customer.device_requested"] = "customer.device_requested"
    data: DeviceRequest = DeviceRequest()


class DeviceLogin(_Data):
    """The answer to a device request: its ``id``, then a login or the reason for none."""

    request: EventId
    username: Id | None = None
    password: str | None = Field(default=None, repr=False)
    error: str | None = None


class DeviceLoginEvent(_Envelope):
    type: Literal["customer.device"] = "customer.device"
    data: DeviceLogin


def encode(event: _Envelope) -> bytes:
    """UTF-8 JSON, no nulls."""
    return event.model_dump_json(exclude_none=True).encode("utf-8")
