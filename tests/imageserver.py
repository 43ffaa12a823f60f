"""A fake img.cls.cn for tests and benchmarks: an aiohttp app on 127.0.0.1, port 0.

Point feeder at it with ``ImagesConfig(origins={"https://img.cls.cn": server.url})``.
Each path gets a behaviour (a handler made by the functions below), unknown paths
get ``server.default`` (404 unless set); the server counts requests per path and
the requests in flight, so tests can check retries and concurrency limits::

    async with ImageServer() as server:
        server.route("/images/a.png", image(PNG))
        server.route("/images/flaky.png", sequence(status(500), image(PNG)))
        ...
        assert server.requests["/images/flaky.png"] == 2
"""

from __future__ import annotations

import asyncio
import gzip
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web
from multidict import CIMultiDictProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A valid 1x1 transparent PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
)
#: A JPEG/JFIF header with filler and an end marker: right magic bytes, nothing to decode.
JPEG = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    + b"\x00" * 64
    + b"\xff\xd9"
)
#: A valid 1x1 transparent GIF.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
#: A valid 1x1 lossless WebP.
WEBP = (
    b"RIFF\x1a\x00\x00\x00WEBPVP8L\r\x00\x00\x00/\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88"
    b"\xfe\x07\x00"
)
#: An SVG image, which feeder refuses (it can carry scripts).
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"><rect width="1"/></svg>'
#: The kind of error page a CDN serves with status 200.
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>gone</body></html>"

#: Set when the server stops, so handlers that hang return.
STOPPING = web.AppKey("stopping", asyncio.Event)


def png_of_size(size: int) -> bytes:
    """PNG magic bytes padded to ``size`` bytes: passes the sniffing, for size limits."""
    return (PNG + b"\x00" * size)[:size]


def image(body: bytes, content_type: str = "image/png", *, delay: float = 0) -> Handler:
    """Serve ``body`` with a Content-Length, after ``delay`` seconds."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=body, content_type=content_type)

    return handler


def status(
    code: int, headers: dict[str, str] | None = None, body: bytes = b"error"
) -> Handler:
    """Answer with status ``code``, e.g. ``status(429, {"Retry-After": "1"})``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers=headers, body=body, content_type="text/plain")

    return handler


def redirect(location: str, code: int = 302, *, delay: float = 0) -> Handler:
    """Redirect to ``location`` (relative or absolute), as given, after ``delay`` seconds."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.Response(status=code, headers={"Location": location})

    return handler


def chunked(body: bytes, chunk_size: int = 64 * 1024, content_type: str = "image/png") -> Handler:
    """Stream ``body`` with chunked transfer encoding: no Content-Length to judge by."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), chunk_size):
            await response.write(body[start : start + chunk_size])
        await response.write_eof()
        return response

    return handler


def gzipped(body: bytes, content_type: str = "image/png") -> Handler:
    """Serve ``body`` gzipped (``Content-Encoding: gzip``): its Content-Length is the
    compressed size."""
    compressed = gzip.compress(body, compresslevel=9)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=compressed, headers={
            "Content-Type": content_type, "Content-Encoding": "gzip"})

    return handler


def short_body(body: bytes, claimed: int, content_type: str = "image/png") -> Handler:
    """Announce ``claimed`` bytes, send ``body`` (fewer), then drop the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Content-Length": str(claimed)}
        )
        await response.prepare(request)
        await response.write(body)
        await response.drain()
        if request.transport is not None:
            request.transport.close()
        return response

    return handler


def hang(head: bytes = b"", claimed: int = 1024 * 1024) -> Handler:
    """Send headers and ``head`` (if any), then stall until the server stops."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "image/png", "Content-Length": str(claimed)}
        )
        if head:
            await response.prepare(request)
            await response.write(head)
        await request.app[STOPPING].wait()
        return response

    return handler


def sequence(*handlers: Handler) -> Handler:
    """The n-th request gets the n-th handler; the last one answers every later request."""
    served = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal served
        chosen = handlers[min(served, len(handlers) - 1)]
        served += 1
        return await chosen(request)

    return handler


def with_headers(inner: Handler, headers: dict[str, str]) -> Handler:
    """``inner``'s response with extra headers, e.g. a ``Set-Cookie``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await inner(request)
        response.headers.update(headers)
        return response

    return handler


async def not_found(request: web.Request) -> web.StreamResponse:
    return web.Response(status=404, text="not found")


class ImageServer:
    """An aiohttp server on 127.0.0.1 with per-path behaviours and request counters."""

    def __init__(self) -> None:
        #: Behaviour per exact path.
        self.routes: dict[str, Handler] = {}
        #: Behaviour of every other path.
        self.default: Handler = not_found
        #: Requests received, per path.
        self.requests: Counter[str] = Counter()
        #: Headers of every request, in arrival order.
        self.headers: list[CIMultiDictProxy[str]] = []
        #: Requests being answered right now.
        self.in_flight = 0
        #: Most requests ever answered at once.
        self.max_in_flight = 0
        #: Port it listens on, once started.
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, to map an origin to: ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    async def start(self) -> None:
        app = web.Application(middlewares=[self._count])
        app[STOPPING] = asyncio.Event()
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is None:
            return
        self._runner.app[STOPPING].set()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> ImageServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests[request.path] += 1
        self.headers.append(request.headers)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        return await self.routes.get(request.path, self.default)(request)
