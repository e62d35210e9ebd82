"""The alerts service: rules over orders and riders, on every event and on a tick; follow-ups."""

from bloomwire.services.alerts.service import NAME, AlertsService, build

__all__ = ["NAME", "AlertsService", "build"]
