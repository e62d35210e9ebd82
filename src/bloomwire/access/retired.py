"""What a removed rider or device leaves retained on the broker, and its clearing.

A rider's device publishes its presence retained (its Last Will too), the OwnTracks app its
locations, and the persister the rider's state for each shop it carried for (its inbox holds
nothing retained: only the persister writes there, never retained). None of it expires:
without a clearing, the broker hands a retired rider's last word to every new subscriber for
ever. Removing the account (or revoking one device login) publishes an empty retained message
on each of those topics, once the broker has disconnected the client (its Last Will included).
"""

from __future__ import annotations

from bloomwire.access import policy
from bloomwire.access.dynsec import ControlClient
from bloomwire.access.policy import Kind
from bloomwire.contract import topics


def rider_filters(rider: str) -> list[str]:
    """Where rider ``rider`` (any of its devices) may have left retained messages."""
    base = f"{topics.RIDERS}/{rider}"
    return [
        f"{base}/presence",
        f"{base}/location",
        f"{topics.OWNTRACKS}/{rider}/#",
        f"{topics.SHOPS}/+/riders/{rider}/state",
    ]


def device_filters(username: str) -> list[str]:
    """Where one rider's device login ``R@LABEL`` may have left retained messages of its own (its
    OwnTracks topics; the rider's presence is the rider's, and stays)."""
    device = policy.split_device(username)
    if device is None:
        return []
    rider, label = device
    return [f"{topics.OWNTRACKS}/{rider}/{label}", f"{topics.OWNTRACKS}/{rider}/{label}/#"]


def filters_of(username: str, kind: Kind | None) -> list[str]:
    """What to clear when ``username`` (of ``kind``) goes: a rider's or a rider's device's."""
    if kind is not Kind.RIDER:
        return []
    return device_filters(username) if policy.split_device(username) else rider_filters(username)


def clear(client: ControlClient, filters: list[str]) -> list[str]:
    """Publish an empty retained message on every topic under ``filters`` that holds one; return
    those topics."""
    if not filters:
        return []
    found = client.retained_topics(filters)
    for topic in found:
        client.publish(topic, b"", qos=1, retain=True)
    return found
