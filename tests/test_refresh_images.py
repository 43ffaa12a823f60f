"""Images through a whole refresh: a local server plays img.cls.cn via images.origins."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import feedparser
import pytest
import yaml
from click.testing import CliRunner

from feeder.cli import cli
from feeder.config import Config, config_from_dict
from feeder.exceptions import FeederError, RefreshAbandoned
from feeder.images import BUFFER_BYTES
from feeder.refresh import open_refresher
from tests.imageserver import PNG, ImageServer, hang, image, status

SEED = Path(__file__).parents[1] / "sources" / "cls-seed.md"  # the shipped sample
SEED_IMAGES = ["8ZNa70Fbl8.png", "c8Agbj08W6.png", "9qWTc0F18E.png", "onulZV1B5w.png"]
BASE = "http://feeds.test"


def write_config(tmp_path: Path, origin: str, **images: object) -> Path:
    raw = {
        "site": {"base_url": BASE},
        "images": {"origins": {"https://img.cls.cn": origin}, "attempts": 1, "timeout": 5,
                   **images},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    (tmp_path / "sources").mkdir(exist_ok=True)
    return path


def load(path: Path) -> Config:
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), path.parent)


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    async with ImageServer() as server:
        for name in SEED_IMAGES:
            server.route(f"/images/20220330/{name}", image(PNG + name.encode()))
        yield server


async def refresh(config: Config, now: datetime | None = None):
    with open_refresher(config) as refresher:
        return await refresher.refresh(now=now)


def seed(config: Config, name: str = "cls-seed.md", text: str | None = None) -> None:
    (config.paths.sources / name).write_text(text or SEED.read_text(encoding="utf-8"),
                                             encoding="utf-8")


def parse(config: Config, file: str) -> feedparser.FeedParserDict:
    feed = feedparser.parse((config.paths.feeds / file).read_bytes())
    assert feed.bozo == 0, feed.get("bozo_exception")
    return feed


async def test_images_are_cached_and_feeds_point_at_the_cache(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    summary = await refresh(config)
    assert (summary.images_fetched, summary.images_failed, summary.images_pending) == (4, 0, 0)

    cached = {p.name: p.read_bytes() for p in config.paths.cache.iterdir()}
    assert sorted(cached.values()) == sorted(PNG + n.encode() for n in SEED_IMAGES)
    for file in ("all/rss.xml", "all/atom.xml", "categories/金融/rss.xml"):
        entry = parse(config, file).entries[0]
        content = entry.content[0].value
        assert "img.cls.cn" not in content
        for name in cached:
            assert f"{BASE}/images/{name}" in content
    page = next((config.paths.feeds / "articles").iterdir()).read_text(encoding="utf-8")
    assert "img.cls.cn" not in page
    assert f"{BASE}/images/" in page
    assert "img.cls.cn" not in (config.paths.feeds / "all/feed.json").read_text("utf-8")


async def test_an_image_a_crash_left_empty_is_fetched_again(tmp_path, server):
    """A machine's crash (not feeder's) may leave a file renamed into place, empty."""
    config = load(write_config(tmp_path, server.url))
    seed(config)
    assert (await refresh(config)).images_fetched == 4
    emptied = sorted(config.paths.cache.iterdir())[0]
    whole = emptied.read_bytes()
    emptied.write_bytes(b"")
    summary = await refresh(config)
    assert summary.images_fetched == 1
    assert emptied.read_bytes() == whole
    content = parse(config, "all/rss.xml").entries[0].content[0].value
    assert f"{BASE}/images/{emptied.name}" in content


async def test_an_article_with_a_thousand_images_points_at_each_cached_one(tmp_path, server):
    server.default = image(PNG)
    config = load(write_config(tmp_path, server.url))
    urls = [f"https://img.cls.cn/images/many/{n}.png" for n in range(1200)]
    seed(config, "many.md", "---\ntitle: Many\ncategories: [图集]\n---\n"
         + "".join(f'<p>图 {n}</p><p><img src="{url}"></p>\n' for n, url in enumerate(urls)))
    summary = await refresh(config)
    assert (summary.images_fetched, summary.images_pending) == (1200, 0)

    cached = {p.name for p in config.paths.cache.iterdir()}
    page = next((config.paths.feeds / "articles").iterdir()).read_text(encoding="utf-8")
    content = parse(config, "categories/图集/rss.xml").entries[0].content[0].value
    for html in (page, content):
        assert "img.cls.cn" not in html
        assert {name for name in cached if f"{BASE}/images/{name}" in html} == cached


async def test_a_lazy_image_shows_from_the_cache_in_readers(tmp_path, server):
    server.route("/images/中文 图.png", image(PNG + b"cn"))
    config = load(write_config(tmp_path, server.url))
    seed(config, "lazy.md", "---\ntitle: Lazy\ncategories: [A]\n---\n<p>Text.</p>\n"
         '<p><img data-src="https://img.cls.cn/images/20220330/8ZNa70Fbl8.png"></p>\n'
         '<p><img src=" https://img.cls.cn/images/中文 图.png "></p>\n')
    summary = await refresh(config)
    assert summary.images_fetched == 2
    names = [p.name for p in config.paths.cache.iterdir()]
    page = next((config.paths.feeds / "articles").iterdir()).read_text(encoding="utf-8")
    content = parse(config, "all/rss.xml").entries[0].content[0].value
    for html in (page, content):  # the other image too: the lazy one's fix kept its URL
        assert "img.cls.cn" not in html
        assert all(f'src="{BASE}/images/{name}"' in html for name in names)


async def test_enclosure_has_the_cached_file_size_and_type(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    head = next(p for p in config.paths.cache.iterdir()
            if p.read_bytes() == PNG + b"8ZNa70Fbl8.png")

    rss = parse(config, "all/rss.xml").entries[0]
    atom = parse(config, "all/atom.xml").entries[0]
    for entry in (rss, atom):
        [enclosure] = entry.enclosures
        assert enclosure.href == f"{BASE}/images/{head.name}"
        assert int(enclosure.length) == head.stat().st_size
        assert enclosure.type == "image/png"
        # feedgen 1.0.0 would make the enclosure a second alternate link: readers
        # would open the image instead of the article.
        assert entry.link.startswith(f"{BASE}/feeds/articles/")
    atom_links = [(link.rel, link.href) for link in atom.links]
    assert atom_links.count(("alternate", atom.link)) == 1
    assert ("enclosure", f"{BASE}/images/{head.name}") in atom_links

    item = json.loads((config.paths.feeds / "all/feed.json").read_text("utf-8"))["items"][0]
    assert item["image"] == f"{BASE}/images/{head.name}"
    assert item["attachments"][0]["size_in_bytes"] == head.stat().st_size


async def test_status_shows_each_failing_image_on_one_line(tmp_path, server):
    """A URL may hold a line end (``&#10;``): shown escaped, it forges no line of output."""
    config = load(write_config(tmp_path, server.url))
    seed(config, "forged.md", "---\ntitle: F\n---\n<p><img src=\"https://img.cls.cn/a.png"
                              "&#10;failing source forged.md: hacked\"></p>\n")
    assert (await refresh(config)).images_failed == 1
    args = ["-c", str(tmp_path / "config.yaml"), "status"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    images = [line for line in result.output.splitlines() if "img.cls.cn" in line]
    assert images == [
        "failing image https://img.cls.cn/a.png\\x0afailing source forged.md: hacked: HTTP 404 "
        + images[0].partition("HTTP 404 ")[2]]
    assert not any(line.startswith("failing source") for line in result.output.splitlines())


async def test_origin_down_publishes_original_urls_then_rewrites_when_back(tmp_path):
    async with ImageServer() as server:  # learn a free port, then close it: "down"
        port_url = server.url
    config = load(write_config(tmp_path, port_url))
    seed(config)
    now = datetime.now(UTC)
    summary = await refresh(config, now)
    assert summary.images_failed == 4
    assert summary.images_pending == 4
    entry = parse(config, "all/rss.xml").entries[0]
    assert "https://img.cls.cn/images/20220330/c8Agbj08W6.png" in entry.content[0].value
    assert not entry.get("enclosures")

    args = ["-c", str(tmp_path / "config.yaml"), "status"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert "failing image https://img.cls.cn/images/20220330/c8Agbj08W6.png" in result.output
    assert "next attempt" in result.output

    async with ImageServer() as server:
        for name in SEED_IMAGES:
            server.route(f"/images/20220330/{name}", image(PNG))
        config = load(write_config(tmp_path, server.url))
        # right away, nothing is due: the origin is not hammered
        summary = await refresh(config, now + timedelta(seconds=1))
        assert server.total_requests == 0
        assert summary.images_pending == 4
        summary = await refresh(config, now + timedelta(minutes=5))
    assert summary.images_fetched == 4
    assert summary.written > 0
    entry = parse(config, "all/rss.xml").entries[0]
    assert "img.cls.cn" not in entry.content[0].value
    assert entry.enclosures


async def test_image_on_a_disallowed_host_is_left_as_it_is_until_allowed(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    other = "https://other.example/images/x.png"
    text = SEED.read_text(encoding="utf-8").replace("</div>", f'<img src="{other}"></div>', 1)
    seed(config, text=text)
    summary = await refresh(config)
    # Not fetched, and not reported as failing or pending either: it is not ours to fetch.
    assert (summary.images_fetched, summary.images_failed, summary.images_pending) == (4, 0, 0)
    assert server.total_requests == 4
    with open_refresher(config) as refresher:
        assert refresher.store.failing_images() == []
    assert other in parse(config, "all/rss.xml").entries[0].content[0].value

    # Allowing its host (through a mirror here) fetches it on the next refresh.
    server.route("/other/images/x.png", image(PNG + b"x"))
    write_config(tmp_path, server.url, allowed_hosts=["img.cls.cn", "other.example"],
                 origins={"https://img.cls.cn": server.url,
                          "https://other.example": f"{server.url}/other"})
    config = load(tmp_path / "config.yaml")
    summary = await refresh(config)
    assert (summary.images_fetched, summary.images_pending) == (1, 0)
    content = parse(config, "all/rss.xml").entries[0].content[0].value
    assert "other.example" not in content


async def test_server_error_is_retried_on_a_later_refresh(tmp_path, server):
    server.route("/images/20220330/c8Agbj08W6.png", status(500))
    config = load(write_config(tmp_path, server.url))
    seed(config)
    now = datetime.now(UTC)
    summary = await refresh(config, now)
    assert (summary.images_fetched, summary.images_failed) == (3, 1)

    server.route("/images/20220330/c8Agbj08W6.png", image(PNG))
    summary = await refresh(config, now + timedelta(hours=1))
    assert (summary.images_fetched, summary.images_failed, summary.images_pending) == (1, 0, 0)
    assert "img.cls.cn" not in parse(config, "all/atom.xml").entries[0].content[0].value


async def test_an_image_shared_by_a_hundred_articles_is_fetched_once(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    body = "---\ntitle: 'n{i}'\ncategories: [c]\ndate: 2022-03-30 11:17:{s:02}\n---\n" \
           '<p><img src="https://img.cls.cn/images/20220330/8ZNa70Fbl8.png"></p>\n'
    for i in range(100):
        seed(config, f"a{i:03}.md", body.format(i=i, s=i % 60))
    summary = await refresh(config)
    assert summary.articles == 100
    assert summary.images_fetched == 1
    assert server.requests["/images/20220330/8ZNa70Fbl8.png"] == 1


async def test_a_slow_origin_does_not_hold_feeds_back(tmp_path, server):
    # Past the size held in memory, so that the download is streamed to a .part file.
    server.route("/images/20220330/c8Agbj08W6.png", hang(PNG + bytes(BUFFER_BYTES + 1)))
    config = load(write_config(tmp_path, server.url, deadline=0.5, timeout=30))
    seed(config)
    summary = await refresh(config)
    assert summary.images_fetched == 3
    assert summary.images_pending == 1
    assert "https://img.cls.cn/images/20220330/c8Agbj08W6.png" in (
        parse(config, "all/rss.xml").entries[0].content[0].value)
    assert not [p for p in config.paths.cache.iterdir() if p.name.startswith(".")]


async def test_an_origin_that_never_answers_shows_as_failing_and_waits_its_turn(tmp_path,
                                                                                   server):
    server.route("/images/20220330/c8Agbj08W6.png", hang(PNG))
    config = load(write_config(tmp_path, server.url, deadline=1, timeout=0.3, attempts=3))
    seed(config)
    summary = await refresh(config)
    assert (summary.images_fetched, summary.images_failed) == (3, 1)
    args = ["-c", str(tmp_path / "config.yaml"), "status"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert "failing image https://img.cls.cn/images/20220330/c8Agbj08W6.png" in result.output
    assert "timed out" in result.output
    requests = server.requests["/images/20220330/c8Agbj08W6.png"]
    await refresh(config)  # not due yet: no wait for the deadline
    assert server.requests["/images/20220330/c8Agbj08W6.png"] == requests


async def test_an_abandoned_refresh_stops_downloading_and_keeps_what_it_downloaded(
        tmp_path, server):
    # As the daemon does on SIGTERM: three images are in, the fourth hangs.
    server.route("/images/20220330/c8Agbj08W6.png", hang(PNG + bytes(BUFFER_BYTES + 1)))
    config = load(write_config(tmp_path, server.url, timeout=60, deadline=60))
    seed(config)
    with open_refresher(config) as refresher:
        running = asyncio.create_task(refresher.refresh())
        try:
            async with asyncio.timeout(10):
                while not any(p.name.endswith(".part") for p in _listing(config.paths.cache)) \
                        or len(_cached(config)) < 3:
                    await asyncio.sleep(0.02)
            refresher.abandon()
            async with asyncio.timeout(2):
                with pytest.raises(RefreshAbandoned):
                    await running
        finally:
            running.cancel()
    assert not [p for p in config.paths.cache.iterdir() if p.name.startswith(".")]
    server.route("/images/20220330/c8Agbj08W6.png", image(PNG + b"c8Agbj08W6.png"))
    summary = await refresh(config)
    assert (summary.images_fetched, summary.images_pending) == (1, 0)  # the three are kept
    content = parse(config, "all/rss.xml").entries[0].content[0].value
    assert "img.cls.cn" not in content
    assert content.count(f"{BASE}/images/") == 4


def _cached(config: Config) -> list[Path]:
    return [p for p in _listing(config.paths.cache) if not p.name.startswith(".")]


def _cached_file(config: Config, name: str) -> Path:
    """The cache file of the image the test server serves as ``name`` (its bytes end so)."""
    [found] = [p for p in _cached(config) if p.read_bytes().endswith(name.encode())]
    return found


@pytest.mark.slow
async def test_refresh_killed_mid_download_leaves_no_partial_image(tmp_path, server):
    # Past the size held in memory, so that the download is streamed to a .part file.
    server.route("/images/20220330/c8Agbj08W6.png", hang(PNG + bytes(BUFFER_BYTES + 1)))
    config_file = write_config(tmp_path, server.url, timeout=60, deadline=60)
    config = load(config_file)
    seed(config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feeder", "-c", str(config_file), "refresh",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(20):
            while not any(p.name.endswith(".part") for p in _listing(config.paths.cache)):
                await asyncio.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    finals = [p.read_bytes() for p in config.paths.cache.iterdir() if not p.name.startswith(".")]
    assert all(data.startswith(PNG) and len(data) > len(PNG) for data in finals)  # complete ones
    assert len(finals) < 4

    server.route("/images/20220330/c8Agbj08W6.png", image(PNG + b"c8Agbj08W6.png"))
    summary = await refresh(config)
    assert summary.images_pending == 0
    cached = sorted(p.read_bytes() for p in config.paths.cache.iterdir()
                    if not p.name.startswith("."))
    assert cached == sorted(PNG + n.encode() for n in SEED_IMAGES)
    assert not [p for p in config.paths.cache.iterdir() if p.name.startswith(".")]


def _listing(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


async def test_gc_removes_images_no_article_references(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    seed(config, "other.md", "---\ntitle: other\n---\n"
         '<img src="https://img.cls.cn/images/20220330/onulZV1B5w.png">')
    await refresh(config)
    assert len(list(config.paths.cache.iterdir())) == 4
    (config.paths.sources / "cls-seed.md").unlink()
    (config.paths.cache / ".stale.png.part").write_bytes(b"x")
    await refresh(config)

    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "config.yaml"), "gc"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("4 cached images removed")
    [kept] = config.paths.cache.iterdir()
    assert kept.read_bytes() == PNG + b"onulZV1B5w.png"


class WhenWriting:
    """Progress that does ``action`` as the refresh starts writing feeds."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action

    def start(self, stage: str, total: int) -> None:
        if stage == "write":
            self.action()

    def advance(self, stage: str, amount: int = 1) -> None:
        pass


async def test_gc_after_an_unfinished_refresh_deletes_nothing(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    (config.paths.sources / "cls-seed.md").unlink()
    with open_refresher(config) as refresher, pytest.raises(RefreshAbandoned):
        await refresher.refresh(WhenWriting(refresher.abandon))  # as SIGTERM would
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "config.yaml"), "gc"])
    assert result.exit_code == 1
    assert "the last refresh did not finish: run `feeder refresh` first" in result.output
    assert len(list(config.paths.cache.iterdir())) == 4


async def test_gc_after_a_failed_refresh_says_so_and_deletes_nothing(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    config.paths.sources.rename(tmp_path / "away")  # an unmounted share
    with pytest.raises(FeederError, match="the sources folder does not exist"):
        await refresh(config)
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "config.yaml"), "gc"])
    assert result.exit_code == 1
    assert "the last refresh failed: run `feeder refresh` first" in result.output
    assert len(list(config.paths.cache.iterdir())) == 4


# -- the cache and the state database disagree ------------------------------------------


async def test_a_lost_state_database_keeps_the_cached_images_of_a_vanished_origin(tmp_path,
                                                                                 server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    cached = sorted(p.name for p in config.paths.cache.iterdir())
    for path in config.paths.state.glob("feeder.sqlite*"):
        path.unlink()
    for name in SEED_IMAGES:  # img.cls.cn dropped its old images
        server.route(f"/images/20220330/{name}", status(404))
    before = server.total_requests
    summary = await refresh(config)
    assert server.total_requests == before  # the cache has them all
    # Taken as they are: none fetched (nor counted as fetched), none failed or pending.
    assert (summary.images_fetched, summary.images_failed, summary.images_pending) == (0, 0, 0)
    content = parse(config, "all/rss.xml").entries[0].content[0].value
    assert "img.cls.cn" not in content
    assert content.count(f"{BASE}/images/") == 4
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "config.yaml"), "gc"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in config.paths.cache.iterdir()) == cached


async def test_a_cached_image_deleted_by_hand_is_fetched_again(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    gone = _cached_file(config, "c8Agbj08W6.png")
    gone.unlink()
    summary = await refresh(config)
    assert (summary.images_fetched, summary.images_pending) == (1, 0)
    assert server.requests["/images/20220330/c8Agbj08W6.png"] == 2
    assert gone.read_bytes() == PNG + b"c8Agbj08W6.png"


async def test_an_emptied_cache_with_the_origin_down_publishes_original_urls(tmp_path, server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    for path in config.paths.cache.iterdir():
        path.unlink()
    for name in SEED_IMAGES:
        server.route(f"/images/20220330/{name}", status(503))
    summary = await refresh(config)
    assert (summary.images_failed, summary.images_pending) == (4, 4)
    entry = parse(config, "all/rss.xml").entries[0]
    assert "https://img.cls.cn/images/20220330/c8Agbj08W6.png" in entry.content[0].value
    assert f"{BASE}/images/" not in entry.content[0].value  # no link to a missing file
    assert not entry.get("enclosures")


async def test_a_cached_image_deleted_during_a_refresh_is_noticed_by_the_next(tmp_path,
                                                                            server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    await refresh(config)
    victim = _cached_file(config, "c8Agbj08W6.png")
    with open_refresher(config) as refresher:
        await refresher.refresh(WhenWriting(victim.unlink))
    summary = await refresh(config)
    assert summary.images_fetched == 1
    assert victim.read_bytes() == PNG + b"c8Agbj08W6.png"


async def test_a_published_article_caught_broken_stays_published_with_its_images(tmp_path,
                                                                               server):
    config = load(write_config(tmp_path, server.url))
    seed(config)
    await refresh(config)
    before = parse(config, "all/rss.xml").entries[0]
    # Caught half-written, or a YAML typo: refused, reported, and the last good one stays.
    seed(config, text=SEED.read_text(encoding="utf-8")[:200])
    summary = await refresh(config)
    assert (summary.failed, summary.articles) == (1, 1)
    assert "cls-seed.md" in summary.errors[0]
    entry = parse(config, "all/rss.xml").entries[0]
    assert (entry.title, entry.content[0].value) == (before.title, before.content[0].value)
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "config.yaml"), "gc"])
    assert result.output.startswith("0 cached images removed"), result.output
    assert len(_cached(config)) == 4
    seed(config, text=SEED.read_text(encoding="utf-8").replace("沪上险企", "沪上保险"))
    summary = await refresh(config)
    assert (summary.failed, summary.articles) == (0, 1)
    assert parse(config, "all/rss.xml").entries[0].title.startswith("沪上保险")
