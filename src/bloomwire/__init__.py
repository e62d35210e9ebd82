"""Bloomwire: an MQTT event backbone for flower-shop delivery tracking."""

from bloomwire.errors import BloomwireError

__all__ = ["BloomwireError", "__version__"]
__version__ = "0.1.0"
