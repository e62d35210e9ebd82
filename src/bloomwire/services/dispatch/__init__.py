"""Dispatch: which rider gets which order. ``planner`` decides (pure), ``service`` runs it."""

from bloomwire.services.dispatch.service import NAME, DispatchConfig, Dispatcher, DispatchService, build

__all__ = ["NAME", "DispatchConfig", "DispatchService", "Dispatcher", "build"]
