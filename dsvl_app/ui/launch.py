"""Launching: the queued Blocks, and demo.launch()'s arguments (bind address, share, auth, upload cap, the
`/v1`, `/metrics` and `/health` routes).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import openai_api, ops
from ..engine import Engine
from ..settings import Settings
from .files import EXAMPLES_DIR, image_store, image_urls
from .layout import OTHER_EVENTS_AT_ONCE, ChatApp
from .views import CSS, JS


def build_demo(settings: Settings, engine: Engine | None = None) -> gr.Blocks:
    """The queued Blocks app for these settings (without `engine`, the model is loaded here, once)."""
    demo = ChatApp(settings, engine).build()
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=OTHER_EVENTS_AT_ONCE)
    return demo


def launch_kwargs(settings: Settings, engine: Engine) -> dict[str, Any]:
    """Arguments for demo.launch(): bind address, share, auth, upload cap, allowed files, theme, threads,
    and the OpenAI-compatible /v1 routes, /metrics and /health over the same engine on the same server."""
    api = openai_api.Api(engine, settings, image_urls(settings))
    return {
        # A reply waiting in line or streaming holds one of gradio's worker threads; leave room for the rest.
        "max_threads": engine.batch + settings.queue_size + 16,
        # Before gradio's own routes: /v1, and /metrics and /health for operators.
        "app_kwargs": {"routes": openai_api.router(api).routes + ops.router(engine, settings).routes},
        "mcp_server": settings.mcp,
        "server_name": settings.server_name,
        "server_port": settings.port,
        "share": settings.share,
        "auth": settings.auth,
        "max_file_size": settings.limits.upload_bytes,
        # The store's files are named by the hash of their content: served only to who knows it.
        "allowed_paths": [str(EXAMPLES_DIR), str(image_store(settings).images)],
        "js": JS,
        "css": CSS,
        "theme": gr.themes.Soft(),
        "footer_links": ["api", "gradio"],
    }


def share_warning(settings: Settings) -> str | None:
    """The loud warning for a public link without a password."""
    if settings.share and not settings.auth:
        return (
            "\n" + "!" * 78 + "\n"
            "!! WARNING: --share creates a PUBLIC link (valid for a week) and no --auth is set:\n"
            "!! anyone with the link can use this app and your GPU. Add --auth USER:PASSWORD.\n" + "!" * 78
        )
    return None
