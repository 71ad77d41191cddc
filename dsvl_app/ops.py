"""What operators reach: `GET /metrics` (Prometheus) and `GET /health` (is the model loaded and taking work?).

Both are plain routes on gradio's server beside `/v1` (outside gradio's queue: they answer at once, whatever
replies are streaming). `/metrics` needs an API key exactly as `/v1` does (`access.check_key`: with `--api-key`
a `Bearer` key; an exposed app without one keeps it closed); `/health` says only what the app is (model,
dtype, device, batch, replicas) and needs none. The engine (local or its Ray replicas) answers both:
`engine.metrics_text()` and `engine.health()`. No gradio imports.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .access import Denied, check_key
from .metrics import CONTENT_TYPE
from .settings import Settings

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


async def _ask(engine: Any, fn: Any) -> Any:
    """The engine's answer. A local engine's is a few reads: answered here, so that it never waits for a thread;
    a remote one's (a Ray call) comes from a worker thread, never blocking the event loop."""
    if getattr(engine, "remote", False):
        return await asyncio.to_thread(fn)
    return fn()


def health_body(problem: str | None, about: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The health answer: 200 {"status": "ok", ...} or 503 {"status": "unavailable", "reason": ..., ...}."""
    if problem is None:
        return 200, {"status": "ok", **about}
    return 503, {"status": "unavailable", "reason": problem, **about}


def router(engine: Any, settings: Settings) -> APIRouter:
    """The /metrics and /health routes over `engine`."""
    routes = APIRouter()

    @routes.get(METRICS_PATH)
    async def metrics(request: Request) -> Response:
        try:
            check_key(settings, request.headers.get("authorization"), "The metrics endpoint")
        except Denied as denied:
            return JSONResponse({"error": {"message": denied.message, "code": denied.code}}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            text = await _ask(engine, engine.metrics_text)
        except Exception as exc:  # noqa: BLE001 - a scrape that fails says why; the app goes on
            log.exception("metrics scrape failed")
            return JSONResponse({"error": {"message": f"The metrics could not be read: {exc}"}}, status_code=503)
        return Response(text, media_type=CONTENT_TYPE)

    @routes.get(HEALTH_PATH)
    async def health() -> JSONResponse:
        try:
            problem, about = await _ask(engine, engine.health)
        except Exception as exc:  # noqa: BLE001 - unhealthy, with the reason
            problem, about = f"the health check failed: {type(exc).__name__}: {exc}", {}
        status, body = health_body(problem, about)
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return routes
