"""The persister: validates inbound events, stores each exactly once, then publishes."""

from bloomwire.services.persister.service import NAME, build

__all__ = ["NAME", "build"]
