"""The generated AsyncAPI document and topic table match the code and the committed docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bloomwire.contract import asyncapi as aa
from bloomwire.contract import events as ev
from bloomwire.contract import topics as t
from bloomwire.errors import TopicError

DOCS = Path(__file__).resolve().parents[1] / "docs"
REGENERATE = "regenerate with: python -m bloomwire.contract.asyncapi docs"

DOC = aa.build_document()
YAML = aa.render_yaml()
SAMPLE_IDS = {
    "rider": "r7",
    "shop": "s1",
    "order": "o42",
    "customer": "c-o42",
    "service": "dispatch",
    "device": "phone",
}


def example_topic(spec: aa.ChannelSpec) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE_IDS[m.group(1)], spec.address)


def test_committed_asyncapi_yaml_is_current() -> None:
    committed = (DOCS / "asyncapi.yaml").read_text(encoding="utf-8")
    assert committed == YAML, REGENERATE


def test_committed_topics_md_is_current() -> None:
    committed = (DOCS / "topics.md").read_text(encoding="utf-8")
    assert committed == aa.render_markdown(), REGENERATE


def test_yaml_round_trips_to_the_document() -> None:
    assert yaml.safe_load(YAML) == DOC
    assert DOC["asyncapi"] == "3.0.0"


@pytest.mark.parametrize("kind", sorted(ev.EVENT_TYPES))
def test_every_event_type_is_a_message_on_some_channel(kind: str) -> None:
    message = DOC["components"]["messages"][kind]
    assert message["name"] == kind
    assert message["payload"] == {"$ref": f"#/components/schemas/{ev.EVENT_TYPES[kind].__name__}"}
    assert any(kind in channel["messages"] for channel in DOC["channels"].values())
    assert f"name: {kind}" in YAML


@pytest.mark.parametrize("kind", sorted(ev.EVENT_TYPES))
def test_event_schemas_come_from_the_models(kind: str) -> None:
    cls = ev.EVENT_TYPES[kind]
    schema = DOC["components"]["schemas"][cls.__name__]
    assert schema["properties"]["type"]["const"] == kind
    # The models default id and time for producers; the wire requires them (ev.decode does).
    assert set(schema["required"]) == {
        name for name, field in cls.model_fields.items() if field.is_required()
    } | {"id", "time"}
    assert "Required." in schema["properties"]["id"]["description"]
    assert "Required." in schema["properties"]["time"]["description"]
    assert "riders/{rider}" in schema["properties"]["source"]["description"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_resolves() -> None:
    refs = _refs(DOC)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = DOC
        for part in ref[2:].split("/"):
            assert part in node, ref
            node = node[part]


def test_no_pydantic_local_defs_left() -> None:
    assert "$defs" not in YAML


@pytest.mark.parametrize("spec", aa.CHANNELS, ids=lambda s: s.key)
def test_channel_parameters_match_the_address(spec: aa.ChannelSpec) -> None:
    channel = DOC["channels"][spec.key]
    assert channel["address"] == spec.address
    assert list(channel.get("parameters", {})) == spec.parameters
    assert set(spec.parameters) <= set(aa.PARAMETERS)


@pytest.mark.parametrize("spec", aa.CHANNELS, ids=lambda s: s.key)
def test_operation_per_channel(spec: aa.ChannelSpec) -> None:
    op = DOC["operations"][aa.operation_id(spec)]
    assert op["action"] == spec.action
    assert op["channel"] == {"$ref": f"#/channels/{spec.key}"}
    assert [m["$ref"].rsplit("/", 1)[1] for m in op["messages"]] == list(spec.messages)
    mqtt = op["bindings"]["mqtt"]
    assert mqtt["qos"] in (0, 1, 2) and isinstance(mqtt["retain"], bool)
    assert mqtt["bindingVersion"] == "0.2.0"


@pytest.mark.parametrize(
    "spec", [s for s in aa.CHANNELS if s.action == "receive" and s.via_persister], ids=lambda s: s.key
)
def test_receive_channels_are_inbound_topics(spec: aa.ChannelSpec) -> None:
    topic = example_topic(spec)
    parsed = t.parse_inbound(topic)
    assert parsed.sender in SAMPLE_IDS.values()
    assert sum(t.matches(f, topic) for f in t.INBOUND_FILTERS) == 1


@pytest.mark.parametrize(
    "spec", [s for s in aa.CHANNELS if s.action == "send" or not s.via_persister], ids=lambda s: s.key
)
def test_send_channels_are_never_consumed_as_inbound(spec: aa.ChannelSpec) -> None:
    """Canonical topics, and the provisioner's access topics, never reach the persister."""
    topic = example_topic(spec)
    assert not any(t.matches(f, topic) for f in t.INBOUND_FILTERS)
    with pytest.raises(TopicError):
        t.parse_inbound(topic)


@pytest.mark.parametrize("kind", sorted(ev.ACCESS_EVENT_TYPES))
def test_access_events_are_documented_but_never_decoded(kind: str) -> None:
    cls = ev.ACCESS_EVENT_TYPES[kind]
    assert DOC["components"]["messages"][kind]["payload"] == {"$ref": f"#/components/schemas/{cls.__name__}"}
    (spec,) = [s for s in aa.CHANNELS if kind in s.messages]
    assert not spec.via_persister and "provisioner" in f"{spec.publishers} {spec.subscribers}"
    assert kind not in ev.EVENT_TYPES  # the persister refuses them: they carry passwords


def test_access_channels_are_built_by_topics() -> None:
    addresses = {s.address for s in aa.CHANNELS if not s.via_persister}
    assert addresses == {
        "shops/{shop}/orders/{order}/access",
        "customers/{customer}/devices",
        "customers/{customer}/inbox/devices",
    }
    assert t.matches(t.ALL_ACCESS_FILTER, t.access_topic("s1", "o42"))
    assert t.matches(t.ALL_DEVICE_REQUESTS_FILTER, t.device_request_topic("c-o42"))
    assert t.matches(t.ALL_DEVICE_REPLIES_FILTER, t.device_reply_topic("c-o42"))
    assert t.ACCESS not in {c.value for c in t.CUSTOMER_CHANNELS}


def test_every_inbound_filter_has_a_channel() -> None:
    receive = [example_topic(s) for s in aa.CHANNELS if s.action == "receive"]
    for topic_filter in t.INBOUND_FILTERS:
        assert any(t.matches(topic_filter, topic) for topic in receive), topic_filter


def test_every_shop_command_has_a_channel() -> None:
    assert set(aa.COMMAND_EVENTS) == set(t.Command)
    addresses = {s.address for s in aa.CHANNELS}
    for command in t.Command:
        assert f"shops/{{shop}}/commands/{command.value}" in addresses


def test_every_order_channel_and_rider_inbox_is_documented() -> None:
    addresses = {s.address for s in aa.CHANNELS}
    for channel in t.OrderChannel:
        assert f"shops/{{shop}}/orders/{{order}}/{channel.value}" in addresses
    for box in t.Inbox:
        assert f"riders/{{rider}}/inbox/{box.value}" in addresses
    assert "customers/{customer}/inbox/errors" in addresses
    assert "shops/{shop}/errors" in addresses
    assert t.DEADLETTER in addresses


def test_retained_topics() -> None:
    retained = {s.address for s in aa.CHANNELS if s.retain}
    assert retained == {
        "riders/{rider}/presence",
        "shops/{shop}/orders/{order}/state",
        "shops/{shop}/riders/{rider}/state",
        "services/{service}/status",
        "shops/{shop}/orders/{order}/access",
    }


def test_keys_are_unique() -> None:
    assert len({s.key for s in aa.CHANNELS}) == len(aa.CHANNELS)
    assert len({s.address for s in aa.CHANNELS}) == len(aa.CHANNELS)
    assert len(DOC["operations"]) == len(aa.CHANNELS)


def test_topics_md_has_one_row_per_channel() -> None:
    rows = [line for line in aa.render_markdown().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [s.address for s in aa.CHANNELS]


def test_main_writes_both_files(tmp_path: Path) -> None:
    assert aa.main([str(tmp_path)]) == 0
    assert (tmp_path / "asyncapi.yaml").read_text(encoding="utf-8") == YAML
    assert (tmp_path / "topics.md").read_text(encoding="utf-8") == aa.render_markdown()


def test_readme_topic_table_is_current() -> None:
    """The README's topic table is the generated one (run `python -m bloomwire.contract.asyncapi docs`)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert aa.update_readme(readme) == readme
    assert aa.render_topic_table() in readme
