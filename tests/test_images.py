"""Images: extraction and rewriting in HTML, and downloads from a local fake img.cls.cn."""

from __future__ import annotations

import asyncio
import html as html_lib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feeder import __version__
from feeder import images as images_module
from feeder.config import ImagesConfig
from feeder.exceptions import ImageError
from feeder.imagehtml import is_allowed, rewrite_image_urls
from feeder.images import (
    _TASK_BATCH,
    BUFFER_BYTES,
    CachedImage,
    FailedImage,
    _is_public,
    cache_name,
    fetch_images,
    find_cached,
    mirror_url,
    retry_delay,
    sniff_image,
    split_refused,
)
from feeder.sources import SourceParser
from tests.conftest import article_text
from tests.imagerefs import extract_image_urls
from tests.imageserver import (
    GIF,
    HTML_PAGE,
    JPEG,
    PNG,
    SVG,
    WEBP,
    Handler,
    ImageServer,
    chunked,
    gzipped,
    hang,
    image,
    png_of_size,
    redirect,
    sequence,
    short_body,
    status,
    with_headers,
)

ORIGIN = "https://img.cls.cn"
SEED = Path(__file__).resolve().parents[1] / "sources" / "cls-seed.md"
SEED_IMAGES = [
    f"{ORIGIN}/images/20220330/{name}.png"
    for name in ("8ZNa70Fbl8", "c8Agbj08W6", "9qWTc0F18E", "onulZV1B5w")
]


@pytest.fixture
async def server():
    async with ImageServer() as server:
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def config_for(server: ImageServer, **changes) -> ImagesConfig:
    """Images config sending img.cls.cn to the fake server, with short limits for tests."""
    return ImagesConfig(**{"origins": {ORIGIN: server.url}, "timeout": 5.0, **changes})


def files(cache: Path) -> list[str]:
    """Every file in the cache, temp files (dot-prefixed) included."""
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


async def fetch_one(url: str, config: ImagesConfig, cache: Path) -> CachedImage | FailedImage:
    [result] = await fetch_images([url], config, cache)
    return result


# -- downloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "mime", "extension"),
    [(PNG, "image/png", ".png"), (JPEG, "image/jpeg", ".jpg"), (GIF, "image/gif", ".gif"),
     (WEBP, "image/webp", ".webp")],
)
async def test_image_is_cached_under_hash_and_real_extension(server, cache, body, mime, extension):
    # The server claims PNG for every body: the format comes from the bytes.
    server.route("/images/a", image(body, "image/png"))
    result = await fetch_one(f"{ORIGIN}/images/a", config_for(server), cache)
    assert result == CachedImage(
        url=f"{ORIGIN}/images/a", name=cache_name(f"{ORIGIN}/images/a", extension),
        size=len(body), mime=mime,
    )
    assert result.name.endswith(extension)
    assert len(result.name) == 32 + len(extension)
    assert (cache / result.name).read_bytes() == body
    assert files(cache) == [result.name]


async def test_sends_user_agent_and_never_cookies(server, cache):
    server.route("/images/a.png", with_headers(image(PNG), {"Set-Cookie": "session=secret"}))
    server.route("/images/b.png", image(PNG))
    config = config_for(server, concurrency=1, per_host=1)
    results = await fetch_images([f"{ORIGIN}/images/a.png", f"{ORIGIN}/images/b.png"],
                                 config, cache)
    assert all(isinstance(result, CachedImage) for result in results)
    assert [headers["User-Agent"] for headers in server.headers] == [f"feeder/{__version__}"] * 2
    assert "Cookie" not in server.headers[1]


@pytest.mark.parametrize("code", [404, 410, 403])
async def test_client_error_is_permanent_and_not_retried(server, cache, code):
    server.route("/images/gone.png", status(code))
    result = await fetch_one(f"{ORIGIN}/images/gone.png", config_for(server), cache)
    assert result == FailedImage(f"{ORIGIN}/images/gone.png", f"HTTP {code}", True, None)
    assert server.requests["/images/gone.png"] == 1
    assert files(cache) == []


async def test_server_error_is_retried_within_the_call(server, cache):
    server.route("/images/a.png", sequence(status(500), image(PNG)))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert isinstance(result, CachedImage)
    assert server.requests["/images/a.png"] == 2


async def test_server_error_gives_up_after_the_configured_attempts(server, cache):
    server.route("/images/a.png", status(502))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server, attempts=3), cache)
    assert result == FailedImage(f"{ORIGIN}/images/a.png", "HTTP 502", False, None)
    assert server.requests["/images/a.png"] == 3


async def test_429_short_retry_after_is_waited_for(server, cache):
    server.route("/images/a.png", sequence(status(429, {"Retry-After": "1"}), image(PNG)))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert isinstance(result, CachedImage)
    assert server.requests["/images/a.png"] == 2


async def test_429_long_retry_after_is_left_to_the_next_refresh(server, cache):
    server.route("/images/a.png", status(429, {"Retry-After": "120"}))
    started = time.monotonic()
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert result == FailedImage(f"{ORIGIN}/images/a.png", "HTTP 429", False, 120.0)
    assert server.requests["/images/a.png"] == 1
    assert time.monotonic() - started < 5


def first_answer(first: Handler, then: Handler, arrivals: list[float]) -> Handler:
    """``first`` for the server's first request, whatever its path; ``then`` for others."""

    async def handler(request):
        arrivals.append(time.monotonic())
        return await (first if len(arrivals) == 1 else then)(request)

    return handler


async def test_a_short_retry_after_holds_every_download_from_the_host(server, cache):
    arrivals: list[float] = []
    server.default = first_answer(status(429, {"Retry-After": "1"}), image(PNG), arrivals)
    urls = [f"{ORIGIN}/images/{n}.png" for n in range(6)]
    results = await fetch_images(urls, config_for(server, per_host=2), cache)
    assert all(isinstance(result, CachedImage) for result in results)
    # The one asked at the same time as the first may be on its way; no other is.
    assert sum(arrival - arrivals[0] < 1 for arrival in arrivals) <= 2


async def test_a_long_retry_after_leaves_every_image_of_the_host_to_the_next_refresh(
        server, cache):
    arrivals: list[float] = []
    server.default = first_answer(status(429, {"Retry-After": "120"}), image(PNG), arrivals)
    urls = [f"{ORIGIN}/images/{n}.png" for n in range(6)]
    results = await fetch_images(urls, config_for(server, per_host=1), cache)
    # Only the image asked for failed; the others, never asked for, are pending.
    assert results == [FailedImage(urls[0], "HTTP 429", False, 120.0)]
    assert server.total_requests == 1


async def test_503_retry_after_as_http_date(server, cache):
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    server.route("/images/a.png", status(503, {"Retry-After": later}))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert isinstance(result, FailedImage)
    assert not result.permanent
    assert result.retry_after == pytest.approx(3600, abs=60)
    assert server.requests["/images/a.png"] == 1


async def test_slow_server_times_out_and_leaves_no_file(server, cache):
    server.route("/images/slow.png", image(PNG, delay=3))
    config = config_for(server, timeout=0.5, attempts=1)
    result = await fetch_one(f"{ORIGIN}/images/slow.png", config, cache)
    assert result == FailedImage(f"{ORIGIN}/images/slow.png", "timed out", False, None)
    assert files(cache) == []


async def test_body_stalling_mid_download_times_out_and_leaves_no_file(server, cache):
    server.route("/images/stall.png", hang(head=PNG))
    config = config_for(server, timeout=0.5, attempts=1)
    result = await fetch_one(f"{ORIGIN}/images/stall.png", config, cache)
    assert isinstance(result, FailedImage)
    assert result.error == "timed out"
    assert files(cache) == []


@pytest.mark.parametrize("serve", [image, chunked], ids=["content-length", "chunked"])
@pytest.mark.parametrize("cap", [100_000, 2 * BUFFER_BYTES], ids=["in-memory", "streamed"])
async def test_body_over_max_bytes_is_refused(server, cache, serve, cap):
    server.route("/images/big.png", serve(png_of_size(3 * cap)))
    config = config_for(server, max_bytes=cap)
    result = await fetch_one(f"{ORIGIN}/images/big.png", config, cache)
    assert result == FailedImage(
        f"{ORIGIN}/images/big.png", f"larger than {cap} bytes", True, None
    )
    assert server.requests["/images/big.png"] == 1
    assert files(cache) == []  # no .part left either


async def test_a_gzipped_body_is_held_to_max_bytes_once_decoded(server, cache):
    cap = 1024 * 1024
    server.route("/images/bomb.png", gzipped(png_of_size(64 * cap)))  # 64 KB on the wire
    server.route("/images/small.png", gzipped(png_of_size(cap)))
    config = config_for(server, max_bytes=cap)
    bomb, small = await fetch_images(
        [f"{ORIGIN}/images/bomb.png", f"{ORIGIN}/images/small.png"], config, cache)
    assert bomb == FailedImage(f"{ORIGIN}/images/bomb.png", f"larger than {cap} bytes", True,
                               None)
    assert isinstance(small, CachedImage)
    assert (cache / small.name).read_bytes() == png_of_size(cap)  # cached decoded
    assert files(cache) == [small.name]


@pytest.mark.parametrize("size", [200_000, 3 * BUFFER_BYTES], ids=["in-memory", "streamed"])
async def test_chunked_body_within_max_bytes_is_cached(server, cache, size):
    body = png_of_size(size)
    server.route("/images/big.png", chunked(body, chunk_size=7_000))
    result = await fetch_one(f"{ORIGIN}/images/big.png", config_for(server), cache)
    assert isinstance(result, CachedImage)
    assert result.size == len(body)
    assert (cache / result.name).read_bytes() == body
    assert files(cache) == [result.name]


@pytest.mark.parametrize("size", [200_000, 3 * BUFFER_BYTES], ids=["in-memory", "streamed"])
async def test_an_image_the_cache_cannot_take_fails_naming_why(server, cache, size):
    url = f"{ORIGIN}/images/a.png"
    server.route("/images/a.png", image(png_of_size(size)))
    # A folder where the image's file belongs: the rename fails, even as root.
    (cache / cache_name(url, ".png") / "x").mkdir(parents=True)
    [result, after] = await fetch_images([url, f"{ORIGIN}/images/b.png"],
                                         config_for(server, attempts=1), cache)
    assert result == FailedImage(url, "cannot write to the cache: Is a directory", False, None)
    assert files(cache) == [cache_name(url, ".png")]  # no temp file left
    assert isinstance(after, FailedImage)  # 404: the next download goes on


async def test_many_images_at_once_each_written_or_failing_alone(server, cache):
    # Images arriving together are written together: one the cache cannot take
    # fails alone, and every other is cached whole.
    bodies = {f"{ORIGIN}/images/{i}.png": png_of_size(1000 + i) for i in range(60)}
    for url, body in bodies.items():
        server.route(url.removeprefix(ORIGIN), image(body))
    refused = list(bodies)[::7]
    for url in refused:
        (cache / cache_name(url, ".png") / "x").mkdir(parents=True)
    results = await fetch_images(bodies, config_for(server, attempts=1, concurrency=16), cache)
    assert [r.url for r in results] == list(bodies)
    for result in results:
        if result.url in refused:
            assert result == FailedImage(result.url, "cannot write to the cache: Is a directory",
                                         False, None)
        else:
            assert (cache / result.name).read_bytes() == bodies[result.url]
    assert not [name for name in files(cache) if name.startswith(".")]  # no temp file left


class RefusingAfter(ThreadPoolExecutor):
    """An executor that takes ``count`` jobs, then refuses, as one shut down does."""

    def __init__(self, count: int) -> None:
        super().__init__(1)
        self.count = count

    def submit(self, *args, **kwargs):
        self.count -= 1
        if self.count < 0:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return super().submit(*args, **kwargs)


async def test_writes_with_no_thread_to_run_in_fail_loudly(server, cache, caplog):
    url = f"{ORIGIN}/images/a.png"
    server.route("/images/a.png", image(PNG + bytes(100)))
    loop = asyncio.get_running_loop()
    # Making the cache folder, checking the URLs, listing the cache: then the write.
    loop.set_default_executor(executor := RefusingAfter(3))
    try:
        [result] = await fetch_images([url], config_for(server), cache)
    finally:
        executor.shutdown()
    assert isinstance(result, FailedImage)
    assert result.error.startswith("unexpected error: RuntimeError: ")
    assert "after shutdown" in result.error
    assert "unexpected error while fetching" in caplog.text
    assert files(cache) == []


async def test_html_page_with_status_200_is_not_an_image(server, cache):
    server.route("/images/a.png", image(HTML_PAGE, "text/html"))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert result == FailedImage(
        f"{ORIGIN}/images/a.png", "not an image (text/html body)", True, None
    )
    assert server.requests["/images/a.png"] == 1
    assert files(cache) == []


@pytest.mark.parametrize("content_type", ["image/svg+xml", "image/png"])
async def test_svg_is_refused(server, cache, content_type):
    server.route("/images/a.svg", image(SVG, content_type))
    result = await fetch_one(f"{ORIGIN}/images/a.svg", config_for(server), cache)
    assert isinstance(result, FailedImage)
    assert result.permanent
    assert result.error.startswith("SVG refused")
    assert files(cache) == []


async def test_empty_body_is_not_an_image(server, cache):
    server.route("/images/a.png", image(b""))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert isinstance(result, FailedImage)
    assert result.error == "not an image (empty body)"


async def test_body_shorter_than_content_length_fails_and_leaves_no_file(server, cache):
    server.route("/images/cut.png", short_body(png_of_size(1000), claimed=5000))
    config = config_for(server, attempts=2)
    result = await fetch_one(f"{ORIGIN}/images/cut.png", config, cache)
    assert result == FailedImage(
        f"{ORIGIN}/images/cut.png", "body shorter than Content-Length", False, None
    )
    assert server.requests["/images/cut.png"] == 2  # worth a retry
    assert files(cache) == []


async def test_disallowed_host_is_never_requested(server, cache):
    server.route("/images/a.png", image(PNG))
    urls = ["https://evil.example/images/a.png", f"{ORIGIN}/images/a.png", "ftp://img.cls.cn/a"]
    results = await fetch_images(urls, config_for(server), cache)
    assert [type(result) for result in results] == [FailedImage, CachedImage, FailedImage]
    assert results[0] == FailedImage(urls[0], "host evil.example is not allowed", True, None)
    assert results[2].permanent
    assert server.total_requests == 1


async def test_many_urls_each_fetched_once_results_in_order(server, cache):
    # More URLs than one batch of downloads started at a time, refused ones between.
    count = 2 * _TASK_BATCH + 88
    urls = []
    for i in range(count):
        server.route(f"/images/{i}.png", image(PNG))
        urls.append(f"{ORIGIN}/images/{i}.png")
        if i % 100 == 0:
            urls.append(f"https://evil.example/{i}.png")
    results = await fetch_images(urls, config_for(server), cache)
    assert [result.url for result in results] == urls
    assert sum(isinstance(result, CachedImage) for result in results) == count
    assert server.total_requests == count
    assert len(files(cache)) == count


async def test_deadline_while_downloads_are_still_being_started(server, cache):
    for i in range(2 * _TASK_BATCH):
        server.route(f"/images/{i}.png", hang(head=PNG))
    urls = [f"{ORIGIN}/images/{i}.png" for i in range(2 * _TASK_BATCH)]
    assert await fetch_images(urls, config_for(server, timeout=30.0), cache, deadline=0) == []
    assert files(cache) == []


# -- redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    ["/images/new.png", "new.png", f"{ORIGIN}/images/new.png"],
    ids=["mirror-absolute-path", "mirror-relative", "origin-url"],
)
async def test_redirect_to_allowed_image_is_followed(server, cache, location):
    server.route("/images/old.png", redirect(location, 301))
    server.route("/images/new.png", image(JPEG))
    result = await fetch_one(f"{ORIGIN}/images/old.png", config_for(server), cache)
    # Cached under the URL the article names, not the one it redirected to.
    assert result == CachedImage(
        f"{ORIGIN}/images/old.png", cache_name(f"{ORIGIN}/images/old.png", ".jpg"),
        len(JPEG), "image/jpeg",
    )
    assert server.requests["/images/new.png"] == 1


@pytest.mark.parametrize(
    "location", ["https://evil.example/x.png", "http://127.0.0.1:1/x.png", "file:///etc/passwd"]
)
async def test_redirect_to_disallowed_host_fails(server, cache, location):
    server.route("/images/a.png", redirect(location))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert isinstance(result, FailedImage)
    assert result.permanent
    assert result.error.startswith("redirect to disallowed host")
    assert server.total_requests == 1


async def test_redirect_to_disallowed_host_names_it(server, cache):
    server.route("/images/a.png", redirect("https://evil.example/x.png"))
    result = await fetch_one(f"{ORIGIN}/images/a.png", config_for(server), cache)
    assert isinstance(result, FailedImage)
    assert result.error == "redirect to disallowed host evil.example"


@pytest.mark.parametrize("location", ["http://[::1", "//[x/a.png", "https://img.cls.cn]/a.png"])
async def test_a_redirect_to_no_valid_url_fails_that_image_alone(server, cache, location):
    server.route("/images/bad.png", redirect(location))
    server.route("/images/good.png", image(PNG))
    bad, good = await fetch_images([f"{ORIGIN}/images/bad.png", f"{ORIGIN}/images/good.png"],
                                   config_for(server), cache)
    assert bad == FailedImage(f"{ORIGIN}/images/bad.png",
                              f"redirect to invalid URL {location!r}", True, None)
    assert isinstance(good, CachedImage)


async def test_a_bug_in_one_download_fails_that_image_alone_and_is_logged(
        server, cache, monkeypatch, caplog):
    server.default = image(PNG)
    sniff = images_module.sniff_image

    def sniff_or_bug(head: bytes) -> tuple[str, str] | None:
        if head.startswith(GIF[:6]):
            raise KeyError("gif")
        return sniff(head)

    monkeypatch.setattr(images_module, "sniff_image", sniff_or_bug)
    server.default = image(GIF, "image/gif")
    server.route("/images/a.png", image(PNG))
    urls = [f"{ORIGIN}/images/a.png", *(f"{ORIGIN}/images/{n}.gif" for n in range(3))]
    fine, *bugs = await fetch_images(urls, config_for(server), cache)
    assert isinstance(fine, CachedImage)
    assert bugs == [FailedImage(url, "unexpected error: KeyError: 'gif'", False, None)
                    for url in urls[1:]]
    first, rest = [r for r in caplog.records if r.levelname == "ERROR"]  # not one each
    assert first.getMessage().endswith(".gif: unexpected error while fetching")
    assert first.exc_info is not None
    assert rest.getMessage() == "2 more images failed with an unexpected error"


async def test_a_bug_in_reporting_a_result_is_raised(server, cache):
    server.default = image(PNG)

    def on_result(result: object) -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError, match="bug"):
        await fetch_images([f"{ORIGIN}/images/a.png"], config_for(server), cache,
                           on_result=on_result)


async def test_redirect_loop_fails_after_three_hops(server, cache):
    server.route("/images/loop.png", redirect("/images/loop.png"))
    result = await fetch_one(f"{ORIGIN}/images/loop.png", config_for(server), cache)
    assert result == FailedImage(
        f"{ORIGIN}/images/loop.png", "too many redirects (more than 3)", True, None
    )
    assert server.requests["/images/loop.png"] == 4  # the request and three hops


async def test_the_timeout_holds_for_all_redirects_together(server, cache):
    for n in range(3):  # each hop well within the timeout, all of them not
        server.route(f"/images/{n}.png", redirect(f"/images/{n + 1}.png", delay=0.3))
    server.route("/images/3.png", image(PNG, delay=0.3))
    config = config_for(server, timeout=1.0, attempts=1)
    result = await fetch_one(f"{ORIGIN}/images/0.png", config, cache)
    assert result == FailedImage(f"{ORIGIN}/images/0.png", "timed out", False, None)
    assert files(cache) == []


async def test_three_redirects_are_followed(server, cache):
    for n in range(3):
        server.route(f"/images/{n}.png", redirect(f"/images/{n + 1}.png"))
    server.route("/images/3.png", image(PNG))
    result = await fetch_one(f"{ORIGIN}/images/0.png", config_for(server), cache)
    assert isinstance(result, CachedImage)


# -- address safety -----------------------------------------------------------------------


async def test_allowed_host_resolving_to_loopback_is_refused(server, cache):
    server.route("/x.png", image(PNG))
    config = ImagesConfig(allowed_hosts=("localhost",), timeout=5.0)
    url = f"http://localhost:{server.port}/x.png"
    result = await fetch_one(url, config, cache)
    assert isinstance(result, FailedImage)
    assert result.permanent
    assert "non-public address" in result.error
    assert server.total_requests == 0


async def test_allowed_literal_loopback_address_is_refused(server, cache):
    server.route("/x.png", image(PNG))
    config = ImagesConfig(allowed_hosts=("127.0.0.1",), timeout=5.0)
    result = await fetch_one(f"http://127.0.0.1:{server.port}/x.png", config, cache)
    assert isinstance(result, FailedImage)
    assert "non-public address" in result.error
    assert server.total_requests == 0


async def test_mirror_host_by_name_may_be_loopback(server, cache):
    server.route("/images/a.png", image(PNG))
    config = ImagesConfig(origins={ORIGIN: f"http://localhost:{server.port}"}, timeout=5.0)
    result = await fetch_one(f"{ORIGIN}/images/a.png", config, cache)
    assert isinstance(result, CachedImage)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False),
        ("192.168.1.1", False), ("169.254.169.254", False), ("0.0.0.0", False),
        ("100.64.0.1", False), ("224.0.0.1", False), ("240.0.0.1", False),
        ("255.255.255.255", False), ("::1", False), ("::", False), ("fc00::1", False),
        ("fd12:3456::1", False), ("fe80::1%eth0", False), ("ff02::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:0.0.0.0", False),
        ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("::ffff:93.184.216.34", True), ("2002:7f00:1::1", False), ("2002:a00:1::1", False),
        ("2002:5db8:d822::1", True), ("fec0::1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ],
)
def test_public_addresses(address, public):
    assert _is_public(address) is public


# -- many URLs, limits, deadline, cancellation ---------------------------------------------


async def test_same_url_many_times_is_fetched_once(server, cache):
    server.route("/images/a.png", image(PNG))
    seen = []
    results = await fetch_images([f"{ORIGIN}/images/a.png"] * 100, config_for(server), cache,
                                 on_result=seen.append)
    assert len(results) == 1
    assert seen == results
    assert server.requests["/images/a.png"] == 1


async def test_overall_concurrency_is_bounded(server, cache):
    server.default = image(PNG, delay=0.01)
    urls = [f"{ORIGIN}/images/{n}.png" for n in range(100)]
    seen = []
    results = await fetch_images(urls, config_for(server, concurrency=4, per_host=8), cache,
                                 on_result=seen.append)
    assert [result.url for result in results] == urls
    assert all(isinstance(result, CachedImage) for result in results)
    assert len(seen) == 100
    assert 1 < server.max_in_flight <= 4
    assert len(files(cache)) == 100


async def test_per_host_concurrency_is_bounded(cache):
    async with ImageServer() as first, ImageServer() as second:
        first.default = second.default = image(PNG, delay=0.02)
        config = ImagesConfig(
            allowed_hosts=("img.cls.cn", "img2.cls.cn"),
            origins={ORIGIN: first.url, "https://img2.cls.cn": second.url},
            concurrency=16, per_host=2, timeout=5.0,
        )
        urls = [f"https://{host}/images/{n}.png" for n in range(20)
                for host in ("img.cls.cn", "img2.cls.cn")]
        results = await fetch_images(urls, config, cache)
    assert all(isinstance(result, CachedImage) for result in results)
    assert first.total_requests == second.total_requests == 20
    assert 1 < first.max_in_flight <= 2
    assert 1 < second.max_in_flight <= 2


async def test_deadline_returns_finished_results_only(server, cache):
    server.route("/images/fast.png", image(PNG))
    server.route("/images/slow.png", hang(head=PNG))
    urls = [f"{ORIGIN}/images/slow.png", f"{ORIGIN}/images/fast.png"]
    started = time.monotonic()
    results = await fetch_images(urls, config_for(server, timeout=30.0), cache, deadline=0.5)
    assert time.monotonic() - started < 10
    assert [result.url for result in results] == [f"{ORIGIN}/images/fast.png"]
    assert files(cache) == [results[0].name]  # no .part left by the slow one


async def test_deadline_defaults_to_config(server, cache):
    server.route("/images/slow.png", hang(head=PNG))
    config = config_for(server, timeout=30.0, deadline=0.3)
    assert await fetch_images([f"{ORIGIN}/images/slow.png"], config, cache) == []
    assert files(cache) == []


async def test_deadline_after_a_failed_attempt_gives_that_failure(server, cache):
    server.route("/images/slow.png", hang(head=PNG))
    config = config_for(server, timeout=0.3, attempts=3, deadline=1.0)
    url = f"{ORIGIN}/images/slow.png"
    assert await fetch_images([url], config, cache) == [FailedImage(url, "timed out", False, None)]
    assert files(cache) == []


async def test_cancelled_download_leaves_no_file(server, cache):
    # Past the size held in memory, so that the download is streamed to a .part file.
    server.route("/images/slow.png", hang(head=PNG + bytes(BUFFER_BYTES + 1)))
    task = asyncio.create_task(
        fetch_images([f"{ORIGIN}/images/slow.png"], config_for(server, timeout=30.0), cache)
    )
    for _ in range(500):  # until the download has started writing
        if any(name.endswith(".part") for name in files(cache)):
            break
        await asyncio.sleep(0.01)
    [part] = files(cache)
    assert part.startswith(".")
    assert part.endswith(".part")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files(cache) == []


async def test_no_urls(cache):
    assert await fetch_images([], ImagesConfig(), cache) == []


# -- HTML ---------------------------------------------------------------------------------


def seed_body() -> str:
    return SEED.read_text(encoding="utf-8").split("---", 2)[2]


def test_extract_from_the_seed_article():
    assert extract_image_urls(seed_body()) == SEED_IMAGES


def test_extract_every_kind_of_reference_in_document_order():
    html = f"""
    <p>intro <img src="{ORIGIN}/a.png" srcset="{ORIGIN}/a.png 1x, {ORIGIN}/a2.png 2x"></p>
    <img data-src="{ORIGIN}/lazy.png" src="data:image/gif;base64,R0lGOD">
    <img data-original="{ORIGIN}/orig.jpg">
    <img data-srcset="{ORIGIN}/s1.png 480w,{ORIGIN}/s2.png 800w">
    <picture>
      <source srcset="{ORIGIN}/p.webp" type="image/webp">
      <source media="(min-width: 800px)" srcset="{ORIGIN}/p1.avif 1x, {ORIGIN}/p2.avif 2x">
      <img src="  {ORIGIN}/p.png  ">
    </picture>
    <img src="/relative.png"><img src="//img.cls.cn/scheme-relative.png">
    <img src="javascript:alert(1)"><a href="{ORIGIN}/not-an-image.png">link</a>
    <img src="http://other.example/x.gif">
    """
    assert extract_image_urls(html) == [
        f"{ORIGIN}/a.png", f"{ORIGIN}/a2.png", f"{ORIGIN}/lazy.png", f"{ORIGIN}/orig.jpg",
        f"{ORIGIN}/s1.png", f"{ORIGIN}/s2.png", f"{ORIGIN}/p.webp", f"{ORIGIN}/p1.avif",
        f"{ORIGIN}/p2.avif", f"{ORIGIN}/p.png", "http://other.example/x.gif",
    ]


def test_extract_srcset_urls_with_commas():
    html = f'<img srcset="{ORIGIN}/a.png?w=1,2 1x,{ORIGIN}/b.png, {ORIGIN}/c.png 2x">'
    assert extract_image_urls(html) == [
        f"{ORIGIN}/a.png?w=1,2", f"{ORIGIN}/b.png", f"{ORIGIN}/c.png"
    ]


@pytest.mark.parametrize(
    "html", ["", "   ", "<", "</p>", "\x00", "<img", "<img src=>", "<?xml version='1.0'?>",
             "<p><img src='https://img.cls.cn/x.png'<div></p", "<img srcset=', , ,'>"]
)
def test_extract_survives_broken_html(html):
    assert isinstance(extract_image_urls(html), list)


def test_extract_from_unclosed_tags():
    html = "<div><p>text<img src='https://img.cls.cn/x.png'><table><td><img src='https://img.cls.cn/y.png'"
    assert extract_image_urls(html) == [f"{ORIGIN}/x.png", f"{ORIGIN}/y.png"]


def test_rewrite_without_relevant_keys_returns_the_same_string():
    html = seed_body()
    assert rewrite_image_urls(html, {}) is html
    assert rewrite_image_urls(html, {f"{ORIGIN}/elsewhere.png": "/images/x.png"}) is html


def test_rewrite_seed_changes_only_the_mapped_urls():
    html = seed_body()
    mapping = {SEED_IMAGES[0]: "http://127.0.0.1:8080/images/0.png",
               SEED_IMAGES[2]: "http://127.0.0.1:8080/images/2.png"}
    expected = html
    for old, new in mapping.items():
        expected = expected.replace(old, new)
    assert rewrite_image_urls(html, mapping) == expected


def test_rewrite_keeps_leading_text_and_several_top_level_elements():
    html = f'intro &amp; <b>bold</b><img src="{ORIGIN}/a.png" alt="x"> tail<p>one</p><p>two</p>'
    assert rewrite_image_urls(html, {f"{ORIGIN}/a.png": "/images/a.png"}) == (
        'intro &amp; <b>bold</b><img src="/images/a.png" alt="x"> tail<p>one</p><p>two</p>'
    )


def test_rewrite_srcset_candidates_keeping_descriptors():
    html = (
        f'<picture><source srcset="{ORIGIN}/a.webp 1x, {ORIGIN}/b.webp 2x">'
        f'<img src="{ORIGIN}/a.png" srcset="{ORIGIN}/a.png 480w, {ORIGIN}/c.png 800w"'
        f' data-src="{ORIGIN}/c.png"></picture>'
    )
    mapping = {f"{ORIGIN}/a.png": "/images/A.png", f"{ORIGIN}/b.webp": "/images/B.webp",
               f"{ORIGIN}/c.png": "/images/C.png"}
    assert rewrite_image_urls(html, mapping) == (
        f'<picture><source srcset="{ORIGIN}/a.webp 1x, /images/B.webp 2x">'
        '<img src="/images/A.png" srcset="/images/A.png 480w, /images/C.png 800w"'
        ' data-src="/images/C.png"></picture>'
    )


def test_rewrite_url_written_with_entities():
    html = f'<p><img src="{ORIGIN}/a.png?x=1&amp;y=2"><img src="{ORIGIN}/b.png?&quot;"></p>'
    mapping = {f"{ORIGIN}/a.png?x=1&y=2": "/i/a.png?&", f'{ORIGIN}/b.png?"': "/images/b.png"}
    assert rewrite_image_urls(html, mapping) == (
        '<p><img src="/i/a.png?&amp;"><img src="/images/b.png"></p>'
    )


@pytest.mark.parametrize("odd", ["<", ">", "\xa0", "&lt;"])
def test_rewrite_a_url_nh3_escapes_characters_of(odd, config):
    """nh3 writes <, > and a no-break space in an attribute as entities: still found."""
    url = f"{ORIGIN}/images/a{odd}b.png"
    body = f'<p><img src="{html_lib.escape(url)}" srcset="{html_lib.escape(url)} 2x"></p>'
    article = SourceParser(config).parse("a.md", article_text("A", body).encode(),
                                         datetime(2022, 1, 1, tzinfo=UTC))
    assert article.images == (url,)
    rewritten = rewrite_image_urls(article.content, {url: "/images/x.png"})
    assert '<img src="/images/x.png" srcset="/images/x.png 2x"' in rewritten


def test_rewrite_changes_nothing_else():
    # As libxml2 would: percent-encode other URLs, nest <p> out of <b>, cut long text.
    html = (f'<b>bold <p>still bold</p></b><img src="{ORIGIN}/a.png"><img src="{ORIGIN}/中 文.png">'
            f'<a href="https://example.com/中文">x</a><p>{"long " * 2_200_000}</p>')
    rewritten = rewrite_image_urls(html, {f"{ORIGIN}/a.png": "/images/a.png"})
    assert rewritten == html.replace(f"{ORIGIN}/a.png", "/images/a.png")


def test_rewrite_leaves_links_and_unmapped_images_alone():
    html = f'<a href="{ORIGIN}/a.png">a</a><img src="{ORIGIN}/a.png"><img src="{ORIGIN}/b.png">'
    assert rewrite_image_urls(html, {f"{ORIGIN}/a.png": "/images/a.png"}) == (
        f'<a href="{ORIGIN}/a.png">a</a><img src="/images/a.png"><img src="{ORIGIN}/b.png">'
    )


_paths = st.lists(st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True), min_size=1, max_size=8)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=20)


@settings(database=None, max_examples=60, deadline=None)
@given(paths=_paths, texts=st.lists(_text, min_size=9, max_size=9), use_srcset=st.booleans())
def test_extract_and_rewrite_roundtrip(paths, texts, use_srcset):
    urls = [f"{ORIGIN}/images/{path}.png" for path in paths]
    parts = []
    for n, url in enumerate(urls):
        tag = (f'<img srcset="{url} 1x, {url}?2x 2x">' if use_srcset and n % 2
               else f'<img src="{url}">')
        parts.append(f"<p>{html_lib.escape(texts[n])}</p>{tag}")
    html = "".join(parts)
    found = extract_image_urls(html)
    expected = list(dict.fromkeys(
        u for n, url in enumerate(urls)
        for u in ([url, f"{url}?2x"] if use_srcset and n % 2 else [url])
    ))
    assert found == expected
    mapping = {url: f"http://127.0.0.1:8080/images/{n}.png" for n, url in enumerate(found)}
    rewritten = rewrite_image_urls(html, mapping)
    assert extract_image_urls(rewritten) == list(dict.fromkeys(mapping[url] for url in found))
    assert rewrite_image_urls(rewritten, mapping) is rewritten


# -- pure helpers -------------------------------------------------------------------------


def test_an_image_error_is_one_line_of_a_few_hundred_characters():
    assert ImageError("u", "broken body: 400, message:\n  Can not decode").reason == (
        "broken body: 400, message: Can not decode")
    assert len(ImageError("u", "x" * 10_000).reason) == 300


_URL_CHARS = st.text(st.sampled_from("htps:/[]@.%?#-_~aAZ09 \t\nKkſé０／"), max_size=24)


@settings(database=None, max_examples=400, deadline=None)
@given(url=_URL_CHARS | st.builds(str.__add__, st.sampled_from(
    ["http://", "HTTPS://", "https://", "http:/", " http://"]), _URL_CHARS))
def test_absolute_http_urls_are_those_urlsplit_finds_a_scheme_and_host_in(url):
    try:
        parts = urlsplit(url)
        absolute = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        absolute = False
    hosts = ("a", "t.z0", "k")
    allowed = absolute and parts.hostname.rstrip(".") in hosts
    refused, wanted = split_refused([url], ImagesConfig(allowed_hosts=hosts))
    assert wanted == ([url] if allowed else [])
    if not allowed:
        assert (refused[0].error != "not an absolute http(s) URL") == absolute


def test_is_allowed():
    config = ImagesConfig(allowed_hosts=("img.cls.cn",))
    assert is_allowed("https://img.cls.cn/images/a.png", config)
    assert is_allowed("http://IMG.CLS.CN:8080/a.png", config)
    assert not is_allowed("https://a.img.cls.cn/a.png", config)
    assert not is_allowed("https://img.cls.cn.evil.example/a.png", config)
    assert not is_allowed("https://img.cls.cn@evil.example/a.png", config)
    assert not is_allowed("ftp://img.cls.cn/a.png", config)
    assert not is_allowed("/images/a.png", config)
    assert not is_allowed("https://[::1/a.png", config)


def test_mirror_url():
    config = ImagesConfig(origins={"https://img.cls.cn": "http://127.0.0.1:9000"})
    assert mirror_url("https://img.cls.cn/images/a.png", config) == (
        "http://127.0.0.1:9000/images/a.png"
    )
    assert mirror_url("https://IMG.cls.cn:443/a.png?x=1#top", config) == (
        "http://127.0.0.1:9000/a.png?x=1"
    )
    for unchanged in ("http://img.cls.cn/a.png", "https://img.cls.cn:8443/a.png",
                      "https://other.example/a.png", "not a url"):
        assert mirror_url(unchanged, config) == unchanged
    with_path = ImagesConfig(origins={"https://img.cls.cn/images/": "http://m/base/"})
    assert mirror_url("https://img.cls.cn/images/a.png", with_path) == "http://m/base/a.png"
    assert mirror_url("https://img.cls.cn/imagesX/a.png", with_path) == (
        "https://img.cls.cn/imagesX/a.png"
    )


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (PNG, ("image/png", ".png")),
        (JPEG, ("image/jpeg", ".jpg")),
        (GIF, ("image/gif", ".gif")),
        (b"GIF87a" + b"\x00" * 10, ("image/gif", ".gif")),
        (WEBP, ("image/webp", ".webp")),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", ("image/avif", ".avif")),
        (b"BM\x36\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00", ("image/bmp", ".bmp")),
        (b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00\x20\x00", ("image/x-icon", ".ico")),
        (b"II*\x00\x08\x00\x00\x00", ("image/tiff", ".tif")),
        (SVG, None),
        (b'<?xml version="1.0"?><svg/>', None),
        (HTML_PAGE, None),
        (b"", None),
        (b"\x89PN", None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"BMW is a car brand", None),
        (b"%PDF-1.7\n", None),
    ],
)
def test_sniff_image(head, expected):
    assert sniff_image(head[:16]) == expected


def test_retry_delay_grows_and_is_capped():
    delays = [retry_delay(failures) for failures in range(1, 20)]
    assert delays[0] == timedelta(minutes=1)
    assert delays[1] == timedelta(minutes=2)
    assert delays == sorted(delays)
    assert delays[-1] == timedelta(days=1)
    assert retry_delay(10_000) == timedelta(days=1)
    assert retry_delay(0) == timedelta(0)


def test_retry_delay_honours_retry_after():
    assert retry_delay(1, retry_after=600) == timedelta(minutes=10)
    assert retry_delay(5, retry_after=1) == timedelta(minutes=16)
    assert retry_delay(1, retry_after=10**9) == timedelta(days=1)


def test_a_cached_file_counts_only_if_it_is_the_image_of_its_name(tmp_path: Path) -> None:
    urls = [f"https://img.cls.cn/images/{name}" for name in ("a.png", "b.png", "c.gif", "d")]
    (tmp_path / cache_name(urls[0], ".png")).write_bytes(PNG)
    (tmp_path / cache_name(urls[1], ".png")).write_bytes(HTML_PAGE)  # not an image
    (tmp_path / cache_name(urls[2], ".png")).write_bytes(GIF)  # a GIF under .png
    (tmp_path / ("." + cache_name(urls[3], ".png") + ".tmp")).write_bytes(PNG)  # unfinished
    found, missing = find_cached(urls, tmp_path)
    assert found == [CachedImage(urls[0], cache_name(urls[0], ".png"), len(PNG), "image/png",
                                 adopted=True)]
    assert missing == urls[1:]
    assert find_cached(urls, tmp_path / "none") == ([], urls)
