"""How a customer gets at their order: the MQTT identity the tracker connects with.

Today the persister names the customer of order ``O`` ``c-O`` and the shop terminal fills that
name in when it creates the order. A password is not issued yet: the access-control work will
add one. It plugs in here, as another :class:`AccessIssuer`, without touching the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bloomwire import topics


def customer_username(order: str) -> str:
    """The customer identity of ``order``: the persister's own rule (``c-<order>``, hashed if long)."""
    return topics.customer_for_order(order)


@dataclass(frozen=True, slots=True)
class CustomerAccess:
    """What the shop hands the customer so they can follow their order."""

    shop: str
    order: str
    username: str
    password: str | None = None

    def describe(self) -> str:
        """One line for the shop to pass on."""
        cmd = f"bloomwire track {self.order} --shop {self.shop}"
        if self.password is None:
            return (
                f"customer access: username {self.username} (password: issued by the access-control "
                f"service, not yet available); follow with `{cmd}`"
            )
        return f"customer access: username {self.username}, password {self.password}; follow with `{cmd}`"


class AccessIssuer(Protocol):
    """Issues a customer's access for a newly created order."""

    def issue(self, shop: str, order: str, username: str) -> CustomerAccess:
        """The access for ``username``, the customer of ``order``."""
        ...


class UsernameOnly:
    """Today's issuer: the username the persister assigns, no password."""

    def issue(self, shop: str, order: str, username: str) -> CustomerAccess:
        """Just the username."""
        return CustomerAccess(shop, order, username)


class ProvisionedAccess:
    """An issuer that creates the broker account itself (the demo and simulator own their broker)."""

    def __init__(self, provision: Callable[[str], str]) -> None:
        self.provision = provision

    def issue(self, shop: str, order: str, username: str) -> CustomerAccess:
        """Create (or look up) the account and hand out its password."""
        return CustomerAccess(shop, order, username, self.provision(username))
