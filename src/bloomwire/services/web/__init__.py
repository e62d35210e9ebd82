"""The web service: the customer's tracking page and the shop dashboard, served with their assets.

``app`` (the Starlette application), ``bridge`` (``/mqtt`` websocket → the broker's TCP port),
``enrolment`` (tracking link → device login), ``contract_doc`` (``/contract.json``), ``links``
(the tracking link's format), ``service`` (uvicorn and ``services/web/status``).
"""

from bloomwire.services.web.service import NAME, WebService, build

__all__ = ["NAME", "WebService", "build"]
