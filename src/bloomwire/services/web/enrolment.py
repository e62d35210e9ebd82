"""A tracking link becomes a device login: the one thing the customer's page asks the server for.

The link carries the order's first login (``shops/S/orders/O/access``, docs/security.md) in its
``#fragment``, which browsers never send in a request; the page POSTs it here. This module
checks it against the store (known order, its customer, not past its grace period), then trades
it for a login of the page's own through :func:`bloomwire.access.enrol.enrol_device`, so two
phones of one customer never share an MQTT session. Passwords are never logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from bloomwire.access.accounts import Credential
from bloomwire.access.enrol import enrol_device, login_accepted
from bloomwire.contract.topics import check_id
from bloomwire.errors import BrokerError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.orders import OrderLookup, OrderSummary
from bloomwire.services.web.photos import PhotoAccess

log = get_logger("bloomwire.services.web.enrolment")

Id = Annotated[str, AfterValidator(check_id)]
#: Enrolments running at once (each holds a short MQTT connection and a thread).
MAX_CONCURRENT = 16
ENROL_TIMEOUT_S = 10.0


class EnrolRequest(BaseModel):
    """What the page posts: the link's fields and a label for the device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shop: Id
    order: Id
    customer: Id
    username: Id
    password: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    label: Annotated[str, StringConstraints(max_length=100)] = ""


@dataclass(frozen=True, slots=True)
class Answer:
    """HTTP status and JSON body for the page. ``error`` is a stable code the page translates."""

    status: int
    body: dict[str, Any]

    @classmethod
    def error(cls, status: int, code: str, detail: str = "") -> Answer:
        """A refusal the page can show."""
        return cls(status, {"error": code, "detail": detail})


Enrol = Callable[..., Credential]


def classify(exc: BrokerError) -> tuple[int, str]:
    """Status and error code for a failed enrolment, from what ``enrol_device`` said."""
    text = str(exc)
    if "login refused" in text or "may not read" in text:
        return 403, "invalid_link"  # the broker does not know this login (any more)
    if " refused: " in text:
        return 409, "too_many_devices"  # the provisioner said no (its cap of logins per order)
    return 503, "unavailable"  # broker or provisioner not answering: the page retries


class Enroller:
    """Checks a link against the store and trades it for a device login."""

    def __init__(
        self,
        settings: Settings,
        lookup: OrderLookup,
        *,
        enrol: Enrol = enrol_device,
        timeout: float = ENROL_TIMEOUT_S,
        photos: PhotoAccess | None = None,
    ) -> None:
        self.settings = settings
        self.lookup = lookup
        #: Mints the page's photo token once its link is proven (issue 16).
        self.photos = photos
        self.enrol = enrol
        self.timeout = timeout
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    async def __call__(self, request: EnrolRequest) -> Answer:
        """Answer one enrolment request (never raises for a bad link or a broker outage)."""
        try:
            summary = await asyncio.to_thread(self.lookup.find, request.shop, request.order)
        except Exception:
            log.exception("store lookup failed", shop=request.shop, order=request.order)
            return Answer.error(503, "unavailable", "the order store is not answering")
        refusal = self._check(request, summary)
        if refusal is not None or summary is None:
            return refusal or Answer.error(404, "unknown_order")
        async with self._slots:
            try:
                login = await asyncio.to_thread(self._enrol, request)
            except BrokerError as exc:
                status, code = classify(exc)
                if code == "invalid_link" and summary.status in (
                    "delivered",
                    "failed",
                    "cancelled",
                    "returned",
                ):
                    status, code = 410, "expired"  # revoked early, or the grace setting differs
                log.info("enrolment refused", shop=request.shop, order=request.order, code=code, why=str(exc))
                return Answer.error(status, code)
        log.info("device enrolled", shop=request.shop, order=request.order, device=login.username)
        return Answer(200, self._login_body(request, summary, login))

    async def photo_token(self, request: EnrolRequest) -> Answer:
        """A photo token for whoever holds the order's tracking link (the shop's dashboard)."""
        if self.photos is None:
            return Answer.error(404, "no_photos")
        try:
            summary = await asyncio.to_thread(self.lookup.find, request.shop, request.order)
        except Exception:
            log.exception("store lookup failed", shop=request.shop, order=request.order)
            return Answer.error(503, "unavailable", "the order store is not answering")
        refusal = self._check(request, summary)
        if refusal is not None:
            return refusal
        async with self._slots:
            s = self.settings
            ok = await asyncio.to_thread(
                lambda: login_accepted(
                    s.broker_host, s.broker_port, request.username, request.password,
                    tls=s.broker_tls, ca_file=s.broker_ca_file, timeout=self.timeout,
                )
            )  # fmt: skip
        if not ok:
            return Answer.error(403, "invalid_link")
        return Answer(200, {"photo_token": self.photos.token(request.shop, request.order)})

    async def photo(self, shop: str, order: str, token: str) -> tuple[int, OrderSummary | None]:
        """HTTP status for a photo request and the order it may see (issue 16): 200 with the
        order, 403 for a token of another order, 404 unknown, 410 past its link's grace."""
        if self.photos is None or not self.photos.allows(token, shop, order):
            return 403, None
        try:
            summary = await asyncio.to_thread(self.lookup.find, shop, order)
        except Exception:
            log.exception("store lookup failed", shop=shop, order=order)
            return 503, None
        if summary is None:
            return 404, None
        if summary.expired(self.settings.customer_access_grace_s):
            return 410, None
        return 200, summary

    def _check(self, request: EnrolRequest, summary: OrderSummary | None) -> Answer | None:
        if summary is None:
            log.info("enrolment for an unknown order", shop=request.shop, order=request.order)
            return Answer.error(404, "unknown_order")
        if summary.customer and summary.customer != request.customer:
            return Answer.error(403, "invalid_link")
        if summary.expired(self.settings.customer_access_grace_s):
            return Answer.error(410, "expired")
        return None

    def _enrol(self, request: EnrolRequest) -> Credential:
        s = self.settings
        return self.enrol(
            s.broker_host,
            s.broker_port,
            request.username,
            request.password,
            request.customer,
            label=request.label or "web",
            tls=s.broker_tls,
            ca_file=s.broker_ca_file,
            timeout=self.timeout,
        )

    def _login_body(self, request: EnrolRequest, summary: OrderSummary, login: Credential) -> dict[str, Any]:
        return {
            "username": login.username,
            "password": login.password,
            "shop": request.shop,
            "shop_name": self.settings.shop_names.get(request.shop, ""),
            "order": request.order,
            "customer": request.customer,
            **summary.to_json(),
            **({"photo_token": self.photos.token(request.shop, request.order)} if self.photos else {}),
        }
