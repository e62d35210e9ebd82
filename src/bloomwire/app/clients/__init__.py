"""Device and terminal clients: the rider app, the shop terminal and the customer tracker.

Every client talks MQTT only (through :class:`bloomwire.runtime.mqtt.Connection`); none reads or writes
the store. Their state models and Rich views live in :mod:`bloomwire.app.clients.views`, so a view can
be rendered (and tested) from messages alone.
"""

from bloomwire.app.clients.base import ClientError, CredentialError, UsageError

__all__ = ["ClientError", "CredentialError", "UsageError"]
