"""One refresh, end to end on real files: what lands in feeds/, and what is left alone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from xml.etree import ElementTree

import feedparser
import lxml.html
import pytest

import feeder.refresh
import feeder.sources
from feeder.config import Config, load_config
from feeder.exceptions import FeederError, LockedError, RefreshAbandoned
from feeder.feeds import article_page_path
from feeder.output import OutputFolder
from feeder.refresh import Refresher, RefreshSummary, lock, open_refresher, unfinished
from feeder.sources import SourceRead, article_id
from feeder.store import Store
from tests.conftest import (
    SEED_TEXT,
    article_text,
    make_config,
    make_unlistable_folder,
    running,
    wait_for_workers,
    write_config_file,
    write_source,
)

SEED_CATEGORIES = ("金融", "财联社", "深度")
FEED_FILES = ("rss.xml", "atom.xml", "feed.json")
T0 = datetime(2022, 3, 1, 8, tzinfo=UTC).timestamp()


async def refresh(config: Config) -> RefreshSummary:
    with open_refresher(config) as refresher:
        return await refresher.refresh()


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: its mtime_ns and bytes."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def feed(config: Config, folder: str, name: str = "rss.xml") -> feedparser.FeedParserDict:
    parsed = feedparser.parse((config.paths.feeds / folder / name).read_bytes())
    assert parsed.bozo == 0, parsed.get("bozo_exception")
    return parsed


def titles(config: Config, folder: str) -> list[str]:
    return [e.title for e in feed(config, folder).entries]


def assert_all_feeds_valid(config: Config) -> None:
    feeds = config.paths.feeds
    for path in feeds.rglob("*.xml"):
        parsed = feedparser.parse(path.read_bytes())
        assert parsed.bozo == 0, (path, parsed.get("bozo_exception"))
    for path in feeds.rglob("*.json"):
        json.loads(path.read_bytes())


def dated(title: str, day: int, categories: str | list[str] = "A", **front: object) -> str:
    when = datetime(2022, 3, day, 8, tzinfo=UTC).isoformat()
    return article_text(title, f"<p>{title} text</p>", date=when, categories=categories, **front)


#: Sources that must be refused, each for its own reason.
BAD_SOURCES: dict[str, bytes] = {
    "bad/empty.md": b"",
    "bad/blank.md": b"  \n\n\t\n",
    "bad/no-front-matter.md": b"# Just notes\n\nNo front matter.\n",
    "bad/broken-yaml.md": b"---\ntitle: ok\nauthor: a: b\n---\nBody.\n",
    "bad/gbk.md": "---\ntitle: 沪上险企\n---\n正文\n".encode("gbk"),
    "bad/list.md": b"---\n- a\n- b\n---\nBody.\n",
    "bad/scalar.md": b"---\njust a sentence\n---\nBody.\n",
    "bad/huge.md": b"---\ntitle: huge\n---\n" + b"x" * 70_000 + b"\n",
    "bad/int.md": b"---\ntitle: ok\nn: !!int abc\n---\nBody.\n",
}

#: Sources that must be published, with the title each one gets.
GOOD_SOURCES: dict[str, tuple[bytes, str]] = {
    "good/seed.md": (SEED_TEXT.encode(),
                     "沪上险企战疫进行时：加强健康服务、保障菜篮子、线上线下同守_沪_"),
    "good/bom.md": (b"\xef\xbb\xbf---\ntitle: With BOM\ndate: 2022-03-02\n---\nx\n", "With BOM"),
    "good/crlf.md": (b"---\r\ntitle: CRLF\r\ndate: 2022-03-03\r\n---\r\nx\r\n", "CRLF"),
    "good/blank-first.md": (b"\n\n---\ntitle: Blank first\ndate: 2022-03-04\n---\nx\n",
                            "Blank first"),
    "good/hexo.md": ("---\ntitle: Hexo\ndate: 2022-03-05 11:17:49\ncategories:\n - [金融, 股票]\n"
                     "---\nx\n".encode(), "Hexo"),
    "good/odd-categories.md": ("---\ntitle: Odd\ndate: 2022-03-06\ncategories:\n - 科创板: 新股\n"
                               " - #热点\n---\nx\n".encode(), "Odd"),
    "good/no-title.md": (b"---\ndate: 2022-03-07\n---\n# Hi\n", "no title"),
    "good/undated.md": (b"---\ntitle: Undated\n---\nx\n", "Undated"),
    "good/page.html": (b"---\ntitle: HTML page\ndate: 2022-03-08\nlink: https://e.example/p\n"
                       b"---\n<p>x</p>\n", "HTML page"),
    "good/control-link.md": (b'---\ntitle: Link\ndate: 2022-03-10\nlink: "https://e.example/a\\0b"\n'
                             b"---\nx\n", "Link"),
    "good/no\x01title.md": (b"---\ndate: 2022-03-11\n---\nx\n", "notitle"),
    "good/no-such-day.md": (b"---\ntitle: No such day\ndate: 2022-02-30\n---\nx\n", "No such day"),
    "good/year-one.md": (b"---\ntitle: Year one\ndate: 0001-01-01T00:00:00Z\n---\nx\n", "Year one"),
    "good/control.md": ("---\ntitle: Con\x00trol\x0b\ndate: 2022-03-09\n---\nx\x1fy\ufffe\n"
                        .encode(), "Control"),
}


# -- a first refresh --------------------------------------------------------------------


async def test_seed_is_published_everywhere(config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    summary = await refresh(config)
    assert (summary.scanned, summary.articles, summary.failed) == (1, 1, 0)
    assert summary.written > 0
    out = config.paths.feeds
    for folder in [*(f"categories/{c}" for c in SEED_CATEGORIES), "all"]:
        for name in FEED_FILES:
            assert (out / folder / name).is_file(), (folder, name)
        assert titles(config, folder) == [GOOD_SOURCES["good/seed.md"][1]]
        assert feed(config, folder, "atom.xml").entries[0].title == titles(config, folder)[0]
        items = json.loads((out / folder / "feed.json").read_bytes())["items"]
        assert len(items) == 1
    page = out / "articles" / f"{article_id('cls-seed.md')}.html"
    html = page.read_text(encoding="utf-8")
    assert "沪上险企战疫进行时" in html
    assert "杨芮" in html
    # The item links to that page (the seed has no link of its own).
    assert feed(config, "all").entries[0].link.endswith(f"/feeds/articles/{page.name}")
    # The images could not be fetched (the origin is unreachable): they stay pending.
    assert summary.images_pending >= 4
    assert summary.images_fetched == 0
    assert "https://img.cls.cn/images/20220330/c8Agbj08W6.png" in html


async def test_opml_and_index_list_every_feed(config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    await refresh(config)
    opml = ElementTree.parse(config.paths.feeds / "index.opml").getroot()
    outlines = opml.findall("body/outline")
    urls = {o.get("xmlUrl") for o in outlines}
    base = "http://feeds.example.test/feeds/"
    expected = {base + "all/rss.xml"} | {
        base + "categories/" + "".join(f"%{b:02X}" for b in c.encode()) + "/rss.xml"
        for c in SEED_CATEGORIES
    }
    assert urls == expected
    assert all(o.get("text") and o.get("type") == "rss" for o in outlines)
    index = lxml.html.fromstring((config.paths.feeds / "index.html").read_bytes())
    discovery = index.xpath('//head/link[@rel="alternate"][@type="application/rss+xml"]/@href')
    assert set(discovery) == expected
    # The seed is in three categories: one article, each category counts it once.
    counts = [li.text_content().split(":")[0] for li in index.xpath("//li")]
    assert counts == ["All articles (1)", *(f"{c} (1)" for c in sorted(SEED_CATEGORIES))]


async def test_mixed_folder_publishes_every_good_source(tmp_path: Path) -> None:
    config = make_config(tmp_path, sources={"max_bytes": 65_536})
    for path, data in BAD_SOURCES.items():
        write_source(config, path, data)
    for path, (data, _) in GOOD_SOURCES.items():
        write_source(config, path, data)
    summary = await refresh(config)
    assert summary.scanned == len(BAD_SOURCES) + len(GOOD_SOURCES)
    assert summary.failed == len(BAD_SOURCES)
    assert summary.articles == len(GOOD_SOURCES)
    assert sorted(e.split(":")[0] for e in summary.errors) == sorted(BAD_SOURCES)
    published = set(titles(config, "all"))
    assert published == {title for _, title in GOOD_SOURCES.values()}
    for path in GOOD_SOURCES:
        assert (config.paths.feeds / "articles" / f"{article_id(path)}.html").is_file()
    for path in BAD_SOURCES:
        assert not (config.paths.feeds / "articles" / f"{article_id(path)}.html").exists()
    categories = {p.name for p in (config.paths.feeds / "categories").iterdir()}
    assert {"金融", "股票", "科创板-新股", "Uncategorized", *SEED_CATEGORIES} <= categories
    assert_all_feeds_valid(config)
    # Nothing changed: the bad ones are not counted twice, nothing is rewritten.
    again = await refresh(config)
    assert (again.failed, again.changed, again.written) == (len(BAD_SOURCES), 0, 0)


async def test_forbidden_character_reference_does_not_sink_the_refresh(config: Config) -> None:
    write_source(config, "good.md", dated("Good", 1))
    write_source(config, "evil.html", dated("Evil", 2).replace("text", "&#1;"))
    await refresh(config)
    assert "Good" in titles(config, "all")
    assert_all_feeds_valid(config)


# -- change detection -------------------------------------------------------------------


async def test_second_refresh_with_no_change_writes_nothing(config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    write_source(config, "a.md", dated("A1", 1, ["A", "深度"]))
    write_source(config, "bad.md", b"")
    first = await refresh(config)
    before = snapshot(config.paths.feeds)
    summary = await refresh(config)
    assert summary.written == 0
    assert summary.changed == 0
    assert snapshot(config.paths.feeds) == before
    figures = ("failed", "articles", "images_pending")
    assert [getattr(summary, f) for f in figures] == [getattr(first, f) for f in figures]


async def test_no_op_refresh_reports_what_another_process_published(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1))
    with open_refresher(config) as daemon:
        await daemon.refresh()
        write_source(config, "b.md", dated("B1", 2))
        write_source(config, "bad.md", b"")
        assert (await refresh(config)).articles == 2  # e.g. `feeder refresh` with no daemon
        summary = await daemon.refresh()
    assert (summary.changed, summary.articles, summary.failed) == (0, 2, 1)


async def test_a_daemon_unpublishes_a_file_another_process_published(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1))
    with open_refresher(config) as daemon:
        await daemon.refresh()
        await daemon.refresh()  # its no-op: nothing in the store changed since its last look
        added = write_source(config, "b.md", dated("B1", 2))
        assert (await refresh(config)).articles == 2  # `feeder refresh` with no daemon
        assert titles(config, "all") == ["B1", "A1"]
        added.unlink()
        summary = await daemon.refresh()
    assert (summary.changed, summary.articles) == (1, 1)
    assert titles(config, "all") == ["A1"]


async def test_a_daemon_unpublishes_a_file_it_published(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1))
    with open_refresher(config) as daemon:
        await daemon.refresh()
        added = write_source(config, "b.md", dated("B1", 2))
        assert (await daemon.refresh()).articles == 2
        added.unlink()
        summary = await daemon.refresh()
    assert (summary.changed, summary.articles) == (1, 1)
    assert titles(config, "all") == ["A1"]


async def test_editing_one_article_rewrites_only_its_feeds(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1, "A"), mtime=T0)
    write_source(config, "b.md", dated("B1", 2, "B"), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    write_source(config, "a.md", dated("A1 edited", 1, "A"), mtime=T0 + 60)
    summary = await refresh(config)
    after = snapshot(config.paths.feeds)
    assert summary.changed == 1
    assert titles(config, "categories/A") == ["A1 edited"]
    assert "A1 edited" in titles(config, "all")
    changed = {path for path in after if after[path] != before.get(path)}
    page_a = f"articles/{article_id('a.md')}.html"
    assert changed == {page_a} | {f"{folder}/{name}" for folder in ("all", "categories/A")
                                  for name in FEED_FILES}
    for name in FEED_FILES:
        assert after[f"categories/B/{name}"] == before[f"categories/B/{name}"]


async def test_a_deleted_feed_or_index_file_comes_back(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    gone = ["categories/A/atom.xml", "all/feed.json", "index.opml", "index.html"]
    for name in gone:
        (config.paths.feeds / name).unlink()
    summary = await refresh(config)
    assert (summary.changed, summary.written) == (0, len(gone))
    after = snapshot(config.paths.feeds)
    assert {name: data for name, (_, data) in after.items()} == {
        name: data for name, (_, data) in before.items()}
    assert all(after[name] == before[name] for name in after.keys() - gone)  # untouched


async def test_an_article_page_deleted_by_hand_comes_back(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1), mtime=T0)
    write_source(config, "b.md", dated("B1", 2), mtime=T0)
    await refresh(config)
    page_a, page_b = (config.paths.feeds / article_page_path(article_id(path))
                      for path in ("a.md", "b.md"))
    before = page_a.read_bytes(), page_b.read_bytes()
    page_a.unlink()  # right after the refresh that wrote it
    assert (await refresh(config)).written == 1
    assert page_a.read_bytes() == before[0]
    assert (await refresh(config)).written == 0  # from now on, the folder's mtime tells
    page_b.unlink()
    assert (await refresh(config)).written == 1
    assert (page_a.read_bytes(), page_b.read_bytes()) == before


async def test_a_deleted_pages_folder_comes_back(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1), mtime=T0)
    write_source(config, "b.md", dated("B1", 2), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    shutil.rmtree(config.paths.feeds / "articles")
    assert (await refresh(config)).written == 2
    assert {name: data for name, (_, data) in snapshot(config.paths.feeds).items()} == {
        name: data for name, (_, data) in before.items()}


def test_output_folder_refuses_paths_outside_it(tmp_path: Path) -> None:
    output = OutputFolder(tmp_path / "feeds")
    output.write("kept.xml", b"x")
    for relative in ("../escaped.xml", "a/../../escaped.xml", "/tmp/escaped.xml"):
        with pytest.raises(FeederError, match="outside"):
            output.write(relative, b"x")
    assert not list(tmp_path.rglob("escaped.xml"))
    for relative in ("", ".", ".."):  # never the folder itself, nor its parent
        with pytest.raises(FeederError, match="outside"):
            output.remove(relative)
    assert (tmp_path / "feeds" / "kept.xml").read_bytes() == b"x"


async def test_a_folder_that_cannot_be_listed_fails_the_refresh_and_loses_nothing(
        config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    folder = make_unlistable_folder(config.paths.sources)
    # Its files are unknown: publishing without them would take them for deleted.
    with pytest.raises(FeederError, match="cannot list the folder") as info:
        await refresh(config)
    assert "dddd" in str(info.value)
    assert snapshot(config.paths.feeds) == before
    shutil.rmtree(config.paths.sources / folder.relative_to(config.paths.sources).parts[0])
    assert (await refresh(config)).changed == 0  # the failed refresh changed nothing


async def test_a_refresh_failed_by_a_bug_is_remembered_by_the_kind_of_error(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    write_source(config, "a.md", SEED_TEXT)

    def bug(*args: Any) -> None:
        raise AssertionError  # no message: its kind is all a user can be told

    monkeypatch.setattr(feeder.refresh, "build_feed", bug)
    with pytest.raises(AssertionError), open_refresher(config) as refresher:
        await refresher.refresh()
    with open_refresher(config) as refresher:
        failure = feeder.refresh.last_failure(refresher.store)
    assert failure is not None
    assert failure[1] == "AssertionError"


async def test_a_missing_sources_folder_fails_the_refresh_and_unpublishes_nothing(
        config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    away = config.paths.sources.rename(config.paths.sources.with_name("away"))  # unmounted
    with pytest.raises(FeederError, match="sources: the sources folder does not exist"):
        await refresh(config)
    assert snapshot(config.paths.feeds) == before
    away.rename(config.paths.sources)
    assert (await refresh(config)).changed == 0


async def test_a_file_named_as_a_misnamed_one_is_shown_is_still_published(
        config: Config) -> None:
    gbk = os.path.join(os.fsencode(config.paths.sources), "沪上.md".encode("gbk"))
    write_source(config, "\\xbb\\xa6\\xc9\\xcf.md", dated("Real", 2))  # that name, escaped
    fd = os.open(gbk, os.O_WRONLY | os.O_CREAT)
    os.write(fd, dated("GBK", 1).encode())
    os.close(fd)
    for _ in range(2):
        await refresh(config)
        assert titles(config, "all") == ["Real"]
    (config.paths.sources / "\\xbb\\xa6\\xc9\\xcf.md").unlink()
    summary = await refresh(config)
    assert (summary.articles, summary.failed) == (0, 1)  # the misnamed one, refused
    assert titles(config, "all") == []


async def test_touched_but_unchanged_file_is_not_reparsed(config: Config) -> None:
    source = write_source(config, "a.md", dated("A1", 1), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    os.utime(source, (T0 + 3600, T0 + 3600))
    summary = await refresh(config)
    assert (summary.changed, summary.written) == (0, 0)
    assert snapshot(config.paths.feeds) == before
    # The new stat figures were remembered: a third refresh does not even read it.
    assert (await refresh(config)).changed == 0


async def test_deleted_source_leaves_feeds_and_its_page(config: Config) -> None:
    write_source(config, "keep.md", dated("Keep", 1, ["A", "Shared"]))
    gone = write_source(config, "gone.md", dated("Gone", 2, ["B", "Shared"]))
    await refresh(config)
    page = config.paths.feeds / "articles" / f"{article_id('gone.md')}.html"
    assert page.is_file()
    assert titles(config, "categories/Shared") == ["Gone", "Keep"]
    gone.unlink()
    summary = await refresh(config)
    assert summary.articles == 1
    assert not page.exists()
    for folder in ("all", "categories/Shared"):
        assert titles(config, folder) == ["Keep"]
        atom = feed(config, folder, "atom.xml")
        assert [e.title for e in atom.entries] == ["Keep"]
        items = json.loads((config.paths.feeds / folder / "feed.json").read_bytes())["items"]
        assert [i["title"] for i in items] == ["Keep"]
    # Its only category has no article left: its folder goes too.
    assert not (config.paths.feeds / "categories" / "B").exists()
    assert (config.paths.feeds / "categories" / "A" / "rss.xml").is_file()
    opml = (config.paths.feeds / "index.opml").read_text(encoding="utf-8")
    assert "categories/B/" not in opml


async def test_category_that_loses_its_last_article_is_removed(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1, ["A", "Lonely"]), mtime=T0)
    write_source(config, "b.md", dated("B1", 2, "A"), mtime=T0)
    await refresh(config)
    assert (config.paths.feeds / "categories" / "Lonely" / "rss.xml").is_file()
    write_source(config, "a.md", dated("A1", 1, "A"), mtime=T0 + 60)  # recategorized
    await refresh(config)
    assert not (config.paths.feeds / "categories" / "Lonely").exists()
    assert titles(config, "categories/A") == ["B1", "A1"]
    index = (config.paths.feeds / "index.html").read_text(encoding="utf-8")
    assert "Lonely" not in index


def linked_feed_files(config: Config, page: str) -> list[str]:
    """The files under ``feeds/`` that an article page links to."""
    root = lxml.html.fromstring((config.paths.feeds / page).read_bytes())
    prefix = f"{config.site.base_url}/feeds/"
    return [unquote(href.removeprefix(prefix)) for href in root.xpath("//a/@href")
            if href.startswith(prefix)]


async def test_a_category_keeps_its_folder_when_another_comes_to_want_it(
        config: Config) -> None:
    """Readers subscribed to a category's feed keep it: the newcomer gets the suffix."""
    write_source(config, "cpp.md", dated("C++ 1", 1, "C++"), mtime=T0)
    write_source(config, "news.md", dated("News 1", 1, "News"), mtime=T0)
    await refresh(config)
    page = article_page_path(article_id("cpp.md"))
    assert linked_feed_files(config, page) == ["categories/C/rss.xml"]
    # "C#" slugs to "C" too, and "news" to "News" but for case.
    write_source(config, "cs.md", dated("C# 1", 2, "C#"), mtime=T0)
    write_source(config, "news2.md", dated("news 1", 2, "news"), mtime=T0)
    await refresh(config)
    assert linked_feed_files(config, page) == ["categories/C/rss.xml"]
    assert titles(config, "categories/C") == ["C++ 1"]
    assert titles(config, "categories/News") == ["News 1"]
    folders = sorted(p.name for p in (config.paths.feeds / "categories").iterdir())
    assert folders == ["C", "C-e4bc4b", "News", "news-3c6bdc"]  # the newcomers' hashes
    assert hashlib.sha1(b"C#").hexdigest().startswith("e4bc4b")
    assert hashlib.sha1(b"news").hexdigest().startswith("3c6bdc")
    # The state database deleted (it can be rebuilt): the folders tell it where they were.
    config.database.unlink()
    await refresh(config)
    assert sorted(p.name for p in (config.paths.feeds / "categories").iterdir()) == folders
    assert titles(config, "categories/C") == ["C++ 1"]


async def test_a_page_follows_its_category_feed_to_a_new_slug(config: Config,
                                                              tmp_path: Path) -> None:
    write_source(config, "cpp.md", dated("C++ 1", 1, "C++"), mtime=T0)
    await refresh(config)
    page = article_page_path(article_id("cpp.md"))
    assert linked_feed_files(config, page) == ["categories/C/rss.xml"]
    # The config gives "C" to "C#": "C++" moves, its page with it.
    moved_config = make_config(tmp_path, feeds={"slugs": {"C#": "C"}})
    write_source(moved_config, "cs.md", dated("C# 1", 2, "C#"), mtime=T0)
    await refresh(moved_config)
    [moved] = linked_feed_files(moved_config, page)
    assert moved != "categories/C/rss.xml"
    assert (config.paths.feeds / moved).is_file()
    assert titles(config, "categories/C") == ["C# 1"]


async def test_a_category_too_long_for_a_folder_name_is_published(config: Config) -> None:
    write_source(config, "long.md", dated("Long", 1, ["长" * 200, "a" * 300]))
    write_source(config, "short.md", dated("Short", 2, "fresh"))
    summary = await refresh(config)
    assert (summary.articles, summary.failed) == (2, 0)
    categories = feed(config, "all").entries[1].tags
    assert len(categories) == 2
    assert titles(config, "categories/fresh") == ["Short"]
    for path in linked_feed_files(config, article_page_path(article_id("long.md"))):
        assert (config.paths.feeds / path).is_file()
    assert_all_feeds_valid(config)


async def test_older_article_added_later_comes_after_newer_ones(config: Config) -> None:
    write_source(config, "new1.md", dated("Newer", 20))
    write_source(config, "new2.md", dated("Newest", 25))
    await refresh(config)
    write_source(config, "old.md", dated("Old", 1))
    await refresh(config)
    for folder in ("all", "categories/A"):
        assert titles(config, folder) == ["Newest", "Newer", "Old"]
        atom = feed(config, folder, "atom.xml")
        assert [e.title for e in atom.entries] == ["Newest", "Newer", "Old"]
    # The feed is dated by its newest item, not by the last one added.
    assert feed(config, "all").feed.updated_parsed[:3] == (2022, 3, 25)


async def test_unchanged_file_is_not_read_again(config: Config) -> None:
    """Same size and mtime: the content is trusted to the state database, never re-read."""
    source = write_source(config, "a.md", dated("Original", 1))
    await refresh(config)
    before = snapshot(config.paths.feeds)
    stat = source.stat()
    garbage = b"\xff" * stat.st_size  # would be refused as not UTF-8, if it were read
    source.write_bytes(garbage)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    summary = await refresh(config)
    assert (summary.changed, summary.failed, summary.written) == (0, 0, 0)
    assert titles(config, "all") == ["Original"]
    assert snapshot(config.paths.feeds) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_unreadable_unchanged_file_is_not_read_again(config: Config) -> None:
    source = write_source(config, "a.md", dated("Original", 1))
    write_source(config, "b.md", dated("Other", 2))
    await refresh(config)
    source.chmod(0)
    try:
        summary = await refresh(config)
        assert (summary.failed, summary.written) == (0, 0)
        assert titles(config, "all") == ["Other", "Original"]
    finally:
        source.chmod(0o644)


async def test_unreadable_changed_file_is_refused_not_fatal(config: Config) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    source = write_source(config, "a.md", dated("A", 1))
    write_source(config, "b.md", dated("B", 2))
    source.chmod(0)
    try:
        summary = await refresh(config)
        assert summary.failed == 1
        assert titles(config, "all") == ["B"]
    finally:
        source.chmod(0o644)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_a_file_unreadable_for_a_while_is_read_once_it_can_be(config: Config) -> None:
    source = write_source(config, "a.md", dated("A", 1))
    source.chmod(0)
    try:
        assert (await refresh(config)).failed == 1
    finally:
        source.chmod(0o644)  # its mtime stays as it was
    summary = await refresh(config)
    assert (summary.changed, summary.failed) == (1, 0)
    assert titles(config, "all") == ["A"]


async def test_a_symlink_loop_is_refused_alone(config: Config,
                                               caplog: pytest.LogCaptureFixture) -> None:
    write_source(config, "a.md", dated("A", 1))
    (config.paths.sources / "loop1.md").symlink_to("loop2.md")
    (config.paths.sources / "loop2.md").symlink_to("loop1.md")
    summary = await refresh(config)
    assert (summary.scanned, summary.failed) == (3, 2)
    assert titles(config, "all") == ["A"]
    assert "loop1.md: cannot read: Too many levels of symbolic links" in caplog.text
    caplog.clear()
    summary = await refresh(config)  # told once
    assert (summary.changed, summary.failed, caplog.text) == (0, 2, "")
    (config.paths.sources / "loop2.md").unlink()
    write_source(config, "loop2.md", dated("Fixed", 2))
    assert titles(config, "all") == ["A"]
    await refresh(config)
    assert titles(config, "all") == ["Fixed", "Fixed", "A"]


async def test_a_swapped_sources_link_is_followed(tmp_path: Path) -> None:
    for release, title in (("r1", "One"), ("r2", "Two")):
        (tmp_path / release).mkdir()
        (tmp_path / release / "a.md").write_text(dated(title, 1), encoding="utf-8")
    (tmp_path / "sources").symlink_to("r1")
    config = make_config(tmp_path)
    with open_refresher(config) as refresher:  # as the daemon keeps it
        await refresher.refresh()
        assert titles(config, "all") == ["One"]
        (tmp_path / "next").symlink_to("r2")
        (tmp_path / "next").replace(tmp_path / "sources")  # as `ln -sfn` swaps it
        await refresher.refresh()
    assert titles(config, "all") == ["Two"]


@pytest.fixture
def other_device_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than ``tmp_path``, as a share's would be."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp folder")
    folder = Path(tempfile.mkdtemp(dir=shm))
    yield folder
    shutil.rmtree(folder)


async def test_an_unmounted_share_unpublishes_nothing(tmp_path: Path,
                                                      other_device_folder: Path) -> None:
    (other_device_folder / "a.md").write_text(dated("On the share", 1), encoding="utf-8")
    (tmp_path / "mount-point").mkdir()  # what an unmounted share leaves: an empty folder
    (tmp_path / "sources").symlink_to(other_device_folder)  # "mounted"
    config = make_config(tmp_path)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    (tmp_path / "sources").unlink()
    (tmp_path / "sources").symlink_to("mount-point")  # "unmounted"
    with pytest.raises(FeederError, match="an unmounted share"):
        await refresh(config)
    assert snapshot(config.paths.feeds) == before
    (tmp_path / "mount-point" / "b.md").write_text(dated("Local", 2), encoding="utf-8")
    await refresh(config)  # not empty: taken as it is
    assert titles(config, "all") == ["Local"]
    (tmp_path / "mount-point" / "b.md").unlink()
    await refresh(config)  # emptied in place
    assert titles(config, "all") == []


async def test_a_file_deleted_during_a_refresh_is_taken_as_deleted(
        config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    write_source(config, "a.md", dated("A", 1))
    old = write_source(config, "old.md", dated("Old", 2))
    await refresh(config)
    new = write_source(config, "new.md", dated("New", 3))
    old.write_text(dated("Old edited", 2), encoding="utf-8")
    read = feeder.sources.read_source

    def deleted_after_the_scan(path: Path, *args: object) -> bytes:
        if path in (old, new):
            path.unlink()
        return read(path, *args)

    monkeypatch.setattr(feeder.sources, "read_source", deleted_after_the_scan)
    summary = await refresh(config)
    assert (summary.failed, "cannot read" in caplog.text) == (0, False)
    assert titles(config, "all") == ["A"]


async def test_state_database_survives_and_rebuilds(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1))
    await refresh(config)
    before = snapshot(config.paths.feeds)
    for file in config.paths.state.iterdir():
        file.unlink()
    summary = await refresh(config)
    assert summary.changed == 1  # a cold refresh re-reads everything ...
    assert summary.written == 0  # ... and finds every output already right
    assert snapshot(config.paths.feeds) == before


async def test_a_state_database_deleted_while_a_daemon_runs_is_rebuilt(config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1))
    write_source(config, "b.md", dated("B1", 2))
    with open_refresher(config) as refresher:
        await refresher.refresh()
        before = snapshot(config.paths.feeds)
        config.database.unlink()  # its write-ahead log stays behind
        summary = await refresher.refresh()
        assert (summary.changed, summary.articles, summary.written) == (2, 2, 0)
        write_source(config, "c.md", dated("C1", 3))
        await refresher.refresh()
    assert snapshot(config.paths.feeds).keys() > before.keys()
    with contextlib.closing(Store.open(config.database)) as store:  # the file others read
        assert store.count_articles() == 3
        assert [r["articles"] for r in store.last_refreshes(5)] == [3, 2]


async def test_a_rebuilt_state_database_unpublishes_the_page_of_a_deleted_source(
        config: Config) -> None:
    write_source(config, "a.md", dated("A1", 1))
    gone = write_source(config, "b.md", dated("B1", 2))
    await refresh(config)
    page = config.paths.feeds / article_page_path(article_id("b.md"))
    assert page.is_file()
    shutil.rmtree(config.paths.state)
    gone.unlink()
    summary = await refresh(config)
    assert summary.articles == 1
    assert not page.exists()
    assert (config.paths.feeds / article_page_path(article_id("a.md"))).is_file()


async def test_changing_base_url_rewrites_links_not_ids(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_source(config, "a.md", dated("A1", 1))
    await refresh(config)
    ids = [e.id for e in feed(config, "all").entries]
    moved = make_config(tmp_path, site={"base_url": "https://moved.example"})
    summary = await refresh(moved)
    assert summary.written > 0
    entries = feed(moved, "all").entries
    assert [e.id for e in entries] == ids
    assert entries[0].link.startswith("https://moved.example/feeds/articles/")


async def test_links_are_ascii_uris_whatever_the_base_url_and_sources_say(
        tmp_path: Path) -> None:
    config = make_config(tmp_path, site={"base_url": "http://例子.测试/新闻/"})
    write_source(config, "a.md", dated("A1", 1, "金融"))
    write_source(config, "b.md", dated("B1", 2, link="https://www.cls.cn/详情 1"))
    await refresh(config)
    base = "http://xn--fsqu00a.xn--0zwm56d/%E6%96%B0%E9%97%BB"
    rss = (config.paths.feeds / "all" / "rss.xml").read_text(encoding="utf-8")
    links = [e.text for e in ElementTree.fromstring(rss).iter("link")]
    assert links[0] == f"{base}/"
    assert links[1] == "https://www.cls.cn/%E8%AF%A6%E6%83%85%201"
    assert links[2].startswith(f"{base}/feeds/articles/")
    self_link = ElementTree.fromstring(rss).find("channel/{http://www.w3.org/2005/Atom}link")
    assert self_link is not None
    assert self_link.get("href") == f"{base}/feeds/all/rss.xml"
    atom = feed(config, "categories/金融", "atom.xml")
    assert atom.feed.links[0].href.isascii()
    assert all(link.href.isascii() for e in atom.entries for link in e.links)


async def test_feeds_items_limit_applies(tmp_path: Path) -> None:
    config = make_config(tmp_path, feeds={"items": 2})
    for day in range(1, 6):
        write_source(config, f"a{day}.md", dated(f"Day {day}", day))
    summary = await refresh(config)
    assert summary.articles == 5
    assert titles(config, "all") == ["Day 5", "Day 4"]


async def test_feeds_follow_articles_in_and_out_of_their_newest_items(tmp_path: Path) -> None:
    config = make_config(tmp_path, feeds={"items": 2})
    for day in range(1, 5):
        write_source(config, f"a{day}.md", dated(f"Day {day}", day), mtime=T0)
    await refresh(config)
    before = snapshot(config.paths.feeds)
    # An old article edited: its page changes; the feeds, which do not show it, do not.
    write_source(config, "a1.md", dated("Day 1 edited", 1), mtime=T0 + 60)
    await refresh(config)
    after = snapshot(config.paths.feeds)
    assert {p for p in after if after[p] != before[p]} == {f"articles/{article_id('a1.md')}.html"}
    # Redated out of the newest two: the next one takes its place.
    write_source(config, "a4.md", dated("Day 4", 1), mtime=T0 + 120)
    await refresh(config)
    assert titles(config, "all") == titles(config, "categories/A") == ["Day 3", "Day 2"]
    # Redated into them, and then edited there.
    write_source(config, "a1.md", dated("Day 1 edited", 9), mtime=T0 + 180)
    await refresh(config)
    assert titles(config, "all") == ["Day 1 edited", "Day 3"]
    write_source(config, "a1.md", dated("Day 1, again", 9), mtime=T0 + 240)
    await refresh(config)
    assert titles(config, "all") == titles(config, "categories/A") == ["Day 1, again", "Day 3"]
    # Deleted while shown.
    (config.paths.sources / "a1.md").unlink()
    await refresh(config)
    assert titles(config, "all") == ["Day 3", "Day 2"]
    assert_all_feeds_valid(config)



# Config keys that change how a source reads. Parsed articles are kept in the state
# database, and a source is only parsed again when its file changes.


async def test_new_default_category_applies_to_existing_sources(tmp_path: Path) -> None:
    write_source(make_config(tmp_path), "a.md", article_text("A", date="2022-03-30"))
    await refresh(make_config(tmp_path))
    assert (tmp_path / "feeds" / "categories" / "Uncategorized").is_dir()
    await refresh(make_config(tmp_path, feeds={"default_category": "Misc"}))
    assert (tmp_path / "feeds" / "categories" / "Misc" / "rss.xml").is_file()
    assert not (tmp_path / "feeds" / "categories" / "Uncategorized").exists()


async def test_new_timezone_applies_to_existing_sources(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_source(config, "a.md", "---\ntitle: A\ndate: 2022-03-30 11:17:49\n---\nx\n")
    await refresh(config)
    assert feed(config, "all").entries[0].published_parsed[:6] == (2022, 3, 30, 3, 17, 49)
    utc = make_config(tmp_path, site={"timezone": "UTC"})
    await refresh(utc)
    assert feed(utc, "all").entries[0].published_parsed[:6] == (2022, 3, 30, 11, 17, 49)


async def test_raised_max_bytes_publishes_a_file_refused_before(tmp_path: Path) -> None:
    small = make_config(tmp_path, sources={"max_bytes": 200})
    write_source(small, "big.md", article_text("Big", "x" * 300, date="2022-03-30"))
    assert (await refresh(small)).failed == 1
    large = make_config(tmp_path, sources={"max_bytes": 1000})
    summary = await refresh(large)
    assert (summary.failed, summary.articles) == (0, 1)
    assert titles(large, "all") == ["Big"]

# -- the lock ---------------------------------------------------------------------------


def test_lock_refuses_a_second_holder(config: Config) -> None:
    with lock(config), pytest.raises(LockedError), lock(config, wait=False):
        pass
    with lock(config, wait=False):  # released: free again
        pass


async def test_unreachable_images_wait_for_their_retry(config: Config) -> None:
    """An unreachable origin: the images stay pending, and are not retried at once."""
    write_source(config, "cls-seed.md", SEED_TEXT)
    first = await refresh(config)
    assert first.images_failed >= 4
    assert first.images_pending == first.images_failed
    second = await refresh(config)
    assert second.images_failed == 0  # not due yet
    assert second.images_pending == first.images_pending


async def test_state_from_version_1_still_fetches_every_image(config: Config) -> None:
    """Version 2 keeps a row per referenced image; opening a version 1 database adds them."""
    write_source(config, "cls-seed.md", SEED_TEXT)
    first = await refresh(config)
    with sqlite3.connect(config.database) as db:  # as version 1 left it: no image tried
        db.execute("DELETE FROM images")
        db.execute("PRAGMA user_version = 1")
    summary = await refresh(config)
    assert summary.images_failed == first.images_failed  # all due at once, tried again



async def test_deleting_an_article_deletes_its_rows_by_index_not_by_scan(
        config: Config) -> None:
    """Every article stored again (an upgrade, a new time zone) takes a delete each: a
    scan of a table for each made that quadratic (35 s at 10,000 instead of 7 s)."""
    write_source(config, "cls-seed.md", SEED_TEXT)
    await refresh(config)
    with sqlite3.connect(config.database) as db:  # as version 2 left it: no such index
        db.execute("DROP INDEX article_categories_by_path")
        db.execute("PRAGMA user_version = 2")
    await refresh(config)
    with sqlite3.connect(config.database) as db:
        db.execute("PRAGMA foreign_keys = ON")
        for table in ("articles", "article_categories", "article_images"):
            plan = " ".join(row[-1] for row in db.execute(
                f"EXPLAIN QUERY PLAN DELETE FROM {table} WHERE path = 'x'"))
            assert "SCAN" not in plan, (table, plan)


# -- kill -9 ----------------------------------------------------------------------------


def write_corpus(config: Config, count: int) -> None:
    """``count`` small articles in 27 categories, spread over folders and dates."""
    for i in range(count):
        write_source(config, f"d{i % 10}/a{i:04d}.md", (
            f"---\ntitle: Article {i}\ncategories: [c{i % 20}, 分类{i % 7}]\n"
            f"date: 2022-03-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:00\n---\n"
            + f"<p>第 {i} 篇.</p>\n"
        ))


def assert_output_intact(config: Config, context: str) -> None:
    """Every feed parses, every JSON feed loads, every page is whole."""
    feeds = config.paths.feeds
    for path in feeds.rglob("*.xml"):
        parsed = feedparser.parse(path.read_bytes())
        assert parsed.bozo == 0, (context, path, parsed.get("bozo_exception"))
    for path in feeds.rglob("*.json"):
        try:
            json.loads(path.read_bytes())
        except ValueError as e:
            raise AssertionError(f"{context}: {path}: {e}") from e
    for path in feeds.rglob("*.html"):
        assert path.read_bytes().endswith(b"</html>\n"), (context, path)


async def test_a_source_dated_past_2262_is_published(config: Config) -> None:
    write_source(config, "future.md", dated("Future", 2))
    os.utime(config.paths.sources / "future.md", ns=(0, 10**19))  # year 2286
    summary = await refresh(config)
    assert (summary.articles, summary.failed) == (1, 0)
    assert titles(config, "all") == ["Future"]


async def test_a_refresh_stopped_after_one_that_failed_is_told_unfinished(
        config: Config, tmp_path: Path) -> None:
    write_source(config, "a.md", article_text("A"))
    write_source(config, "b.md", article_text("B"))
    await refresh(config)
    with open_refresher(config) as refresher:
        assert not unfinished(config, refresher.store)
        config.paths.sources.rename(tmp_path / "away")
        with pytest.raises(FeederError):
            await refresher.refresh()
        assert not unfinished(config, refresher.store)  # it failed, and status says why
        (tmp_path / "away").rename(config.paths.sources)
        write_source(config, "c.md", article_text("C"))
        with pytest.raises(RefreshAbandoned):
            await refresher.refresh(AbandonAfter(refresher, "write", 0))
        assert unfinished(config, refresher.store)
        await refresher.refresh()
        assert not unfinished(config, refresher.store)


class AbandonAfter:
    """Progress that abandons the refresh after ``steps`` steps of ``stage``: as a SIGTERM
    (or a kill, or a full disk) would stop it there."""

    def __init__(self, refresher: Refresher, stage: str, steps: int) -> None:
        self.refresher, self.stage, self.steps = refresher, stage, steps

    def start(self, stage: str, total: int) -> None:
        if stage == self.stage and self.steps == 0:
            self.refresher.abandon()

    def advance(self, stage: str, amount: int = 1) -> None:
        if stage == self.stage:
            self.steps -= amount
            if self.steps <= 0:
                self.refresher.abandon()


class HoldAfterFirstFile:
    """Progress that holds the worker thread after its first parsed file, as a slow file
    (a big one, a hung network share) would; then raises ``error``, if given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.held, self.release = threading.Event(), threading.Event()
        self.parsed = 0
        self.error = error

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, amount: int = 1) -> None:
        if stage == "parse":
            self.parsed += amount
            if self.parsed == 1:
                self.held.set()
                self.release.wait(10)
                if self.error is not None:
                    raise self.error


async def test_a_cancelled_refresh_ends_with_its_worker_and_keeps_what_it_parsed(
        config: Config) -> None:
    """Ctrl-C on `feeder refresh`, or a daemon's SIGTERM: the refresh is cancelled."""
    write_source(config, "cls-seed.md", SEED_TEXT)
    await refresh(config)
    for day in range(1, 6):
        write_source(config, f"a{day}.md", dated(f"A{day}", day))
    progress = HoldAfterFirstFile()
    with open_refresher(config) as refresher:
        running = asyncio.create_task(refresher.refresh(progress))
        await asyncio.to_thread(progress.held.wait, 10)
        running.cancel()
        asyncio.get_running_loop().call_later(0.2, progress.release.set)
        with pytest.raises(asyncio.CancelledError):
            await running
        # It ended once its worker had (the store is closed next), and that stopped at
        # the next file instead of parsing them all.
        assert progress.release.is_set()
        assert progress.parsed == 1
    summary = await refresh(config)
    assert (summary.changed, summary.articles) == (4, 6)


class Crash(Exception):
    pass


class CrashAfter:
    """Progress that raises after ``files`` parsed files, as a crash there would stop it."""

    def __init__(self, files: int) -> None:
        self.files = files

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, amount: int = 1) -> None:
        self.files -= amount
        if stage == "parse" and self.files == 0:
            raise Crash


async def test_a_crash_while_parsing_loses_one_batch_of_files_at_most(config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    await refresh(config)
    for i in range(700):
        write_source(config, f"many/{i:03d}.md", dated(f"Many {i}", 1 + i % 28))
    with open_refresher(config) as refresher, pytest.raises(Crash):
        await refresher.refresh(CrashAfter(650))
    summary = await refresh(config)
    assert (summary.changed, summary.articles) == (200, 701)  # the first 500 were kept
    assert len(feed(config, "all", "atom.xml").entries) == 50
    assert len(list((config.paths.feeds / "articles").iterdir())) == 701


async def test_an_error_of_a_cancelled_refresh_is_logged(
        config: Config, caplog: pytest.LogCaptureFixture) -> None:
    write_source(config, "a.md", dated("A1", 1))
    progress = HoldAfterFirstFile(OSError(28, "No space left on device"))
    with open_refresher(config) as refresher:
        running = asyncio.create_task(refresher.refresh(progress))
        await asyncio.to_thread(progress.held.wait, 10)
        running.cancel()
        progress.release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == "the cancelled refresh failed before it stopped"
    assert record.exc_info is not None
    assert "No space left on device" in str(record.exc_info[1])


def parse_in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sources are parsed in 2 worker processes, as thousands of them are on 2 CPUs or more."""
    monkeypatch.setattr(feeder.refresh, "_POOL_MIN_SOURCES", 2)
    monkeypatch.setattr(feeder.refresh, "_POOL_BATCH", 3)
    monkeypatch.setattr(feeder.refresh, "_cpus", lambda: 2)


def publish_mixed_folder(config: Config) -> None:
    for path, data in BAD_SOURCES.items():
        write_source(config, path, data, mtime=T0)
    for path, (data, _) in GOOD_SOURCES.items():
        write_source(config, path, data, mtime=T0)


async def test_worker_processes_publish_what_one_thread_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    alone = make_config(tmp_path / "alone", sources={"max_bytes": 65_536})
    publish_mixed_folder(alone)
    summary = await refresh(alone)
    parse_in_workers(monkeypatch)
    config = make_config(tmp_path / "workers", sources={"max_bytes": 65_536})
    publish_mixed_folder(config)
    with caplog.at_level(logging.INFO, "feeder.refresh"):
        in_workers_summary = await refresh(config)
    assert f"parsing {len(BAD_SOURCES) + len(GOOD_SOURCES)} sources in 2 worker processes" in (
        caplog.text)
    assert not multiprocessing.active_children()
    assert (in_workers_summary.errors, in_workers_summary.articles) == (
        summary.errors, summary.articles)
    assert titles(config, "all") == titles(alone, "all")
    pages = [snapshot(c.paths.feeds / "articles") for c in (config, alone)]
    assert [{name: data for name, (_, data) in p.items()} for p in pages] == [
        {name: data for name, (_, data) in pages[1].items()}] * 2


async def test_a_refresh_abandoned_while_worker_processes_parse_keeps_what_they_parsed(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    await refresh(config)
    parse_in_workers(monkeypatch)
    for i in range(60):
        write_source(config, f"many/{i:03d}.md", dated(f"Many {i}", 1 + i % 28))
    with open_refresher(config) as refresher, pytest.raises(RefreshAbandoned):
        await refresher.refresh(AbandonAfter(refresher, "parse", 10))
    assert not multiprocessing.active_children()
    summary = await refresh(config)
    assert (summary.changed, summary.articles) == (50, 61)
    assert len(list((config.paths.feeds / "articles").iterdir())) == 61


def die(*args: object) -> None:
    """A worker process's task that kills it, as the kernel's OOM killer would."""
    os._exit(9)


def die_or_dawdle(config: Config, root: Path, batch: list[Any], reparse: bool
                  ) -> list[SourceRead]:
    """A worker's task: one batch kills its worker, the others take their time."""
    if any(file.path == "many/000.md" for file, _ in batch):
        os._exit(9)
    time.sleep(1)
    return feeder.sources.read_and_parse_all(config, root, batch, reparse)


@pytest.mark.parametrize(("task", "left"), [
    (die, "parsing the 12 sources left in the refresh's thread"),
    (die_or_dawdle, "sources left in the refresh's thread"),  # ignoring SIGTERM hung this
], ids=["all-die", "one-dies-while-the-other-works"])
async def test_a_refresh_whose_worker_processes_die_parses_the_rest_in_its_own_thread(
        config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        task: Callable[..., list[SourceRead]], left: str) -> None:
    parse_in_workers(monkeypatch)
    monkeypatch.setattr(feeder.refresh, "read_and_parse_all", task)
    for i in range(12):  # several KB each: a batch's answer fills a pipe
        write_source(config, f"many/{i:03d}.md", dated(f"Many {i}", 1 + i) + "x" * 30_000)
    summary = await asyncio.wait_for(refresh(config), 60)
    assert (summary.articles, summary.failed) == (12, 0)
    assert len(titles(config, "all")) == 12
    assert "parsing in worker processes failed" in caplog.text
    assert left in caplog.text
    assert not multiprocessing.active_children()


def log_and_parse(*args: Any) -> list[SourceRead]:
    """A worker process's task that logs a line, then does its work."""
    logging.getLogger("feeder.sources").warning("worker %d: a batch", os.getpid())
    return feeder.sources.read_and_parse_all(*args)


async def test_what_worker_processes_log_is_logged_as_this_process_logs(
        config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    parse_in_workers(monkeypatch)
    monkeypatch.setattr(feeder.refresh, "read_and_parse_all", log_and_parse)
    for i in range(6):
        write_source(config, f"many/{i:03d}.md", dated(f"Many {i}", 1 + i))
    summary = await refresh(config)
    assert summary.articles == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "feeder.sources"]
    assert len(lines) == 2  # 6 sources, in batches of 3
    assert all(line.startswith("worker ") and line != f"worker {os.getpid()}: a batch"
               for line in lines)


async def test_temp_files_of_an_unfinished_refresh_are_removed_by_the_next(config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    await refresh(config)
    write_source(config, "new.md", dated("New", 2))
    with open_refresher(config) as refresher, pytest.raises(RefreshAbandoned):
        await refresher.refresh(AbandonAfter(refresher, "write", 0))
    # What a kill in the middle of writes leaves: temp files beside feeds, pages, images.
    page = article_page_path(article_id("new.md"))
    litter = [config.paths.feeds / ".index.html.tmp",
              (config.paths.feeds / page).with_name(f".{article_id('new.md')}.html.tmp"),
              config.paths.cache / ".0123abcd.png.part"]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    mine = config.paths.feeds / ".htaccess"
    mine.write_text("kept")

    summary = await refresh(config)
    assert summary.articles == 2
    assert [path for path in litter if path.exists()] == []
    assert mine.read_text() == "kept"
    assert (config.paths.feeds / page).is_file()
    assert "New" in titles(config, "all")


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no worker processes")
def test_kill_9_of_a_refresh_leaves_no_worker_process(tmp_path: Path) -> None:
    config_file = write_config_file(tmp_path)
    write_corpus(load_config(config_file), feeder.refresh._POOL_MIN_SOURCES)
    process = subprocess.Popen([sys.executable, "-m", "feeder", "-c", str(config_file), "refresh"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = wait_for_workers(process.pid, 2, process.poll)
    finally:
        process.kill()
        process.wait()
    for _ in range(50):
        if not any(map(running, workers)):
            break
        time.sleep(0.1)
    assert not any(map(running, workers)), "worker processes outlived their killed parent"


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no worker processes")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_refresh_stopped_by_a_signal_says_so_and_leaves_nothing_running(
        tmp_path: Path, sig: signal.Signals) -> None:
    config_file = write_config_file(tmp_path)
    write_corpus(load_config(config_file), feeder.refresh._POOL_MIN_SOURCES)
    command = [sys.executable, "-m", "feeder", "-c", str(config_file), "refresh"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_for_workers(process.pid, 2, process.poll)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, err
    assert err.splitlines()[-1] == (f"Error: refresh stopped by {sig.name}: every file it "
                                    "wrote is whole, and the next refresh completes it")
    assert "leaked" not in err  # multiprocessing's complaint of a killed pool
    assert not any(map(running, workers))
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert f" {feeder.refresh._POOL_MIN_SOURCES} articles" in again.stdout


@pytest.mark.slow
def test_kill_9_never_leaves_a_broken_file(tmp_path: Path) -> None:
    overrides = {"feeds": {"items": 10}}
    config_file = write_config_file(tmp_path, **overrides)
    config = load_config(config_file)
    write_corpus(config, 2000)
    command = [sys.executable, "-m", "feeder", "-c", str(config_file), "refresh"]

    def run_to_completion() -> float:
        started = time.monotonic()
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr.decode()
        return time.monotonic() - started

    # One full run first: how long a cold run takes here, to spread the kills across one.
    cold = run_to_completion()
    assert_output_intact(config, "after a complete run")
    rng = random.Random()
    rounds = 5
    killed_while_running = 0
    for n in range(rounds):
        # Every round rewrites every feed and page (a new base URL); every other round
        # parses everything again too (no state), so that both stages get interrupted.
        if n % 2 == 1:
            shutil.rmtree(config.paths.state, ignore_errors=True)
        site = {"base_url": f"http://round{n}.example.test"}
        write_config_file(tmp_path, site=site, **overrides)
        delay = cold * (0.05 + 0.85 * (n + rng.random()) / rounds)
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            time.sleep(delay)
            if process.poll() is None:
                killed_while_running += 1
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=30)
        assert_output_intact(config, f"after kill -9 at {delay:.2f}s (round {n})")
    assert killed_while_running > 0

    run_to_completion()  # picks up where the last killed run stopped
    assert_output_intact(config, "after the final run")
    assert not list(config.paths.feeds.rglob(".*.tmp"))
    entries = feed(config, "all").entries
    assert len(entries) == 10
    assert all(e.link.startswith(f"http://round{rounds - 1}.example.test/") for e in entries)
    pages = list((config.paths.feeds / "articles").glob("*.html"))
    assert len(pages) == 2000
    final_links = f"http://round{rounds - 1}.example.test/feeds/categories/".encode()
    assert all(final_links in page.read_bytes() for page in pages)
    assert len(list((config.paths.feeds / "categories").iterdir())) == 27
    opml = ElementTree.parse(config.paths.feeds / "index.opml").getroot()
    assert len(opml.findall("body/outline")) == 28


# -- interrupted refreshes --------------------------------------------------------------


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("seed", range(40))
async def test_after_interrupted_refreshes_the_output_is_what_a_fresh_build_gives(
        tmp_path: Path, seed: int) -> None:
    """Edits, deletions, moves between categories and slugs, each followed by a refresh
    stopped at a random point; then one refresh that finishes must leave no trace."""
    rng = random.Random(seed)
    config = make_config(tmp_path / "live", feeds={"items": 2})
    config.paths.sources.mkdir(parents=True)
    categories = ["A", "B", "a b", "a-b"]  # the last two share a slug
    mtime = T0
    for step in range(6):
        for _ in range(rng.randint(1, 3)):
            name = f"s{rng.randint(0, 4)}.md"
            roll = rng.random()
            if roll < 0.25:
                (config.paths.sources / name).unlink(missing_ok=True)
            elif roll < 0.3:
                shutil.rmtree(config.paths.feeds / "articles", ignore_errors=True)
            else:
                mtime += 60
                chosen = rng.sample(categories, rng.randint(1, 2))
                write_source(config, name, dated(f"{name} {step}", rng.randint(1, 9), chosen),
                             mtime=mtime)
        with open_refresher(config) as refresher:
            stop = AbandonAfter(refresher, rng.choice(["parse", "write"]), rng.randint(0, 5))
            with contextlib.suppress(RefreshAbandoned):
                await refresher.refresh(stop)
    await refresh(config)
    fresh = make_config(tmp_path / "fresh", feeds={"items": 2})
    shutil.copytree(config.paths.sources, fresh.paths.sources)
    # Categories keep the folders they were published in: a fresh build finds them.
    for folder in (config.paths.feeds / "categories").iterdir():
        (fresh.paths.feeds / "categories" / folder.name).mkdir(parents=True)
    await refresh(fresh)
    assert contents(config.paths.feeds) == contents(fresh.paths.feeds)


async def test_pages_of_over_a_thousand_changed_sources_are_each_their_own(
        config: Config) -> None:
    # Pages are built from articles loaded hundreds at a time: each page must still
    # show its own article, and a source deleted among them lose its page.
    write_corpus(config, 1200)
    await refresh(config)
    gone = [f"d{i % 10}/a{i:04d}.md" for i in range(0, 1200, 98)]
    for path in gone:
        (config.paths.sources / path).unlink()
    for i in range(1, 1200, 2):
        write_source(config, f"d{i % 10}/a{i:04d}.md", article_text(f"Edited {i}"))
    summary = await refresh(config)
    assert summary.articles == 1200 - len(gone)
    pages = config.paths.feeds / "articles"
    for i in range(1200):
        path = f"d{i % 10}/a{i:04d}.md"
        page = pages / f"{article_id(path)}.html"
        if path in gone:
            assert not page.exists(), path
        else:
            title = f"Edited {i}" if i % 2 else f"Article {i}"
            assert f"<h1>{title}</h1>" in page.read_text(encoding="utf-8"), path
