"""Notices: tells an order's customer (and its shop) what happens to it, unasked, once each."""

from bloomwire.services.notices.service import NAME, NoticesService, build

__all__ = ["NAME", "NoticesService", "build"]
