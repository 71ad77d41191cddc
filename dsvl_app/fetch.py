"""Remote image URLs, fetched only where the operator allowed it, and safely.

Public addresses only (every address the name resolves to must be public; the connection is pinned to
the one checked, so a second lookup cannot point it elsewhere), http(s) only, no redirects, a byte cap
and one timeout for the whole fetch. The bytes then go through the same intake as uploads. No gradio, no model.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx


class RemoteImageError(ValueError):
    """A remote image that was not fetched; str() says why."""


def is_public_address(ip: str) -> bool:
    """Not loopback, private, link-local (cloud metadata), multicast, reserved or unspecified."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """Connects to the address that was checked, whatever the name resolves to now (TLS still checks the name)."""

    def __init__(self, address: str):
        super().__init__()
        self.address = address

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        request.headers["Host"] = request.url.netloc.decode()
        request.url = request.url.copy_with(host=self.address)
        request.extensions = {**request.extensions, "sni_hostname": host}  # keep the timeouts
        return await super().handle_async_request(request)


class RemoteImages:
    """Fetches image bytes from http(s) URLs under the safety rules above."""

    def __init__(self, max_bytes: int, timeout_s: float = 10.0,
                 address_allowed: Callable[[str], bool] = is_public_address):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._allowed = address_allowed

    async def _resolve(self, host: str, port: int) -> str:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise RemoteImageError(f"its host {host!r} cannot be resolved ({exc.strerror})") from None
        addresses = sorted({info[4][0] for info in infos})
        refused = [a for a in addresses if not self._allowed(a)]
        if not addresses or refused:
            raise RemoteImageError(
                f"its host {host!r} resolves to a loopback, private or link-local address ({', '.join(refused)}), "
                "which this server never fetches from"
            )
        return addresses[0]

    async def fetch(self, url: str) -> bytes:
        """The body of `url`, or RemoteImageError; the whole fetch, lookup included, within the timeout."""
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except TimeoutError:
            raise RemoteImageError(f"did not arrive within {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteImageError("is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await self._resolve(parts.hostname, port)
        try:
            async with httpx.AsyncClient(transport=_PinnedTransport(address), timeout=self.timeout_s) as client, \
                    client.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect:
                    raise RemoteImageError(f"answered with a redirect ({response.status_code}), which is not followed")
                if response.status_code != 200:
                    raise RemoteImageError(f"answered HTTP {response.status_code}")
                declared = int(response.headers.get("content-length") or 0)
                if declared > self.max_bytes:
                    raise RemoteImageError(self._too_big(declared))
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise RemoteImageError(self._too_big(len(body), at_least=True))
                return bytes(body)
        except httpx.TimeoutException:
            raise RemoteImageError(f"did not arrive within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise RemoteImageError(f"could not be fetched ({type(exc).__name__}: {exc})") from None

    def _too_big(self, size: int, at_least: bool = False) -> str:
        more = "over " if at_least else ""
        return (f"is {more}{size / 2**20:.1f} MB, over the {self.max_bytes / 2**20:.0f} MB upload limit")
