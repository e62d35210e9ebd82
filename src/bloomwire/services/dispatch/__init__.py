"""Dispatch: which rider gets which order. ``planner`` costs, ``decide`` decides (both pure),
``reads`` reads the store, ``passes`` runs passes, ``service`` declares the service."""

from bloomwire.services.dispatch.service import NAME, DispatchConfig, Dispatcher, DispatchService, build

__all__ = ["NAME", "DispatchConfig", "DispatchService", "Dispatcher", "build"]
