"""Who may use the server's programmatic endpoints (`/v1`, `/metrics`): the API keys, and closing an exposed app.

A pure check of one request's `Authorization` header against the settings: with `--api-key`, a matching
`Bearer` key is required; without one, an app others can reach (a share link, `--auth`, a non-loopback
`--host`) keeps these endpoints closed. No web framework here: callers turn `Denied` into their own answer.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .settings import Settings


@dataclass
class Denied(Exception):
    """The request may not use the endpoint; `code` and `message` say why (for the client)."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def check_key(settings: Settings, authorization: str | None, what: str) -> None:
    """Raise Denied unless `authorization` (the header's value) carries one of the keys; `what` names the endpoint
    in the message ("The OpenAI-compatible API", "The metrics endpoint")."""
    keys = settings.api_keys
    if not keys:
        if settings.exposed:
            raise Denied("api_closed", f"{what} is closed: this app is reachable by others (a share link, --auth or a "
                         "non-loopback --host) and no API key is set. Start it with --api-key KEY (or DSVL_API_KEY) "
                         "and send 'Authorization: Bearer KEY'.")
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Denied("missing_api_key", "Missing API key: send 'Authorization: Bearer KEY'.")
    if not any(hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys):
        raise Denied("invalid_api_key", "Incorrect API key provided.")
