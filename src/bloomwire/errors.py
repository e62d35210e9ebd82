"""One exception root for everything Bloomwire raises on purpose."""

from __future__ import annotations


class BloomwireError(Exception):
    """Root of every error Bloomwire raises deliberately."""


class TopicError(BloomwireError, ValueError):
    """A topic string or identifier is malformed or outside the contract."""


class PayloadError(BloomwireError, ValueError):
    """A payload is not valid JSON or does not match its event model."""


class TransitionError(BloomwireError, ValueError):
    """An order status change is not allowed by the lifecycle."""


class RejectedError(BloomwireError):
    """An event was refused by the backbone (authority, state, duplicate offer, ...)."""

    def __init__(self, reason: str, *, code: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ConfigError(BloomwireError):
    """Settings or a configuration file are invalid."""


class BrokerError(BloomwireError):
    """The MQTT broker could not be started, reached or configured."""
