"""A local stand-in for img.cls.cn: aiohttp on 127.0.0.1, port 0, with latency.

Every ``GET /images/...`` waits ``latency`` plus a uniform random jitter, then answers
with ``size`` bytes that start with real PNG magic bytes (so feeder's sniffing accepts
them). The body is one bytes object shared by every response.
"""

from __future__ import annotations

import asyncio
import random
from types import TracebackType

from aiohttp import web

#: A valid 1x1 transparent PNG (the magic bytes feeder sniffs, and a real image).
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
)


def png_of_size(size: int) -> bytes:
    """A PNG padded to ``size`` bytes (at least the PNG itself)."""
    return PNG + b"\x00" * max(0, size - len(PNG))


class ImageServer:
    """``async with ImageServer(latency=0.01, jitter=0.02, size=20_000) as s: s.url``."""

    def __init__(self, latency: float = 0.010, jitter: float = 0.020, size: int = 20_000,
                 seed: int = 1) -> None:
        self.latency = latency
        self.jitter = jitter
        self.body = png_of_size(size)
        self.requests = 0
        self.waited = 0.0
        self._rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def mean_latency(self) -> float:
        """The latency the server added, on average, so far (else the expected one)."""
        return self.waited / self.requests if self.requests else self.latency + self.jitter / 2

    async def _image(self, request: web.Request) -> web.Response:
        delay = self.latency + self._rng.uniform(0, self.jitter)
        self.requests += 1
        self.waited += delay
        await asyncio.sleep(delay)
        return web.Response(body=self.body, content_type="image/png")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/images/{tail:.*}", self._image)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ImageServer:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
