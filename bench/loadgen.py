"""A load generator for when wrk is missing.

``python -m bench.loadgen URL SECONDS CONNS [ETAG]``: ``CONNS`` keep-alive
connections each send requests back to back for ``SECONDS``; prints
``{"rps": ..., "statuses": {...}}``. Slower than wrk (it is Python), so it
understates both servers; the ratio between them is what counts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import aiohttp


async def load(url: str, seconds: float, connections: int, etag: str | None) -> dict[str, object]:
    headers = {"Accept-Encoding": "identity"}  # as wrk asks
    if etag:
        headers["If-None-Match"] = f'"{etag}"'
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                async with session.get(url) as response:
                    await response.read()
                    statuses[response.status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {"rps": sum(statuses.values()) / elapsed, "statuses": dict(statuses)}


if __name__ == "__main__":
    url, seconds, conns = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    etag = sys.argv[4] if len(sys.argv) > 4 else None
    print(json.dumps(asyncio.run(load(url, seconds, conns, etag))))
