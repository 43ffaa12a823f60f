"""The web app through a real local server: content types, caching, compression, safety."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import struct
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from feeder import web as feeder_web
from feeder.config import Config, config_from_dict
from feeder.web import (
    CachedFile,
    FileCache,
    accepts_gzip,
    feed_content_type,
    make_app,
    resolve_inside,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]

SECRET = "TOP-SECRET-do-not-serve"
INTERVAL = 600
MTIME = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
LAST_MODIFIED = "Tue, 02 Jan 2024 03:04:05 GMT"
IDENTITY = {"Accept-Encoding": "identity"}

RSS = (
    """<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0"><channel><title>财联社 全部</title><link>http://127.0.0.1:8080/</link>
<description>全部文章</description><ttl>10</ttl>
"""
    + "".join(
        f'<item><title>第{i}条</title><guid isPermaLink="false">tag:x,2022:{i}</guid></item>\n'
        for i in range(40)
    )
    + "</channel></rss>\n"
)
ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>全部</title><id>tag:x,2022:all</id>
<updated>2024-01-02T03:04:05Z</updated></feed>
"""
JSON_FEED = json.dumps(
    {"version": "https://jsonfeed.org/version/1.1", "title": "全部", "items": []},
    ensure_ascii=False,
)
INDEX = "<!doctype html><title>feeder</title><h1>订阅</h1>\n"
OPML = '<?xml version="1.0"?><opml version="2.0"><head/><body/></opml>\n'
FINANCE_RSS = RSS.replace("全部", "金融")


def png_bytes() -> bytes:
    """A valid 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PNG = png_bytes()
PNG_NAME = "3fa9c0ffee0123456789abcdef0123c2.png"


def write(path: Path, data: str | bytes, mtime: datetime = MTIME) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


class FakeStatus:
    """A StatusSource whose answers the test sets."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {
            "ok": True,
            "last_refresh": "2024-01-02T03:04:05+00:00",
            "result": "ok",
        }
        self.metrics = (
            '# TYPE feeder_refreshes_total counter\nfeeder_refreshes_total{result="ok"} 3\n'
        )

    def health(self) -> dict[str, Any]:
        return self.state

    def metrics_text(self) -> str:
        return self.metrics


@pytest.fixture
def config(tmp_path: Path) -> Config:
    feeds = tmp_path / "site" / "feeds"
    write(feeds / "index.html", INDEX)
    write(feeds / "index.opml", OPML)
    write(feeds / "all" / "rss.xml", RSS)
    write(feeds / "all" / "atom.xml", ATOM)
    write(feeds / "all" / "feed.json", JSON_FEED)
    write(feeds / "categories" / "金融" / "rss.xml", FINANCE_RSS)
    write(feeds / "style.css", "body { color: black }\n")
    write(tmp_path / "site" / "cache" / PNG_NAME, PNG)
    write(tmp_path / "site" / "config.yaml", SECRET)
    write(tmp_path / "secret.txt", SECRET)
    return config_from_dict(
        {
            "paths": {"feeds": "feeds", "cache": "cache", "sources": "src", "state": "state"},
            "schedule": {"interval": INTERVAL},
        },
        tmp_path / "site",
    )


@pytest.fixture
def status() -> FakeStatus:
    return FakeStatus()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, config: Config, status: FakeStatus) -> Client:
    return await aiohttp_client(make_app(config, status))


@pytest.fixture
async def raw_client(aiohttp_client: ClientFactory, config: Config, status: FakeStatus) -> Client:
    """A client that leaves gzipped bodies compressed."""
    return await aiohttp_client(make_app(config, status), auto_decompress=False)


async def raw_get(client: Client, target: str) -> tuple[int, bytes]:
    """Send ``target`` exactly as written, bypassing any client-side URL cleanup."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    writer.write(request.encode("latin-1"))
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line = response.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), response


# Content and headers


@pytest.mark.parametrize(
    ("url", "file", "content_type"),
    [
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/feeds/index.html", "index.html", "text/html; charset=utf-8"),
        ("/feeds/index.opml", "index.opml", "text/x-opml; charset=utf-8"),
        ("/feeds/all/rss.xml", "all/rss.xml", "application/rss+xml; charset=utf-8"),
        ("/feeds/all/atom.xml", "all/atom.xml", "application/atom+xml; charset=utf-8"),
        ("/feeds/all/feed.json", "all/feed.json", "application/feed+json; charset=utf-8"),
        ("/feeds/style.css", "style.css", "text/css; charset=utf-8"),
    ],
)
async def test_feed_files_served_byte_for_byte(
    client: Client, config: Config, url: str, file: str, content_type: str
) -> None:
    resp = await client.get(url, headers=IDENTITY)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == content_type
    assert await resp.read() == (config.paths.feeds / file).read_bytes()
    assert "Content-Encoding" not in resp.headers
    assert resp.headers["Cache-Control"] == f"public, max-age={INTERVAL}"
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert resp.headers["Last-Modified"] == LAST_MODIFIED
    etag = resp.headers["ETag"]
    assert etag.startswith('"')
    assert etag.endswith('"')


def test_feed_content_type_fallbacks() -> None:
    assert feed_content_type("other.xml") == "application/xml; charset=utf-8"
    assert feed_content_type("RSS.XML") == "application/rss+xml; charset=utf-8"
    assert feed_content_type("notes.txt") == "text/plain; charset=utf-8"
    assert feed_content_type("logo.png") == "image/png"
    assert feed_content_type("archive.xml.gz") == "application/octet-stream"
    assert feed_content_type("no-extension") == "application/octet-stream"


async def test_percent_encoded_chinese_category(client: Client, config: Config) -> None:
    expected = (config.paths.feeds / "categories" / "金融" / "rss.xml").read_bytes()
    url = URL("/feeds/categories/%E9%87%91%E8%9E%8D/rss.xml", encoded=True)
    resp = await client.get(url, headers=IDENTITY)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/rss+xml; charset=utf-8"
    assert await resp.read() == expected
    status, raw = await raw_get(client, "/feeds/categories/%E9%87%91%E8%9E%8D/rss.xml")
    assert status == 200
    assert raw.endswith(expected)


async def test_index_missing_is_404(client: Client, config: Config) -> None:
    (config.paths.feeds / "index.html").unlink()
    resp = await client.get("/")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("text/plain")


async def test_directory_serves_its_index(client: Client, config: Config) -> None:
    assert (await client.get("/feeds/all/")).status == 404
    assert (await client.get("/feeds/all")).status == 404
    write(config.paths.feeds / "all" / "index.html", "<p>all</p>")
    resp = await client.get("/feeds/all/", headers=IDENTITY)
    assert resp.status == 200
    assert await resp.text() == "<p>all</p>"
    resp = await client.get("/feeds/", headers=IDENTITY)
    assert await resp.text() == INDEX


async def test_head(client: Client, config: Config) -> None:
    size = (config.paths.feeds / "all" / "rss.xml").stat().st_size
    get = await client.get("/feeds/all/rss.xml", headers=IDENTITY)
    resp = await client.head("/feeds/all/rss.xml", headers=IDENTITY)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(size)
    assert resp.headers["ETag"] == get.headers["ETag"]
    assert resp.headers["Content-Type"] == "application/rss+xml; charset=utf-8"
    assert await resp.read() == b""


async def test_head_gzip_and_index(raw_client: Client) -> None:
    get = await raw_client.get("/feeds/all/rss.xml", headers={"Accept-Encoding": "gzip"})
    head = await raw_client.head("/feeds/all/rss.xml", headers={"Accept-Encoding": "gzip"})
    assert head.headers["Content-Encoding"] == "gzip"
    assert head.headers["Content-Length"] == str(len(await get.read()))
    assert (await raw_client.head("/")).status == 200


async def test_other_methods_not_allowed(client: Client) -> None:
    for url in ("/", "/feeds/all/rss.xml", f"/images/{PNG_NAME}", "/healthz"):
        assert (await client.post(url)).status == 405
        assert (await client.put(url)).status == 405


# Conditional requests


async def test_if_none_match_gives_304(client: Client) -> None:
    first = await client.get("/feeds/all/rss.xml", headers=IDENTITY)
    etag = first.headers["ETag"]
    resp = await client.get("/feeds/all/rss.xml", headers={**IDENTITY, "If-None-Match": etag})
    assert resp.status == 304
    assert resp.headers["ETag"] == etag
    assert resp.headers["Cache-Control"] == f"public, max-age={INTERVAL}"
    assert await resp.read() == b""
    assert "Content-Length" not in resp.headers or resp.headers["Content-Length"] == "0"


@pytest.mark.parametrize(
    "header",
    [
        '"nope", {etag}',
        '"nope",{etag} , "other"',
        "W/{etag}",
        "*",
    ],
)
async def test_if_none_match_lists_weak_and_star(client: Client, header: str) -> None:
    etag = (await client.get("/feeds/all/atom.xml")).headers["ETag"]
    condition = {"If-None-Match": header.format(etag=etag)}
    resp = await client.get("/feeds/all/atom.xml", headers=condition)
    assert resp.status == 304


async def test_if_none_match_other_tag_gives_200(client: Client) -> None:
    resp = await client.get("/feeds/all/atom.xml", headers={"If-None-Match": '"0123", W/"45"'})
    assert resp.status == 200
    assert await resp.text() == ATOM


async def test_if_modified_since(client: Client) -> None:
    url = "/feeds/all/feed.json"
    at = await client.get(url, headers={"If-Modified-Since": LAST_MODIFIED})
    assert at.status == 304
    assert at.headers["Last-Modified"] == LAST_MODIFIED
    assert at.headers["ETag"]
    later = format_datetime(MTIME + timedelta(days=1), usegmt=True)
    assert (await client.get(url, headers={"If-Modified-Since": later})).status == 304
    earlier = format_datetime(MTIME - timedelta(seconds=1), usegmt=True)
    resp = await client.get(url, headers={"If-Modified-Since": earlier})
    assert resp.status == 200
    assert await resp.text() == JSON_FEED
    assert (await client.get(url, headers={"If-Modified-Since": "garbage"})).status == 200


async def test_no_last_modified_while_a_change_in_the_same_second_would_share_it(
        client: Client, config: Config) -> None:
    url, path = "/feeds/all/feed.json", config.paths.feeds / "all" / "feed.json"
    write(path, JSON_FEED, datetime.now(UTC) + timedelta(seconds=1))  # just written
    fresh = await client.get(url)
    assert (fresh.status, "Last-Modified" in fresh.headers) == (200, False)
    again = await client.get(url, headers={"If-None-Match": fresh.headers["ETag"]})
    assert (again.status, "Last-Modified" in again.headers) == (304, False)
    settled = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10)
    os.utime(path, (settled.timestamp(), settled.timestamp()))
    assert (await client.get(url)).headers["Last-Modified"] == format_datetime(settled,
                                                                               usegmt=True)


async def test_if_none_match_wins_over_if_modified_since(client: Client) -> None:
    resp = await client.get(
        "/feeds/all/feed.json",
        headers={"If-None-Match": '"stale"', "If-Modified-Since": LAST_MODIFIED},
    )
    assert resp.status == 200


async def test_changed_file_gives_new_etag(client: Client, config: Config) -> None:
    path = config.paths.feeds / "all" / "rss.xml"
    old = await client.get("/feeds/all/rss.xml", headers=IDENTITY)
    old_etag = old.headers["ETag"]
    # Same size, new bytes, one second later: only the stat tells them apart.
    changed = RSS.replace("第1条", "第7条").replace("第2条", "第3条")
    assert len(changed.encode()) == len(RSS.encode())
    write(path, changed, MTIME + timedelta(seconds=1))
    resp = await client.get("/feeds/all/rss.xml", headers={**IDENTITY, "If-None-Match": old_etag})
    assert resp.status == 200
    assert await resp.text() == changed
    assert resp.headers["ETag"] != old_etag
    assert resp.headers["Last-Modified"] == "Tue, 02 Jan 2024 03:04:06 GMT"
    again = await client.get(
        "/feeds/all/rss.xml", headers={**IDENTITY, "If-None-Match": resp.headers["ETag"]}
    )
    assert again.status == 304


async def test_replaced_file_is_reread(client: Client, config: Config) -> None:
    """Writers replace files atomically: a new inode with the same size and mtime."""
    path = config.paths.feeds / "all" / "atom.xml"
    assert await (await client.get("/feeds/all/atom.xml")).text() == ATOM
    replacement = ATOM.replace("全部", "所有")
    temp = write(path.parent / ".atom.xml.tmp", replacement)
    os.replace(temp, path)
    assert await (await client.get("/feeds/all/atom.xml")).text() == replacement


async def test_deleted_file_is_404(client: Client, config: Config) -> None:
    assert (await client.get("/feeds/all/atom.xml")).status == 200
    (config.paths.feeds / "all" / "atom.xml").unlink()
    assert (await client.get("/feeds/all/atom.xml")).status == 404


# Compression


async def test_gzip_when_accepted(raw_client: Client, config: Config) -> None:
    expected = (config.paths.feeds / "all" / "rss.xml").read_bytes()
    resp = await raw_client.get("/feeds/all/rss.xml", headers={"Accept-Encoding": "gzip, br"})
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Vary"] == "Accept-Encoding"
    body = await resp.read()
    assert len(body) < len(expected)
    assert gzip.decompress(body) == expected
    plain = await raw_client.get("/feeds/all/rss.xml", headers=IDENTITY)
    assert plain.headers["ETag"] != resp.headers["ETag"]  # another representation
    # A tag revalidates its own copy only: a cache holding both sends both tags,
    # and serves the copy the 304 names.
    tags = {"identity": plain.headers["ETag"], "gzip": resp.headers["ETag"]}
    both = ", ".join(tags.values())
    for accept, etag in tags.items():
        for sent in (etag, both):
            again = await raw_client.get(
                "/feeds/all/rss.xml", headers={"Accept-Encoding": accept, "If-None-Match": sent}
            )
            assert (again.status, again.headers["ETag"]) == (304, etag)
        other = tags["gzip" if accept == "identity" else "identity"]
        again = await raw_client.get(
            "/feeds/all/rss.xml", headers={"Accept-Encoding": accept, "If-None-Match": other}
        )
        assert (again.status, again.headers["ETag"]) == (200, etag)
        body = await again.read()
        assert (gzip.decompress(body) if accept == "gzip" else body) == expected


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [
        ("gzip", True),
        ("GZIP;q=0.5", True),
        ("deflate, gzip;q=1.0, br", True),
        ("x-gzip", True),
        ("*", True),
        ("identity", False),
        ("", False),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("br", False),
        ("*;q=0", False),
        ("gzip;q=0, *", False),
        ("gzip;q=bogus", False),
    ],
)
async def test_accept_encoding(raw_client: Client, accept: str, gzipped: bool) -> None:
    assert accepts_gzip(accept) is gzipped
    resp = await raw_client.get("/feeds/all/rss.xml", headers={"Accept-Encoding": accept})
    body = await resp.read()
    if gzipped:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(body) == RSS.encode()
    else:
        assert "Content-Encoding" not in resp.headers
        assert body == RSS.encode()


async def test_tiny_file_not_gzipped(raw_client: Client, config: Config) -> None:
    write(config.paths.feeds / "tiny.txt", "x")
    resp = await raw_client.get("/feeds/tiny.txt", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == b"x"


# Large files and the cache


async def test_large_file_streamed_from_disk(
    client: Client, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feeder_web, "CACHE_MAX_FILE", 100)
    expected = (config.paths.feeds / "all" / "rss.xml").read_bytes()
    resp = await client.get("/feeds/all/rss.xml", headers=IDENTITY)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/rss+xml; charset=utf-8"
    assert resp.headers["Cache-Control"] == f"public, max-age={INTERVAL}"
    assert await resp.read() == expected
    again = await client.get("/feeds/all/rss.xml", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    assert len(client.app[feeder_web.FEED_FILES_KEY].cache) == 0


async def test_file_read_in_thread(
    client: Client, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feeder_web, "THREAD_READ_MIN", 10)
    resp = await client.get("/feeds/all/feed.json")
    assert await resp.text() == JSON_FEED


def cached(size: int, signature: tuple[int, int, int] = (1, 1, 1)) -> CachedFile:
    return CachedFile(signature, b"x" * size, None, "e", "e-gz", 0, {}, {})


def test_file_cache_is_bounded_lru() -> None:
    cache = FileCache(max_bytes=100)
    a, b, c = "/a", "/b", "/c"
    cache.put(a, cached(40))
    cache.put(b, cached(40))
    assert cache.get(a, (1, 1, 1)) is not None  # a is now the most recent
    cache.put(c, cached(40))
    assert cache.get(b, (1, 1, 1)) is None
    assert cache.get(a, (1, 1, 1)) is not None
    assert cache.size == 80
    cache.put("/huge", cached(101))
    assert len(cache) == 2
    assert cache.get(a, (2, 1, 1)) is None  # stale signature drops it
    assert cache.size == 40
    cache.put(c, cached(10))
    assert cache.size == 10


# Images


async def test_image_served_with_locked_down_headers(raw_client: Client) -> None:
    resp = await raw_client.get(f"/images/{PNG_NAME}", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert await resp.read() == PNG
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Security-Policy"] == "default-src 'none'"
    assert "Content-Encoding" not in resp.headers
    etag = resp.headers["ETag"]
    assert resp.headers["Last-Modified"] == LAST_MODIFIED
    again = await raw_client.get(f"/images/{PNG_NAME}", headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    since = await raw_client.get(
        f"/images/{PNG_NAME}", headers={"If-Modified-Since": LAST_MODIFIED}
    )
    assert since.status == 304
    part = await raw_client.get(f"/images/{PNG_NAME}", headers={"Range": "bytes=0-7"})
    assert part.status == 206
    assert await part.read() == PNG[:8]
    # A part of the copy the client has (If-Range), else the whole image: no splicing.
    for if_range, status, body in [(etag, 206, PNG[:8]), ('"another"', 200, PNG),
                                   (f"W/{etag}", 200, PNG), (LAST_MODIFIED, 206, PNG[:8]),
                                   ("Thu, 01 Jan 1998 00:00:00 GMT", 200, PNG)]:
        part = await raw_client.get(f"/images/{PNG_NAME}",
                                    headers={"Range": "bytes=0-7", "If-Range": if_range})
        assert (part.status, await part.read()) == (status, body), if_range
    head = await raw_client.head(f"/images/{PNG_NAME}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(PNG))


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("a.jpg", "image/jpeg"),
        ("b.JPEG", "image/jpeg"),
        ("c.gif", "image/gif"),
        ("d.webp", "image/webp"),
        ("e.svg", "image/svg+xml"),
        ("f.avif", "image/avif"),
    ],
)
async def test_image_types(client: Client, config: Config, name: str, content_type: str) -> None:
    write(config.paths.cache / name, b"data")
    resp = await client.get(f"/images/{name}")
    assert resp.headers["Content-Type"] == content_type
    assert resp.headers["Content-Security-Policy"] == "default-src 'none'"


async def test_image_dot_files_and_missing_are_404(client: Client, config: Config) -> None:
    write(config.paths.cache / ".3fa9.png.part", PNG)
    write(config.paths.cache / ".hidden.png", PNG)
    (config.paths.cache / "subdir").mkdir()
    write(config.paths.cache / "subdir" / "x.png", PNG)
    for url in (
        "/images/.3fa9.png.part",
        "/images/.hidden.png",
        "/images/missing.png",
        "/images/subdir",
        "/images/subdir%2Fx.png",
    ):
        resp = await client.get(URL(url, encoded=True))
        assert resp.status == 404, url
        assert await resp.read() == b"404: Not Found\n"


async def test_feed_dot_files_are_404(client: Client, config: Config) -> None:
    write(config.paths.feeds / "all" / ".rss.xml.tmp", RSS)
    write(config.paths.feeds / ".git" / "config", SECRET)
    for url in ("/feeds/all/.rss.xml.tmp", "/feeds/.git/config"):
        resp = await client.get(url)
        assert resp.status == 404
        assert SECRET not in await resp.text()


# Path safety

TRAVERSALS = [
    "/feeds/../config.yaml",
    "/feeds/../../secret.txt",
    "/feeds/all/../../config.yaml",
    "/feeds/%2e%2e/config.yaml",
    "/feeds/%2E%2E/%2E%2E/secret.txt",
    "/feeds/.%2e/config.yaml",
    "/feeds/%2e%2e%2fconfig.yaml",
    "/feeds/..%2fconfig.yaml",
    "/feeds/all/..%2F..%2Fconfig.yaml",
    "/feeds/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/feeds/..%5cconfig.yaml",
    "/feeds/all%5c..%5c..%5cconfig.yaml",
    "/feeds/..\\config.yaml",
    "/feeds/%00/../config.yaml",
    "/feeds/all/rss.xml%00",
    "/feeds/all/rss.xml%00.png",
    "/feeds/%ff%fe/../config.yaml",
    "/images/../config.yaml",
    "/images/%2e%2e/config.yaml",
    "/images/%2e%2e",
    "/images/%2e%2e%2fconfig.yaml",
    "/images/..%2fconfig.yaml",
    "/images/..%2f..%2fsecret.txt",
    "/images/..%5cconfig.yaml",
    "/images/x.png%00",
    "/images/%00",
    "/%2e%2e/config.yaml",
    "/feeds%2f..%2fconfig.yaml",
]


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_traversal_is_404(client: Client, target: str) -> None:
    status, raw = await raw_get(client, target)
    assert status == 404, raw
    assert SECRET.encode() not in raw


async def test_absolute_paths_are_404(client: Client, tmp_path: Path) -> None:
    secret = (tmp_path / "secret.txt").as_posix()
    encoded = secret.replace("/", "%2F")
    for target in (
        f"/feeds/{secret}",
        f"/feeds/{encoded}",
        f"/images/{encoded}",
        f"/images/{secret}",
        "/feeds//etc/passwd",
        "/feeds/%2Fetc%2Fpasswd",
        "/images/%2Fetc%2Fpasswd",
    ):
        status, raw = await raw_get(client, target)
        assert status == 404, target
        assert SECRET.encode() not in raw
        assert b"root:" not in raw


async def test_symlink_out_of_folder_is_404(client: Client, config: Config, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    (config.paths.feeds / "leak.xml").symlink_to(secret)
    (config.paths.feeds / "outside").symlink_to(tmp_path, target_is_directory=True)
    (config.paths.cache / "leak.png").symlink_to(secret)
    (config.paths.feeds / "loop.xml").symlink_to(config.paths.feeds / "loop.xml")
    for url in (
        "/feeds/leak.xml",
        "/feeds/outside/secret.txt",
        "/images/leak.png",
        "/feeds/loop.xml",
    ):
        resp = await client.get(url)
        assert resp.status == 404, url
        assert SECRET not in await resp.text()


async def test_symlink_inside_folder_is_served(client: Client, config: Config) -> None:
    (config.paths.feeds / "latest.xml").symlink_to(config.paths.feeds / "all" / "rss.xml")
    resp = await client.get("/feeds/latest.xml", headers=IDENTITY)
    assert resp.status == 200
    assert await resp.text() == RSS


def swap_for_symlink(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


async def test_image_swapped_for_a_symlink_after_its_check_is_404(
    aiohttp_client: ClientFactory, config: Config, tmp_path: Path
) -> None:
    images = feeder_web.ImageFiles(config.paths.cache)

    async def swapping(request: web.Request) -> web.StreamResponse:
        response = await images.respond(request, PNG_NAME)  # checked: a file in the cache
        swap_for_symlink(config.paths.cache / PNG_NAME, tmp_path / "secret.txt")
        return response  # aiohttp opens the file only now

    app = web.Application()
    app.router.add_get("/swapped", swapping)
    client = await aiohttp_client(app)
    resp = await client.get("/swapped")
    assert resp.status == 404
    assert SECRET not in await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"  # not the image's year
    assert "image/png" not in resp.headers.get("Content-Type", "")


async def test_large_feed_swapped_for_a_symlink_after_its_check_is_404(
    aiohttp_client: ClientFactory, config: Config, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feeder_web, "CACHE_MAX_FILE", 100)  # streamed from disk
    feeds = feeder_web.FeedFiles(config.paths.feeds, max_age=INTERVAL)

    async def swapping(request: web.Request) -> web.StreamResponse:
        response = await feeds.respond(request, "all/rss.xml")
        swap_for_symlink(config.paths.feeds / "all" / "rss.xml", tmp_path / "secret.txt")
        return response

    app = web.Application()
    app.router.add_get("/swapped", swapping)
    client = await aiohttp_client(app)
    resp = await client.get("/swapped")
    assert resp.status == 404
    assert SECRET not in await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(("headers", "status", "body"), [
    ({}, 200, FINANCE_RSS), ({"Range": "bytes=0-4"}, 206, FINANCE_RSS[:5]),
    ({"If-None-Match": "*"}, 304, ""),
])
async def test_large_feed_renamed_over_after_its_check_is_the_new_one(
    aiohttp_client: ClientFactory, config: Config, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], status: int, body: str,
) -> None:
    """A refresh renames a new feed over the old one: that one is served, checked again."""
    monkeypatch.setattr(feeder_web, "CACHE_MAX_FILE", 100)  # streamed from disk
    feeds = feeder_web.FeedFiles(config.paths.feeds, max_age=INTERVAL)

    async def renaming(request: web.Request) -> web.StreamResponse:
        response = await feeds.respond(request, "all/rss.xml")
        write(tmp_path / "new.xml", FINANCE_RSS).rename(config.paths.feeds / "all" / "rss.xml")
        return response

    app = web.Application()
    app.router.add_get("/renamed", renaming)
    client = await aiohttp_client(app)
    resp = await client.get("/renamed", headers={**IDENTITY, **headers})
    assert resp.status == status
    assert await resp.text() == body


@pytest.mark.parametrize("thread_read_min", [10**9, 10])
async def test_feed_replaced_after_its_check(
    client: Client, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    thread_read_min: int,
) -> None:
    """Renamed over by a refresh, the new file is served; swapped for a symlink, none."""
    monkeypatch.setattr(feeder_web, "THREAD_READ_MIN", thread_read_min)
    target = config.paths.feeds / "all" / "rss.xml"
    check = feeder_web.resolve_inside
    replacements: list[Callable[[], None]] = []

    def check_then_replace(root: str, tail: str) -> tuple[str, os.stat_result] | None:
        found = check(root, tail)
        if replacements:
            replacements.pop(0)()
        return found

    monkeypatch.setattr(feeder_web, "resolve_inside", check_then_replace)
    new_rss = RSS.replace("全部", "新的")
    replacements.append(lambda: write(tmp_path / "new.xml", new_rss).rename(target))
    resp = await client.get("/feeds/all/rss.xml")
    assert resp.status == 200
    assert await resp.text() == new_rss
    assert not replacements

    def rename_over() -> None:
        write(tmp_path / "new.xml", RSS).rename(target)

    rename_over()  # not cached yet
    replacements.append(lambda: swap_for_symlink(target, tmp_path / "secret.txt"))
    resp = await client.get("/feeds/all/rss.xml")
    assert resp.status == 404
    assert SECRET not in await resp.text()
    assert not replacements

    target.unlink()
    rename_over()
    replacements += [rename_over] * 3  # replaced after every check: two tries, then a 404
    resp = await client.get("/feeds/all/rss.xml")
    assert resp.status == 404
    assert len(replacements) == 1


async def test_image_never_served_from_a_stray_compressed_sibling(
    raw_client: Client, config: Config
) -> None:
    for suffix in (".gz", ".br"):
        write(config.paths.cache / (PNG_NAME + suffix), SECRET)
    resp = await raw_client.get(f"/images/{PNG_NAME}", headers={"Accept-Encoding": "gzip, br"})
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == PNG


def test_resolve_inside(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    write(root / "a" / "rss.xml", RSS)
    write(root / "金融" / "rss.xml", RSS)
    write(tmp_path.parent / "outside.txt", SECRET)
    (root / "a" / "up").symlink_to(root.parent, target_is_directory=True)
    (root / "b").symlink_to(root / "a", target_is_directory=True)
    found = resolve_inside(str(root), "a/rss.xml")
    assert found is not None
    assert found[0] == str(root / "a" / "rss.xml")
    assert found[1].st_size == len(RSS.encode())
    assert resolve_inside(str(root), "金融/rss.xml") is not None
    assert resolve_inside(str(root), "b/rss.xml") == (str(root / "a" / "rss.xml"), found[1])
    for tail in (
        "../outside.txt",
        "a/../../outside.txt",
        "./a/rss.xml",
        str(tmp_path.parent / "outside.txt"),
        "a//rss.xml",
        "a\\..\\..\\outside.txt",
        "a/rss.xml\x00",
        "a/up/outside.txt",
        "a/.hidden",
        "a/missing.xml",
        "a/rss.xml/x",
        "",
    ):
        assert resolve_inside(str(root), tail) is None, tail


# Health and metrics


async def test_healthz(client: Client, status: FakeStatus) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == status.state
    status.state = {**status.state, "ok": False, "result": "failed: disk full"}
    resp = await client.get("/healthz")
    assert resp.status == 503
    assert (await resp.json())["result"] == "failed: disk full"


async def test_metrics(client: Client, status: FakeStatus) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert await resp.text() == status.metrics


async def test_app_keys_hold_config_and_status(
    client: Client, config: Config, status: FakeStatus
) -> None:
    assert client.app[feeder_web.CONFIG_KEY] is config
    assert client.app[feeder_web.STATUS_KEY] is status
