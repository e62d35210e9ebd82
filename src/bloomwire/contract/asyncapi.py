"""The AsyncAPI 3.0 document and the topic table of the contract, built from the code.

Channel addresses come from the builders of :mod:`bloomwire.contract.topics`, payload schemas from the
pydantic models of :mod:`bloomwire.contract.events`; only who sends what where is stated here, in
:data:`CHANNELS`. ``docs/asyncapi.yaml`` and ``docs/topics.md`` are this module's output
(``python -m bloomwire.contract.asyncapi docs``) and a test keeps them from drifting.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bloomwire import __version__
from bloomwire.contract import events as ev
from bloomwire.contract import topics as t
from bloomwire.contract.topics import Command, Identity, InboundKind, Inbox, OrderChannel

ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
SCHEMA_REF = "#/components/schemas/{model}"

#: Topic-level parameters; every id obeys :func:`bloomwire.contract.topics.check_id`.
PARAMETERS: dict[str, str] = {
    "rider": "Rider id: the rider's MQTT username.",
    "shop": "Shop id: the shop terminal's MQTT username.",
    "order": "Order id, chosen by the shop at creation.",
    "customer": "Customer id of one order (c-<order> by default): its MQTT username in "
    "password-file mode; in access-control mode the order's logins (cust@...) act as it.",
    "service": "Service name (persister, dispatch, alerts, ...).",
    "device": "OwnTracks device name, as configured in the app.",
}
ID_RULE = (
    f"1-{t.MAX_ID_LENGTH} ASCII characters: letters, digits and _ . : @ -, starting with a letter or digit."
)

#: Payloads that are not pydantic models of events.py.
PRESENCE_WORD = "PresenceWord"
OWNTRACKS_LOCATION = "OwnTracksLocation"
OWNTRACKS_LWT = "OwnTracksLwt"
OWNTRACKS_TRANSITION = "OwnTracksTransition"
OWNTRACKS_IGNORED = "OwnTracksIgnored"
#: A rider's delivery photo: the image's bytes (issue 16).
DELIVERY_PHOTO = "DeliveryPhoto"
#: What the backbone does with each OwnTracks subtopic's payloads besides ``event``.
_OWNTRACKS_RETAINED = (
    " Retained as the OwnTracks Recorder has it by default: what the broker replays on "
    "(re)subscription is not used (the persister asks for no replays); a live message the app "
    "publishes retained (its default) is used, neither refused nor cleared."
)

#: Pydantic models of events.py carried by some topic, besides the CloudEvents envelopes.
SNAPSHOT_MODELS: tuple[type[BaseModel], ...] = (
    ev.OrderState,
    ev.OrderLocation,
    ev.RiderState,
    ev.Ack,
    ev.Refusal,
)

ALERT_EVENTS = ("alert.raised", "alert.escalated", "alert.resolved", "alert.acknowledged")

#: What each shop command asks for (the event type comes from ``events.COMMAND_EVENTS``).
_COMMAND_HELP: dict[Command, str] = {
    Command.CREATE_ORDER: "Create an order with its promised delivery window.",
    Command.CANCEL_ORDER: "Cancel an order that is not yet picked up.",
    Command.CHAT: "A chat line from the shop about one of its orders.",
    Command.ASSIGN: "Offer an order to a named rider (manual dispatch).",
    Command.ACK_ALERT: "Acknowledge one of the shop's open alerts.",
    Command.AMEND_ORDER: (
        "Change an order after it is placed (window, address and position, items, note, phone, "
        "alternate contact, instructions); refused with the rule it breaks."
    ),
}
COMMAND_EVENTS: dict[Command, tuple[str, str]] = {
    cmd: (ev.type_name(ev.COMMAND_EVENTS[cmd]), _COMMAND_HELP[cmd]) for cmd in Command
}

#: The decisions a service may publish on ``services/N/events`` (the persister's own table).
SERVICE_EVENTS = tuple(ev.type_name(t) for t in ev.ACCEPTED[(Identity.SERVICE, InboundKind.EVENTS)])


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One topic of the contract, seen from the backbone (persister and services)."""

    key: str
    address: str
    action: Literal["send", "receive"]
    summary: str
    messages: tuple[str, ...]
    publishers: str
    subscribers: str
    qos: int = 1
    retain: bool = False
    #: Described MQTT 5 message expiry, if the publisher sets one.
    expiry: str | None = None
    #: False for the provisioner's customer-access topics (access-control mode only): the
    #: persister neither consumes nor publishes them.
    via_persister: bool = True

    @property
    def parameters(self) -> list[str]:
        """The ``{name}`` placeholders of the address, in order."""
        return re.findall(r"\{(\w+)\}", self.address)


def _addr(build: Callable[..., str], *args: str) -> str:
    """``build(*args)`` with each ``{name}`` argument kept as an AsyncAPI placeholder."""
    marks = {f"P0{a[1:-1]}": a for a in args if a.startswith("{")}
    topic = build(*(f"P0{a[1:-1]}" if a.startswith("{") else a for a in args))
    return "/".join(marks.get(level, level) for level in topic.split("/"))


_RIDER_DEVICE = "rider's device"
_PERSISTER = "persister"
_PROVISIONER = "provisioner (access-control mode)"
_CUSTOMER = "customer client"
_OWNTRACKS_APP = "rider's OwnTracks app"


def _channels() -> tuple[ChannelSpec, ...]:
    inbound = [
        ChannelSpec(
            "riderLocation",
            _addr(t.rider_location, "{rider}"),
            "receive",
            "A rider's position (OwnTracks field names).",
            ("rider.location_reported",),
            _RIDER_DEVICE,
            _PERSISTER,
        ),
        ChannelSpec(
            "riderOrderStatus",
            _addr(t.rider_order_status, "{rider}", "{order}"),
            "receive",
            "A status the rider reports on an order assigned to it, an incident with a new ETA, or "
            "the rider's confirmation of an amendment.",
            ("order.status_changed", "order.incident_reported", "order.amendment_confirm"),
            _RIDER_DEVICE,
            _PERSISTER,
        ),
        ChannelSpec(
            "riderOrderChat",
            _addr(t.rider_order_chat, "{rider}", "{order}"),
            "receive",
            "A chat line from the rider about one of its orders.",
            ("order.chat_posted",),
            _RIDER_DEVICE,
            _PERSISTER,
        ),
        ChannelSpec(
            "riderOrderPhoto",
            _addr(t.rider_order_photo, "{rider}", "{order}"),
            "receive",
            "The rider's delivery photo: a JPEG or PNG as the binary payload (at most 250 KiB, "
            "16 to 4096 px a side), checked, stored by its sha256 and recorded as an "
            "order.photo_attached (id derived from rider, order and sha256); a bad image is "
            "dead-lettered with the reason.",
            (DELIVERY_PHOTO,),
            _RIDER_DEVICE,
            _PERSISTER,
        ),
        ChannelSpec(
            "riderReplies",
            _addr(t.rider_replies, "{rider}"),
            "receive",
            "The rider accepts or declines an offer.",
            ("dispatch.reply",),
            _RIDER_DEVICE,
            _PERSISTER,
        ),
        ChannelSpec(
            "riderPresence",
            _addr(t.rider_presence, "{rider}"),
            "receive",
            "Retained presence: the bare word online/offline (offline is the Last Will) or a "
            "rider.presence_changed event; an empty retained message clears it.",
            ("rider.presence_changed", PRESENCE_WORD),
            _RIDER_DEVICE,
            _PERSISTER,
            retain=True,
        ),
        ChannelSpec(
            "owntracks",
            _addr(t.owntracks, "{rider}", "{device}"),
            "receive",
            "An unmodified OwnTracks app payload: _type location is the rider's position (tst in "
            "epoch seconds, not milliseconds, within event_future_skew_s ahead and event_max_age_s "
            "back); _type lwt, "
            "the app's Last Will, marks the rider offline as a bare offline on its presence topic "
            "does; any other _type is acknowledged as ignored (logged, counted)." + _OWNTRACKS_RETAINED,
            (OWNTRACKS_LOCATION, OWNTRACKS_LWT),
            _OWNTRACKS_APP,
            _PERSISTER,
        ),
        ChannelSpec(
            "owntracksEvent",
            _addr(t.owntracks, "{rider}", "{device}", "event"),
            "receive",
            "An OwnTracks region transition (enter/leave), stored once as a rider.region_changed "
            "event (its id derived from rider, device, tst and event); entering the destination of "
            "an order out for delivery prompts 'arrived?' on the rider's chat inbox.",
            (OWNTRACKS_TRANSITION,),
            _OWNTRACKS_APP,
            _PERSISTER,
        ),
        *(
            ChannelSpec(
                "owntracks" + sub.title(),
                _addr(t.owntracks, "{rider}", "{device}", sub),
                "receive",
                f"What the OwnTracks app publishes on .../{sub}: acknowledged as ignored (one log "
                "line, counted in bloomwire_owntracks_ignored_total); a malformed one is dead-lettered.",
                (OWNTRACKS_IGNORED,),
                _OWNTRACKS_APP,
                _PERSISTER,
            )
            for sub in sorted(t.OWNTRACKS_SUBTOPICS - {"event"})
        ),
        *(
            ChannelSpec(
                "shopCommand" + "".join(w.title() for w in cmd.value.split("-")),
                _addr(t.shop_command, "{shop}", cmd),
                "receive",
                COMMAND_EVENTS[cmd][1],
                (COMMAND_EVENTS[cmd][0],),
                "shop terminal",
                _PERSISTER,
            )
            for cmd in Command
        ),
        ChannelSpec(
            "customerChat",
            _addr(t.customer_chat, "{customer}"),
            "receive",
            "A chat line from the customer about its own order, or its rating once delivered "
            "(1-5 stars, a comment; once).",
            ("order.chat_posted", "order.rate"),
            _CUSTOMER,
            _PERSISTER,
        ),
        ChannelSpec(
            "customerDevices",
            _addr(t.device_request_topic, "{customer}"),
            "receive",
            "Access-control mode: a customer device, logged in with any login of the order, asks "
            "for a login of its own (one username is one MQTT session).",
            ("customer.enrol_device",),
            _CUSTOMER,
            _PROVISIONER,
            via_persister=False,
        ),
        ChannelSpec(
            "serviceEvents",
            _addr(t.service_events, "{service}"),
            "receive",
            "A service's decisions (offers, expired offers, alerts, follow-up chat, notices), "
            "persisted and published canonically like any device event.",
            SERVICE_EVENTS,
            "dispatch, alerts, assistant, notices",
            _PERSISTER,
        ),
    ]
    order = ("{shop}", "{order}")
    refusal = ("Refusal",)
    canonical = [
        ChannelSpec(
            "orderStatus",
            _addr(t.order_topic, *order, OrderChannel.STATUS),
            "send",
            "Every accepted status change of the order (creation, offers, replies, progress, "
            "cancellation), every incident, the delivery photo's reference, the customer's rating, "
            "every amendment (old and new values) and the rider's confirmation of one, and the "
            "notices told to the customer in its language (picked up, on the way, arriving, "
            "delayed, delivered, failed).",
            (
                "order.status_changed",
                "order.incident_reported",
                "order.photo_attached",
                "order.rated",
                "order.amended",
                "order.amendment_confirmed",
                "order.notified",
            ),
            _PERSISTER,
            "shop, customer, services",
        ),
        ChannelSpec(
            "orderLocation",
            _addr(t.order_topic, *order, OrderChannel.LOCATION),
            "send",
            "The carrying rider's position and ETA, only while the order is out for delivery.",
            ("OrderLocation",),
            _PERSISTER,
            "shop, customer",
            qos=0,
            expiry="about a minute: a stale position is worth nothing",
        ),
        ChannelSpec(
            "orderChat",
            _addr(t.order_topic, *order, OrderChannel.CHAT),
            "send",
            "Every accepted chat line about the order, from any party (author filled in).",
            ("order.chat_posted",),
            _PERSISTER,
            "shop, customer",
        ),
        ChannelSpec(
            "orderAlerts",
            _addr(t.order_topic, *order, OrderChannel.ALERTS),
            "send",
            "Alerts about the order: raised, escalated, acknowledged, resolved.",
            ALERT_EVENTS,
            _PERSISTER,
            "shop",
        ),
        ChannelSpec(
            "orderState",
            _addr(t.order_topic, *order, OrderChannel.STATE),
            "send",
            "Retained snapshot: status, rider, promised window, ETA, last position, recent "
            "timeline. A client that subscribes sees the whole order at once.",
            ("OrderState",),
            _PERSISTER,
            "shop, customer",
            retain=True,
        ),
        ChannelSpec(
            "shopAlerts",
            _addr(t.shop_alerts, "{shop}"),
            "send",
            "The shop's alert feed.",
            ALERT_EVENTS,
            _PERSISTER,
            "shop, services",
        ),
        ChannelSpec(
            "shopRiderState",
            _addr(t.shop_rider_state, "{shop}", "{rider}"),
            "send",
            "Retained snapshot of a rider carrying the shop's orders: presence, position, load.",
            ("RiderState",),
            _PERSISTER,
            "shop",
            retain=True,
        ),
        ChannelSpec(
            "shopAcks",
            _addr(t.shop_acks, "{shop}"),
            "send",
            "Ids of the shop's commands committed to the store (a re-sent duplicate too).",
            ("Ack",),
            _PERSISTER,
            "shop",
        ),
        ChannelSpec(
            "shopErrors",
            _addr(t.shop_errors, "{shop}"),
            "send",
            "Why a shop command was refused.",
            refusal,
            _PERSISTER,
            "shop",
        ),
        ChannelSpec(
            "riderInboxOffers",
            _addr(t.rider_inbox, "{rider}", Inbox.OFFERS),
            "send",
            "An offer of an order to this rider (candidates stripped); it expires at its deadline.",
            ("dispatch.offered",),
            _PERSISTER,
            _RIDER_DEVICE,
            expiry="until the offer's deadline",
        ),
        ChannelSpec(
            "riderInboxAcks",
            _addr(t.rider_inbox, "{rider}", Inbox.ACKS),
            "send",
            "Ids of the rider's events committed to the store.",
            ("Ack",),
            _PERSISTER,
            _RIDER_DEVICE,
        ),
        ChannelSpec(
            "riderInboxChat",
            _addr(t.rider_inbox, "{rider}", Inbox.CHAT),
            "send",
            "Chat lines from the shop or customer about the rider's current orders.",
            ("order.chat_posted",),
            _PERSISTER,
            _RIDER_DEVICE,
        ),
        ChannelSpec(
            "riderInboxAmendments",
            _addr(t.rider_inbox, "{rider}", Inbox.AMENDMENTS),
            "send",
            "A change to one of the rider's orders (the customer's numbers left out); after pick-up "
            "an address or instructions change asks the rider to confirm (order.amendment_confirm).",
            ("order.amended",),
            _PERSISTER,
            _RIDER_DEVICE,
        ),
        ChannelSpec(
            "riderInboxErrors",
            _addr(t.rider_inbox, "{rider}", Inbox.ERRORS),
            "send",
            "Why one of the rider's messages was refused.",
            refusal,
            _PERSISTER,
            _RIDER_DEVICE,
        ),
        ChannelSpec(
            "customerInboxAcks",
            _addr(t.customer_inbox, "{customer}", Inbox.ACKS),
            "send",
            "Ids of the customer's events committed to the store.",
            ("Ack",),
            _PERSISTER,
            _CUSTOMER,
        ),
        ChannelSpec(
            "customerInboxErrors",
            _addr(t.customer_inbox, "{customer}", Inbox.ERRORS),
            "send",
            "Why one of the customer's messages was refused.",
            refusal,
            _PERSISTER,
            _CUSTOMER,
        ),
        ChannelSpec(
            "customerInboxDevices",
            _addr(t.device_reply_topic, "{customer}"),
            "send",
            "Access-control mode: the answer to a device request (matched by the request's id), "
            "a login of the device's own or the reason for none.",
            ("customer.enrolment_answered",),
            _PROVISIONER,
            _CUSTOMER,
            via_persister=False,
        ),
        ChannelSpec(
            "orderAccess",
            _addr(t.access_topic, *order),
            "send",
            "Access-control mode: the order's customer access (first login, its topics, where "
            "to enrol devices), for shop S only, published once the order is created; cleared "
            "(empty retained payload) when revoked, at close + grace.",
            ("customer.access_granted",),
            _PROVISIONER,
            "shop",
            retain=True,
            via_persister=False,
        ),
        ChannelSpec(
            "serviceStatus",
            _addr(t.service_status, "{service}"),
            "send",
            "Retained online/offline of each service; offline is its Last Will.",
            (PRESENCE_WORD,),
            "every service; `bloomwire up`'s supervisor when one is in a crash loop",
            "operators, monitoring",
            retain=True,
        ),
        ChannelSpec(
            "deadletter",
            t.DEADLETTER,
            "send",
            "Every refused message with the reason, the refusing service and the payload; the "
            "persister keeps the other services' in the store (its own it stores with its batch).",
            refusal,
            "persister, every service",
            "persister (stores them), operators, monitoring",
        ),
    ]
    return (*inbound, *canonical)


#: Every topic of the contract, inbound (receive) first, then canonical (send).
CHANNELS: tuple[ChannelSpec, ...] = _channels()


# --- document -----------------------------------------------------------------------------------


def _schemas() -> dict[str, Any]:
    models = [
        *ev.EVENT_TYPES.values(),
        *ev.ACCESS_EVENT_TYPES.values(),
        *ev.RECORDED_EVENT_TYPES.values(),  # the stored form of an OwnTracks transition
        *SNAPSHOT_MODELS,
    ]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=SCHEMA_REF)
    schemas: dict[str, Any] = dict(sorted(top["$defs"].items()))
    for cls in (*ev.EVENT_TYPES.values(), *ev.ACCESS_EVENT_TYPES.values()):
        _require_on_wire(schemas[cls.__name__])
    schemas.update(_owntracks_schemas())
    schemas[DELIVERY_PHOTO] = {
        "title": DELIVERY_PHOTO,
        "description": "The bytes of a JPEG or PNG image, not JSON.",
        "type": "string",
        "format": "binary",
    }
    schemas[PRESENCE_WORD] = {
        "title": PRESENCE_WORD,
        "description": "A bare UTF-8 word, not JSON.",
        "type": "string",
        "enum": [t.PRESENCE_ONLINE, t.PRESENCE_OFFLINE],
    }
    return schemas


def _owntracks_schemas() -> dict[str, Any]:
    """The OwnTracks app's own payloads (the booklet's JSON page), as far as the backbone reads them."""
    number = {"type": "number"}
    return {
        OWNTRACKS_LOCATION: {
            "title": OWNTRACKS_LOCATION,
            "description": "An OwnTracks location (any extra field is ignored). Numbers are JSON "
            "numbers and finite; tst is whole epoch seconds.",
            "type": "object",
            "allOf": [{"$ref": SCHEMA_REF.format(model=ev.RiderLocation.__name__)}],
            "properties": {"_type": {"type": "string", "const": "location"}},
            "required": ["_type"],
        },
        OWNTRACKS_LWT: {
            "title": OWNTRACKS_LWT,
            "description": "The app's Last Will; tst is when its lost connection began.",
            "type": "object",
            "properties": {"_type": {"type": "string", "const": "lwt"}, "tst": {"type": "integer"}},
            "required": ["_type"],
        },
        OWNTRACKS_TRANSITION: {
            "title": OWNTRACKS_TRANSITION,
            "description": "A region entered or left; desc (the region's name) naming an order, or "
            "lat/lon near its destination, ties it to that order.",
            "type": "object",
            "properties": {
                "_type": {"type": "string", "const": "transition"},
                "event": {"type": "string", "enum": ["enter", "leave"]},
                "tst": {"type": "integer", "description": "When, in epoch seconds."},
                "wtst": {"type": "integer", "description": "When the region was made."},
                "lat": {**number, "minimum": -90, "maximum": 90},
                "lon": {**number, "minimum": -180, "maximum": 180},
                "acc": {**number, "minimum": 0},
                "desc": {"type": "string", "maxLength": 500},
                "rid": {"type": "string", "maxLength": 100},
                "t": {"type": "string", "maxLength": 10},
            },
            "required": ["_type", "event", "tst", "lat", "lon"],
        },
        OWNTRACKS_IGNORED: {
            "title": OWNTRACKS_IGNORED,
            "description": "Any OwnTracks payload naming its _type; not used by the backbone.",
            "type": "object",
            "properties": {"_type": {"type": "string"}},
            "required": ["_type"],
        },
    }


#: What the envelope schemas say of their fields (the models' defaults serve producers only).
ENVELOPE_FIELD_HELP: dict[str, str] = {
    "id": "Required. The sender's id of this event, its idempotency key: a retry carries the same "
    "id and is stored once. 1-128 ASCII letters, digits and _ . : -, starting with a letter or "
    "digit; a UUID (v7 preferred) is the usual choice.",
    "time": "Required. When it happened, RFC 3339 with a UTC offset. The persister refuses times "
    "more than event_future_skew_s (default 300 s) ahead of its clock or more than event_max_age_s "
    "(default 7 days) old.",
    "source": "The sender, exactly its own topic prefix: riders/{rider}, shops/{shop}, "
    "customers/{customer} or services/{service}; anything else is refused.",
}


def _require_on_wire(schema: dict[str, Any]) -> None:
    """Mark ``id`` and ``time`` of an envelope schema required and describe the envelope fields."""
    props = schema["properties"]
    for name, help_text in ENVELOPE_FIELD_HELP.items():
        props[name]["description"] = help_text
    wanted = {*schema.get("required", ()), *ev.REQUIRED_ON_WIRE}
    schema["required"] = [name for name in props if name in wanted]


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]


def _messages() -> dict[str, Any]:
    messages: dict[str, Any] = {}
    for kind, cls in {**ev.EVENT_TYPES, **ev.ACCESS_EVENT_TYPES}.items():
        data_model = cls.model_fields["data"].annotation
        summary = _first_line(getattr(data_model, "__doc__", None)) or f"A {kind} event."
        messages[kind] = {
            "name": kind,
            "title": cls.__name__,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": SCHEMA_REF.format(model=cls.__name__)},
        }
    for model in SNAPSHOT_MODELS:
        messages[model.__name__] = {
            "name": model.__name__,
            "title": model.__name__,
            "summary": _first_line(model.__doc__),
            "contentType": "application/json",
            "payload": {"$ref": SCHEMA_REF.format(model=model.__name__)},
        }
    for name, summary in (
        (OWNTRACKS_LOCATION, "An unmodified OwnTracks location."),
        (OWNTRACKS_LWT, "The OwnTracks app's Last Will."),
        (OWNTRACKS_TRANSITION, "An OwnTracks region transition (enter/leave)."),
        (OWNTRACKS_IGNORED, "Any other OwnTracks payload (waypoints, cmd, status, ...)."),
    ):
        messages[name] = {
            "name": name,
            "title": name,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": SCHEMA_REF.format(model=name)},
        }
    messages[DELIVERY_PHOTO] = {
        "name": DELIVERY_PHOTO,
        "title": DELIVERY_PHOTO,
        "summary": "A delivery photo: a JPEG or PNG image's bytes.",
        "contentType": "application/octet-stream",
        "payload": {"$ref": SCHEMA_REF.format(model=DELIVERY_PHOTO)},
    }
    messages[PRESENCE_WORD] = {
        "name": PRESENCE_WORD,
        "title": PRESENCE_WORD,
        "summary": "The bare word online or offline (what a Last Will carries).",
        "contentType": "text/plain",
        "payload": {"$ref": SCHEMA_REF.format(model=PRESENCE_WORD)},
    }
    return messages


def _channel(spec: ChannelSpec) -> dict[str, Any]:
    channel: dict[str, Any] = {"address": spec.address, "summary": spec.summary}
    if spec.parameters:
        channel["parameters"] = {
            name: {"description": f"{PARAMETERS[name]} {ID_RULE}"} for name in spec.parameters
        }
    channel["messages"] = {m: {"$ref": f"#/components/messages/{m}"} for m in spec.messages}
    channel["x-published-by"] = spec.publishers
    channel["x-subscribed-by"] = spec.subscribers
    return channel


def _operation(spec: ChannelSpec) -> dict[str, Any]:
    mqtt: dict[str, Any] = {"qos": spec.qos, "retain": spec.retain}
    if spec.expiry:
        mqtt["messageExpiryInterval"] = {
            "type": "integer",
            "minimum": 1,
            "description": f"Seconds: {spec.expiry}.",
        }
    mqtt["bindingVersion"] = MQTT_BINDING_VERSION
    return {
        "action": spec.action,
        "channel": {"$ref": f"#/channels/{spec.key}"},
        "summary": spec.summary,
        "messages": [{"$ref": f"#/channels/{spec.key}/messages/{m}"} for m in spec.messages],
        "bindings": {"mqtt": mqtt},
    }


def operation_id(spec: ChannelSpec) -> str:
    """``receiveRiderLocation``, ``sendOrderState``, ..."""
    return spec.action + spec.key[0].upper() + spec.key[1:]


#: The listen ports ``bloomwire up`` tries first (runtime.settings ``broker_listen_port`` and
#: ``broker_listen_ws_port``; a test checks they agree).
DEFAULT_MQTT_PORT = 18830
DEFAULT_WS_PORT = 19001


def build_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the contract, from the backbone's point of view."""
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Bloomwire",
            "version": __version__,
            "description": (
                "MQTT event backbone for flower-shop delivery. Devices write only under their "
                "own prefix (receive operations); the persister validates, commits, and only "
                "then publishes the canonical topics (send operations). Payloads are UTF-8 JSON "
                "CloudEvents (structured mode) whose `id` is the idempotency key; a refused "
                "message goes to services/deadletter and the sender's errors topic. Generated "
                "by bloomwire.contract.asyncapi from bloomwire.contract.topics and bloomwire.contract.events."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "mosquitto": {
                "host": "{host}:{port}",
                "protocol": "mqtt",
                "protocolVersion": "5",
                "description": "The project's Mosquitto (or any MQTT 5 broker with the same "
                "topics); anonymous access is refused. `bloomwire up` listens on 18830 unless it "
                "was taken at the first start: the ports in use are in DATA_DIR/ports.json, printed "
                "at start and sent in each customer's access message (BLOOMWIRE_PUBLIC_HOST/"
                "_MQTT_PORT override what devices are told).",
                "variables": {
                    "host": {"default": "127.0.0.1"},
                    "port": {"default": str(DEFAULT_MQTT_PORT)},
                },
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            },
            "mosquitto-websockets": {
                "host": "{host}:{port}",
                "protocol": "ws",
                "description": "The same broker over MQTT-over-websockets (19001 by default; "
                "see DATA_DIR/ports.json).",
                "variables": {
                    "host": {"default": "127.0.0.1"},
                    "port": {"default": str(DEFAULT_WS_PORT)},
                },
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            },
        },
        "channels": {spec.key: _channel(spec) for spec in CHANNELS},
        "operations": {operation_id(spec): _operation(spec) for spec in CHANNELS},
        "components": {
            "securitySchemes": {
                "userPassword": {
                    "type": "userPassword",
                    "description": "Each identity logs in with its own MQTT username, which is "
                    "also its client id.",
                }
            },
            "messages": _messages(),
            "schemas": _schemas(),
        },
    }


def render_yaml() -> str:
    """``docs/asyncapi.yaml``."""
    header = "# Generated by `python -m bloomwire.contract.asyncapi docs`; do not edit by hand.\n"
    body = yaml.safe_dump(build_document(), sort_keys=False, allow_unicode=True, width=100)
    return header + body


# --- topic table --------------------------------------------------------------------------------

_TOPICS_INTRO = """\
# Topics

Generated by `python -m bloomwire.contract.asyncapi docs` from `bloomwire.contract.topics` (addresses) and
`bloomwire.contract.events` (payloads); `docs/asyncapi.yaml` is the full machine-readable form. Every id
level (`{rider}`, `{shop}`, `{order}`, `{customer}`, `{service}`, `{device}`) has
"""

_TOPICS_NOTES = """
Inbound topics are written by devices and services and consumed only by the persister (with a
persistent session, QoS 1, acknowledged to the broker after the commit); nothing the backbone
publishes matches an inbound filter. Canonical topics are published only after the commit.

In access-control mode (docs/security.md) the provisioner adds three topics the persister never
touches: `shops/{shop}/orders/{order}/access` (retained `customer.access_granted`, readable by shop S
only), `customers/{customer}/devices` and `customers/{customer}/inbox/devices` (device
enrolment). Their `customer.*` events carry passwords and are never stored.

JSON payloads are CloudEvents in structured mode named by their `type` (`order.status_changed`, ...);
`OrderState`, `OrderLocation`, `RiderState`, `Ack` and `Refusal` are plain JSON objects of the
models of the same name in `bloomwire.contract.events`; the `OwnTracks*` payloads are the OwnTracks
app's own JSON; `PresenceWord` is the bare text `online` or `offline`.

OwnTracks (contract/owntracks.py), as the OwnTracks Recorder treats the app's messages where it
has a rule: `_type` `location` is a position (`tst` whole epoch seconds: a value above 1e11 is
refused as milliseconds, and so are 0 and times outside the contract's time bounds; numbers
must be finite JSON numbers); `lwt` marks the rider offline like a bare `offline` on its presence
topic; `transition` on `.../event` is stored as a `rider.region_changed` event with an id derived
from rider, device, `tst` and `event` (a re-send is a duplicate), tied to the carried order whose
destination it is (its `desc`/`rid` names the order, or it happened within 150 m of it), else
to the rider's only carried order (the event's `subject`, so a re-send is the same event), and
entering that destination while out for delivery sends an "arrived?" chat line to the rider's
inbox. Every other `_type` is acknowledged as ignored: one log line (topic, `_type`) and
`bloomwire_owntracks_ignored_total{type,reason}`; a malformed payload is dead-lettered with its
reason. Retained: the Recorder ignores retained messages unless started with `--useretained`
(default no); without Retain As Published a subscriber sees the RETAIN flag only on what the
broker replays when it (re)subscribes, so the Recorder ignores those replays and uses every live
message, including those the app publishes retained (its default). The persister does the same:
its subscriptions ask for no replays (Retain Handling 2), and OwnTracks topics are, with
presence, the exception to its refusal of retained inbound publishes.

Every inbound CloudEvent carries `id` and `time` (a message without either is refused: the `id`
is the sender's promise that a retry is the same event, deduplicated by it). `id` is 1-128 ASCII
letters, digits and `_ . : -`, starting with a letter or digit (a UUIDv7 is the usual choice).
`source` is the sender's own topic prefix: `riders/{rider}`, `shops/{shop}`,
`customers/{customer}` or `services/{service}`; any other source is refused. Only the bare
presence words (`online`, `offline`: a Last Will), OwnTracks payloads and bare position objects
on `riders/{rider}/location` come without them (a position is not an event of record; its `tst`
is its time).

What an inbound payload may hold (bloomwire.contract.validate; a refusal names the rule): at most
64 KiB, UTF-8 JSON nested at most 16 levels; text without control characters (newline and tab
excepted, NUL never) or lone surrogates; numbers as JSON numbers, finite (never strings or
booleans), latitudes in -90..90 and longitudes in -180..180, accuracy >= 0; times that can be
put in UTC, at most `event_future_skew_s` (default 300 s) ahead of the persister's clock and at
most `event_max_age_s` (default 7 days) old, `time` and an OwnTracks `tst` (epoch seconds)
alike; an incident's ETA at most 2 days ahead.

Where this differs from the original design (docs/design.md §1 says why), the code is followed:

- `shops/{shop}/errors` tells a shop terminal why its command was refused (the original names inbox
  errors only for riders and customers).
- `customers/{customer}/inbox/acks` carries the ids of the customer's committed events, as
  `riders/{rider}/inbox/acks` does for riders.
- `shops/{shop}/orders/{order}/location` carries an `OrderLocation` (position and ETA), not the
  rider's raw `rider.location_reported` event.
- `riders/{rider}/presence` accepts the bare word as well as a `rider.presence_changed` event, so that a
  Last Will (a fixed payload, without a fresh event id) works.
"""


def render_topic_table() -> str:
    """The topic table alone (Markdown), as embedded in the README."""
    lines = [
        "| topic | direction | published by | subscribed by | QoS | retained | payload |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in CHANNELS:
        direction = "inbound" if spec.action == "receive" else "canonical"
        qos = str(spec.qos) + (" (expiry)" if spec.expiry else "")
        payload = ", ".join(f"`{m}`" for m in spec.messages)
        lines.append(
            f"| `{spec.address}` | {direction} | {spec.publishers} | {spec.subscribers} | "
            f"{qos} | {'yes' if spec.retain else 'no'} | {payload} |"
        )
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """``docs/topics.md``: one row per topic."""
    intro = _TOPICS_INTRO + ID_RULE.replace("1-", "1 to ", 1)
    return intro + "\n\n" + render_topic_table() + _TOPICS_NOTES


README_START = "<!-- topics:start (generated by python -m bloomwire.contract.asyncapi docs) -->"
README_END = "<!-- topics:end -->"


def update_readme(text: str) -> str:
    """``text`` with the topic table between the README markers replaced by the current one."""
    head, sep, rest = text.partition(README_START)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        return text
    return head + README_START + "\n" + render_topic_table() + README_END + tail


def main(argv: list[str] | None = None) -> int:
    """Write ``asyncapi.yaml`` and ``topics.md`` into the given folder (default ``docs``)."""
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "docs")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "asyncapi.yaml").write_text(render_yaml(), encoding="utf-8")
    (folder / "topics.md").write_text(render_markdown(), encoding="utf-8")
    readme = folder.parent / "README.md"
    if readme.exists():
        readme.write_text(update_readme(readme.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
