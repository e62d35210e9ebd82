"""Access control on the broker (Mosquitto's dynamic-security plugin): who may use which topics.

* :mod:`~bloomwire.access.policy` — the roles of docs/design.md §1 as literal-topic ACLs.
* :mod:`~bloomwire.access.dynsec` — run plugin commands on its JSON file or on a live broker
  (blocking :class:`ControlClient`, or :class:`ControlChannel` on a service's own connection).
* :mod:`~bloomwire.access.operations` — what each account operation sends the plugin.
* :mod:`~bloomwire.access.accounts` — :func:`bootstrap` before the broker starts; then
  :class:`Accounts` to add, remove, rotate, list, add device logins of shops and riders
  (``s1@till-2``), and mint/revoke customer access; :class:`AsyncAccounts` for the provisioner.
* :mod:`~bloomwire.access.enrol` — a customer device trades the order login for its own.
* :mod:`~bloomwire.app.bench.access` — :func:`bench_access`, mint/revoke time with N live orders.

The topics of the access flow (``shops/S/orders/O/access``, ``customers/C/devices``,
``customers/C/inbox/devices``) are built in :mod:`bloomwire.contract.topics`, its payloads
(``customer.access_granted``, ``customer.enrol_device``, ``customer.enrolment_answered``) modelled in
:mod:`bloomwire.contract.events`. See docs/security.md.
"""

from bloomwire.access.accounts import (
    AccountInfo,
    Accounts,
    AsyncAccounts,
    Bootstrap,
    Credential,
    OrderAccess,
    bootstrap,
    dynsec_path,
    open_accounts,
)
from bloomwire.access.policy import Kind, customer_id

__all__ = [
    "AccountInfo",
    "Accounts",
    "AsyncAccounts",
    "Bootstrap",
    "Credential",
    "Kind",
    "OrderAccess",
    "bootstrap",
    "customer_id",
    "dynsec_path",
    "open_accounts",
]
