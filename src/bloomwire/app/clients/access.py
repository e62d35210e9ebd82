"""How a customer gets at their order: the MQTT identity the tracker connects with.

The persister names the customer of order ``O`` ``c-O`` (its id C, which names the
``customers/C/...`` topics) and the shop terminal fills that name in when it creates the order.
With access control on, the provisioner publishes the order's login and password, retained, on
``shops/S/orders/O/access`` (shop S only); the terminal picks it up there. Without it, an
:class:`AccessIssuer` may provision the account (the demo and the simulator own their broker),
or the access is just the username.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bloomwire.contract import events as ev
from bloomwire.contract import topics


def customer_username(order: str) -> str:
    """The customer identity of ``order``: the persister's own rule (``c-<order>``, hashed if long)."""
    return topics.customer_for_order(order)


@dataclass(frozen=True, slots=True)
class CustomerAccess:
    """What the shop hands the customer so they can follow their order.

    ``customer`` is the customer id C (it names the ``customers/C/...`` topics); ``username`` is
    the login. Without access control both are ``c-<order>``; with it the provisioner mints a login
    of its own (``cust@...``) and a password.
    """

    shop: str
    order: str
    customer: str
    username: str
    password: str | None = None

    @classmethod
    def from_provisioner(cls, data: ev.CustomerAccess) -> CustomerAccess:
        """The access the provisioner published on ``shops/S/orders/O/access``."""
        return cls(data.shop, data.order, data.customer, data.username, data.password)

    def describe(self) -> str:
        """One line for the shop to pass on."""
        cmd = f"bloomwire track {self.order} --shop {self.shop}"
        if self.customer != customer_username(self.order):
            cmd += f" --customer {self.customer}"
        if self.password is None:
            return (
                f"customer access: username {self.username} (no password was issued: no access-control "
                f"provisioner answered); follow with `{cmd}`"
            )
        if self.username != self.customer:
            cmd += f" --username {self.username}"
        return (
            f"customer access: login {self.username}, password {self.password}; "
            f"follow with `{cmd} --password …`"
        )


class AccessIssuer(Protocol):
    """Issues a customer's access for a newly created order."""

    def issue(self, shop: str, order: str, username: str) -> CustomerAccess:
        """The access for ``username``, the customer of ``order``."""
        ...


class UsernameOnly:
    """Today's issuer: the username the persister assigns, no password."""

    def issue(self, shop: str, order: str, username: str) -> CustomerAccess:
        """Just the username."""
        return CustomerAccess(shop, order, username, username)


class ProvisionedAccess:
    """An issuer that creates the broker account itself (the demo and simulator own their broker)."""

    def __init__(self, provision: Callable[[str], str]) -> None:
        self.provision = provision

    def issue(self, shop: str, order: str, username: str) -> CustomerAccess:
        """Create (or look up) the account and hand out its password."""
        return CustomerAccess(shop, order, username, username, self.provision(username))
