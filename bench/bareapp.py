"""The baseline server: a bare ``aiohttp.web`` handler returning one file's bytes from memory.

``python -m bench.bareapp FILE ETAG CONTENT_TYPE`` listens on 127.0.0.1, port 0, and
prints the port. ``If-None-Match: "ETAG"`` gets a 304, anything else a 200 with the bytes.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def serve(body: bytes, etag: str, content_type: str) -> None:
    quoted = f'"{etag}"'

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == quoted:
            return web.Response(status=304, headers={"ETag": quoted})
        return web.Response(body=body, headers={"ETag": quoted, "Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    asyncio.run(serve(data, *sys.argv[2:4]))
