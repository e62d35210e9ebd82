"""The web service's ASGI application: pages, their assets, ``/contract.json``, enrolment.

:func:`create_app` builds a Starlette app from settings; :mod:`.service` runs it under uvicorn,
whose websocket protocol serves ``/mqtt`` itself (:mod:`.bridge`: no ASGI call per page).
Adding a page is one HTML file in ``web/pages`` and one route in :data:`PAGES`.
"""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from bloomwire.contract.events import describe_validation_error
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.assets import VENDOR, WebRoot
from bloomwire.services.web.bridge import BridgeStats, Upstream
from bloomwire.services.web.contract_doc import contract_document
from bloomwire.services.web.enrolment import Answer, Enroller, EnrolRequest
from bloomwire.services.web.orders import OrderLookup
from bloomwire.services.web.photos import PhotoAccess, load_key, read_photo
from bloomwire.store.photos import FilePhotoStore

#: URL path -> page file in ``web/pages``.
PAGES: dict[str, str] = {
    "/": "index.html",
    "/shop": "shop.html",
    "/track": "track.html",
    "/rider": "rider.html",
}
MAX_ENROL_BODY = 4096


def content_security_policy(settings: Settings) -> str:
    """Only our own origin, plus the map tile host when one is configured."""
    images = ["'self'", "data:", "blob:"]
    if settings.map_tile_url:
        tile = urlsplit(settings.map_tile_url)
        if tile.scheme and tile.netloc:  # {s} (Leaflet's subdomains) becomes a wildcard
            images.append(f"{tile.scheme}://{tile.netloc.replace('{s}', '*')}")
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self' 'unsafe-inline'",  # Leaflet positions its panes with style attributes
            f"img-src {' '.join(images)}",
            "connect-src 'self' ws: wss:",
            "worker-src 'self' blob:",  # MQTT.js's worker timers (keepalive in background tabs)
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        )
    )


class SecurityHeaders:
    """Adds the CSP and friends to every HTTP response."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, with_headers)


def page_config(settings: Settings) -> dict[str, Any]:
    """``/config.json``: what the pages need to know about this installation."""
    return {
        "map_tile_url": settings.map_tile_url,
        "map_attribution": settings.map_attribution,
        "public_url": settings.web_url if settings.public_url else "",
        "shop_names": settings.shop_names,
    }


def upstream_of(settings: Settings) -> Upstream:
    """The broker's plain MQTT listener, as the bridge reaches it."""
    tls = None
    if settings.broker_tls:
        tls = ssl.create_default_context(
            cafile=str(settings.broker_ca_file) if settings.broker_ca_file else None
        )
    return Upstream(settings.broker_host, settings.broker_port, tls)


def create_app(
    settings: Settings,
    root: WebRoot,
    *,
    enroller: Enroller | None = None,
    stats: BridgeStats | None = None,
) -> Starlette:
    """The web application for ``settings`` (broker address, store, map tiles, ...)."""
    enrol = enroller or Enroller(
        settings, OrderLookup(settings.database_url), photos=PhotoAccess(load_key(settings.data_dir))
    )
    photo_store = FilePhotoStore.in_data_dir(settings.data_dir)
    bridge_stats = stats or BridgeStats()
    contract = json.dumps(contract_document()).encode()
    config = json.dumps(page_config(settings)).encode()

    def page(name: str) -> Any:
        async def serve(_request: Request) -> Response:
            return FileResponse(root.pages / name, headers={"cache-control": "no-cache"})

        return serve

    async def contract_json(_request: Request) -> Response:
        return Response(contract, media_type="application/json")

    async def config_json(_request: Request) -> Response:
        return Response(config, media_type="application/json", headers={"cache-control": "no-cache"})

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse(f"ok {bridge_stats.open} pages connected\n")

    async def enrol_endpoint(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_ENROL_BODY:
            answer = Answer.error(413, "bad_request", "request too large")
        else:
            try:
                answer = await enrol(EnrolRequest.model_validate_json(body))
            except ValidationError as exc:
                answer = Answer.error(400, "bad_request", describe_validation_error(exc))
        return JSONResponse(answer.body, status_code=answer.status, headers={"cache-control": "no-store"})

    async def photo_token_endpoint(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_ENROL_BODY:
            answer = Answer.error(413, "bad_request", "request too large")
        else:
            try:
                answer = await enrol.photo_token(EnrolRequest.model_validate_json(body))
            except ValidationError as exc:
                answer = Answer.error(400, "bad_request", describe_validation_error(exc))
        return JSONResponse(answer.body, status_code=answer.status, headers={"cache-control": "no-store"})

    async def photo_endpoint(request: Request) -> Response:
        shop, order = request.path_params["shop"], request.path_params["order"]
        status, summary = await enrol.photo(shop, order, request.query_params.get("t", ""))
        found = read_photo(photo_store, summary.photo) if summary is not None else None
        if found is None:
            return PlainTextResponse("no photo\n", status_code=status if status != 200 else 404)
        # Private: the URL carries the token; the bytes never change under their address.
        headers = {"cache-control": "private, max-age=86400", "etag": f'"{found.sha256}"'}
        return Response(found.data, media_type=found.content_type, headers=headers)

    routes: list[Any] = [Route(path, page(name)) for path, name in PAGES.items()]
    routes += [
        Route("/contract.json", contract_json),
        Route("/config.json", config_json),
        Route("/healthz", healthz),
        Route("/api/enrol", enrol_endpoint, methods=["POST"]),
        Route("/api/photo/{shop}/{order}", photo_endpoint),
        Route("/api/photo-token", photo_token_endpoint, methods=["POST"]),
        Mount("/app", StaticFiles(directory=root.src), name="app"),
        *(Mount(f"/vendor/{name}", StaticFiles(directory=root.vendor(name))) for name in VENDOR),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityHeaders, csp=content_security_policy(settings))
    app.state.bridge_stats = bridge_stats
    return app
