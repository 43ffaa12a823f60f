"""Feeds as readers see them: slugs, RSS/Atom/JSON documents, ordering, ids and dates."""

from __future__ import annotations

import hashlib
import html
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import feedparser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from feeder.config import Config
from feeder.feeds import (
    FeedInfo,
    build_article_page,
    build_feed,
    category_slugs,
    published_slugs,
    slugify,
)
from feeder.refresh import open_refresher
from feeder.sources import SourceParser
from feeder.types import Article, CachedImageInfo
from tests.conftest import SEED_TEXT, article_text, make_config, write_source

MTIME = datetime(2021, 6, 1, tzinfo=UTC)
RSS = "rss.xml"
ATOM = "atom.xml"
JSON = "feed.json"
FINANCE = FeedInfo("金融", "categories/金融", "Test feeds: 金融")


def make_article(config: Config, path: str, title: str, published: datetime,
                 updated: datetime | None = None, **front: object) -> Article:
    meta: dict[str, object] = {"date": published.isoformat(), "categories": ["金融"], **front}
    if updated is not None:
        meta["updated"] = updated.isoformat()
    text = article_text(title, f"<p>{title} body</p>", **meta)
    return SourceParser(config).parse(path, text.encode(), MTIME)


def parse_feed(data: bytes) -> feedparser.FeedParserDict:
    parsed = feedparser.parse(data)
    assert parsed.bozo == 0, parsed.get("bozo_exception")
    return parsed


@pytest.fixture
def articles(config: Config) -> list[Article]:
    """Three articles, newest first (the order the store gives them in)."""
    base = datetime(2022, 3, 30, 3, tzinfo=UTC)
    return [
        make_article(config, "c.md", "Third", base + timedelta(days=2)),
        make_article(config, "b.md", "Second", base + timedelta(days=1),
                     updated=base + timedelta(days=5)),
        make_article(config, "a.md", "First", base),
    ]


# -- slugs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("金融", "金融"),
        ("Finance", "Finance"),
        ("科创板: 新股", "科创板-新股"),
        ("A  b -- c", "A-b-c"),
        ("2022年 Q1", "2022年-Q1"),
        ("Ünïcödé", "Ünïcödé"),
        (".hidden", "hidden"),
        ("../etc/passwd", "etc-passwd"),
        ("50% off #1 / why?", "50-off-1-why"),
        ("  spaced  ", "spaced"),
        ("cafe\u0301 noir", "café-noir"),  # decomposed é: composed, not cut
        ("हिन्दी समाचार", "हिन्दी-समाचार"),  # vowel signs and virama are combining marks
        ("\u0301a", "a"),  # a mark that follows no letter is dropped
        ("snake_case", "snake-case"),
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


@pytest.mark.parametrize("name", ["...", "/", "%#?", "-", "  "])
def test_slugify_of_punctuation_only_is_still_safe(name: str) -> None:
    slug = slugify(name)
    assert slug
    assert not slug.startswith(".")
    assert not any(c in slug for c in "/%#?\\ ")


def test_colliding_slugs_both_get_a_hash_suffix() -> None:
    slugs = category_slugs(["a b", "a-b", "a.b", "c"], {})
    for name in ("a b", "a-b", "a.b"):
        assert slugs[name] == "a-b-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    assert slugs["c"] == "c"
    assert len(set(slugs.values())) == 4


def test_slug_overrides_from_config() -> None:
    slugs = category_slugs(["金融", "深度"], {"金融": "finance"})
    assert slugs == {"金融": "finance", "深度": "深度"}


@pytest.mark.parametrize("other", ["finance", "Finance", "finance!"])
def test_a_configured_slug_is_kept_and_a_derived_one_gives_way(other: str) -> None:
    slugs = category_slugs(["金融", other], {"金融": "finance"})
    assert slugs == {"金融": "finance",
                     other: slugify(other) + "-" + hashlib.sha1(other.encode()).hexdigest()[:6]}


def test_a_hash_suffix_never_lands_on_another_category_s_slug() -> None:
    # "C" and "C#" share the slug "C"; "C"'s 6-digit suffix would give "C-32096c".
    assert "C-" + hashlib.sha1(b"C").hexdigest()[:6] == "C-32096c"
    slugs = category_slugs(["C", "C#", "C-32096c"], {})
    assert slugs["C-32096c"] == "C-32096c"
    assert slugs["C"] == "C-" + hashlib.sha1(b"C").hexdigest()[:12]
    assert len(set(slugs.values())) == 3


def test_slugs_differing_only_in_case_both_get_a_suffix() -> None:
    slugs = category_slugs(["News", "news", "金融"], {})
    assert len({slug.casefold() for slug in slugs.values()}) == 3
    assert slugs["金融"] == "金融"


def test_a_published_slug_is_kept_and_the_newcomer_gets_the_suffix() -> None:
    suffix = {name: "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
              for name in ("a b", "a.b", "tech", "Tech")}
    published = {"a/b": "a-b", "Tech": "Tech"}
    assert category_slugs(["a/b", "a b", "a.b", "Tech", "tech"], {}, published) == {
        "a/b": "a-b", "a b": "a-b" + suffix["a b"], "a.b": "a-b" + suffix["a.b"],
        "Tech": "Tech", "tech": "tech" + suffix["tech"]}
    # Published with a suffix, while its twin was there: kept after the twin left.
    assert category_slugs(["Tech"], {}, {"Tech": "Tech" + suffix["Tech"]}) == {
        "Tech": "Tech" + suffix["Tech"]}


def test_published_slugs_are_read_back_from_the_folders_where_they_tell() -> None:
    suffix = {name: "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
              for name in ("a b", "tech")}
    folders = ["a-b", "a-b" + suffix["a b"], "Tech", "tech" + suffix["tech"], "x-y", "old"]
    names = ["a/b", "a b", "Tech", "tech", "x y", "x.y", "new"]
    assert published_slugs(names, folders) == {
        "a/b": "a-b", "a b": "a-b" + suffix["a b"], "Tech": "Tech",
        "tech": "tech" + suffix["tech"]}  # "x-y" may be either's: neither's


def test_a_configured_slug_takes_a_published_one_which_moves() -> None:
    slugs = category_slugs(["金融", "深度"], {"深度": "finance"}, {"金融": "finance"})
    assert slugs == {"深度": "finance", "金融": "金融"}


def test_a_long_name_gets_a_short_slug_of_its_own() -> None:
    # 4-byte letters: 64 of them are 256 bytes, more than a folder name may have.
    names = ["a" * 300, "a" * 299, "长" * 200, "𠀀" * 64, "𝐀" * 100, "𝐀" * 100 + "!"]
    slugs = category_slugs(names, {})
    assert len(set(slugs.values())) == len(names)
    assert all(len(slug) <= 64 for slug in slugs.values())
    assert all(len(slug.encode("utf-8")) <= 200 for slug in slugs.values())
    assert slugs["a" * 300].startswith("a" * 50)
    assert slugs["𠀀" * 64].startswith("𠀀" * 40)


def test_the_longest_slug_config_allows_still_fits_a_folder_name_when_shared(
        tmp_path: Path) -> None:
    longest = "长" * 66 + "ab"  # 200 bytes: the most feeds.slugs allows
    assert make_config(tmp_path, feeds={"slugs": {"a": longest}}).feeds.slugs["a"] == longest
    # Config refuses one slug for two categories; category_slugs still copes.
    slugs = category_slugs(["a", "b"], {"a": longest, "b": longest})
    assert len(set(slugs.values())) == 2
    assert all(len(slug.encode("utf-8")) <= 255 for slug in slugs.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=300), max_size=12, unique=True))
def test_every_category_gets_its_own_safe_folder(names: list[str]) -> None:
    slugs = category_slugs(names, {})
    assert len({slug.casefold() for slug in slugs.values()}) == len(names)
    for slug in slugs.values():
        assert 0 < len(slug.encode("utf-8")) <= 255
        assert not slug.startswith(".")
        assert not set(slug) & {"/", "\\", "\0"}


# -- documents --------------------------------------------------------------------------


def test_rss_and_atom_are_valid_and_newest_first(config: Config,
                                                 articles: list[Article]) -> None:
    documents = build_feed(FINANCE, articles, {}, config)
    assert set(documents) == {RSS, ATOM, JSON}
    for name in (RSS, ATOM):
        parsed = parse_feed(documents[name])
        assert [e.title for e in parsed.entries] == ["Third", "Second", "First"]
        assert parsed.feed.title == "Test feeds: 金融"
    assert parse_feed(documents[RSS]).version == "rss20"
    assert parse_feed(documents[ATOM]).version == "atom10"


def test_guid_is_not_a_permalink_and_ignores_base_url(tmp_path: Path,
                                                      articles: list[Article]) -> None:
    one = make_config(tmp_path, site={"base_url": "https://one.example"})
    two = make_config(tmp_path, site={"base_url": "https://two.example/sub"})
    rss_one = build_feed(FINANCE, articles, {}, one)[RSS]
    rss_two = build_feed(FINANCE, articles, {}, two)[RSS]
    guids = re.findall(rb'<guid isPermaLink="false">([^<]+)</guid>', rss_one)
    assert len(guids) == 3
    assert guids == re.findall(rb'<guid isPermaLink="false">([^<]+)</guid>', rss_two)
    for guid in guids:
        assert b"one.example" not in guid
        assert guid.startswith((b"urn:", b"tag:"))
    ids_one = [e.id for e in parse_feed(build_feed(FINANCE, articles, {}, one)[ATOM]).entries]
    ids_two = [e.id for e in parse_feed(build_feed(FINANCE, articles, {}, two)[ATOM]).entries]
    assert ids_one == ids_two == [g.decode() for g in guids]
    json_one = json.loads(build_feed(FINANCE, articles, {}, one)[JSON])
    assert [i["id"] for i in json_one["items"]] == ids_one
    # The feed's own id does not move with the site either.
    assert (parse_feed(build_feed(FINANCE, articles, {}, one)[ATOM]).feed.id
            == parse_feed(build_feed(FINANCE, articles, {}, two)[ATOM]).feed.id)


def test_guid_is_stable_across_edits(config: Config) -> None:
    when = datetime(2022, 3, 30, tzinfo=UTC)
    before = make_article(config, "x.md", "Before", when)
    after = make_article(config, "x.md", "After the edit", when + timedelta(hours=1))
    other = make_article(config, "y.md", "Before", when)
    guid = [parse_feed(build_feed(FINANCE, [a], {}, config)[RSS]).entries[0].id
            for a in (before, after, other)]
    assert guid[0] == guid[1] != guid[2]


def test_last_build_date_is_newest_change_not_the_clock(config: Config,
                                                        articles: list[Article]) -> None:
    first = build_feed(FINANCE, articles, {}, config)
    rss = parse_feed(first[RSS])
    atom = parse_feed(first[ATOM])
    newest_change = datetime(2022, 4, 4, 3, tzinfo=UTC)  # "Second" was updated last
    assert rss.feed.updated_parsed[:6] == newest_change.timetuple()[:6]
    assert atom.feed.updated_parsed[:6] == newest_change.timetuple()[:6]
    assert b"<lastBuildDate>Mon, 04 Apr 2022 03:00:00 +0000</lastBuildDate>" in first[RSS]
    # Built again (the clock has moved on): the very same bytes.
    assert build_feed(FINANCE, list(articles), {}, config) == first


def test_last_build_date_uses_date_when_nothing_was_updated(config: Config) -> None:
    when = datetime(2022, 3, 30, 3, 17, 49, tzinfo=UTC)
    docs = build_feed(FINANCE, [make_article(config, "a.md", "A", when)], {}, config)
    assert b"<lastBuildDate>Wed, 30 Mar 2022 03:17:49 +0000</lastBuildDate>" in docs[RSS]
    assert parse_feed(docs[ATOM]).feed.updated_parsed[:6] == when.timetuple()[:6]


def test_empty_feed_is_valid_and_not_dated_by_the_clock(config: Config) -> None:
    docs = build_feed(FINANCE, [], {}, config)
    assert parse_feed(docs[RSS]).entries == []
    assert parse_feed(docs[ATOM]).entries == []
    assert f"{datetime.now(UTC):%d %b %Y}".encode() not in docs[RSS]
    assert build_feed(FINANCE, [], {}, config) == docs
    assert json.loads(docs[JSON])["items"] == []


def test_item_link_is_the_page_unless_the_source_has_one(config: Config) -> None:
    when = datetime(2022, 3, 30, tzinfo=UTC)
    own = make_article(config, "own.md", "Own", when, link="https://www.cls.cn/detail/1")
    page = make_article(config, "page.md", "Page", when - timedelta(days=1))
    docs = build_feed(FINANCE, [own, page], {}, config)
    for name in (RSS, ATOM):
        entries = parse_feed(docs[name]).entries
        assert entries[0].link == "https://www.cls.cn/detail/1"
        assert entries[1].link == f"http://feeds.example.test/feeds/articles/{page.id}.html"
    items = json.loads(docs[JSON])["items"]
    assert [i["url"] for i in items] == [
        "https://www.cls.cn/detail/1", f"http://feeds.example.test/feeds/articles/{page.id}.html"
    ]


def test_a_page_shows_its_date_in_the_site_s_time_zone(config: Config) -> None:
    article = make_article(config, "a.md", "A", datetime(2022, 3, 30, 3, 17, 49, tzinfo=UTC))
    page = build_article_page(article, {}, {"金融": "金融"}, config).decode()
    assert config.site.timezone == "Asia/Shanghai"
    assert '<time datetime="2022-03-30T03:17:49Z">2022-03-30 11:17 +0800</time>' in page


def test_category_feed_links_are_percent_encoded(config: Config,
                                                 articles: list[Article]) -> None:
    docs = build_feed(FINANCE, articles, {}, config)
    encoded = "http://feeds.example.test/feeds/categories/%E9%87%91%E8%9E%8D/"
    for name in (RSS, ATOM):
        links = etree.fromstring(docs[name]).xpath(
            "//*[local-name()='link'][@rel='self']/@href")
        assert links == [encoded + name]
        assert all(ord(c) < 128 for c in links[0])
    assert json.loads(docs[JSON])["feed_url"] == encoded + JSON


def test_atom_self_link_in_both(config: Config, articles: list[Article]) -> None:
    docs = build_feed(FeedInfo(None, "all", "Test feeds"), articles, {}, config)
    rss = etree.fromstring(docs[RSS])
    self_links = rss.findall("channel/{http://www.w3.org/2005/Atom}link[@rel='self']")
    assert [e.get("href") for e in self_links] == ["http://feeds.example.test/feeds/all/rss.xml"]
    atom = etree.fromstring(docs[ATOM])
    self_links = atom.findall("{http://www.w3.org/2005/Atom}link[@rel='self']")
    assert [e.get("href") for e in self_links] == ["http://feeds.example.test/feeds/all/atom.xml"]


@pytest.mark.parametrize(("interval", "ttl"), [(900, "15"), (60, "1"), (3600, "60")])
def test_rss_ttl_is_interval_in_minutes(tmp_path: Path, interval: int, ttl: str,
                                        articles: list[Article]) -> None:
    config = make_config(tmp_path, schedule={"interval": interval})
    rss = etree.fromstring(build_feed(FINANCE, articles, {}, config)[RSS])
    assert rss.findtext("channel/ttl") == ttl


def test_json_feed(config: Config, articles: list[Article]) -> None:
    feed = json.loads(build_feed(FINANCE, articles, {}, config)[JSON])
    assert feed["version"] == "https://jsonfeed.org/version/1.1"
    assert feed["title"] == "Test feeds: 金融"
    assert feed["home_page_url"].startswith("http://feeds.example.test")
    assert [i["title"] for i in feed["items"]] == ["Third", "Second", "First"]
    for item in feed["items"]:
        assert item["id"]
        assert item["content_html"].startswith("<p>")
        datetime.fromisoformat(item["date_published"].replace("Z", "+00:00"))
    assert feed["items"][1]["date_modified"] == "2022-04-04T03:00:00Z"
    assert feed["items"][2]["date_published"] == "2022-03-30T03:00:00Z"


def test_seed_in_every_format(config: Config) -> None:
    seed = SourceParser(config).parse("cls-seed.md", SEED_TEXT.encode(), MTIME)
    docs = build_feed(FINANCE, [seed], {}, config)
    for name in (RSS, ATOM):
        entry = parse_feed(docs[name]).entries[0]
        assert entry.title == seed.title
        assert entry.author == "财联社"
        assert {t.term for t in entry.tags} >= {"金融", "财联社", "深度"}
        assert "img.cls.cn/images/20220330/c8Agbj08W6.png" in entry.content[0].value
        assert entry.published_parsed[:6] == (2022, 3, 30, 3, 17, 49)
    # Not cached yet: no enclosure (an enclosure needs its true length).
    assert b"<enclosure" not in docs[RSS]
    assert b'rel="enclosure"' not in docs[ATOM]
    item = json.loads(docs[JSON])["items"][0]
    assert item["authors"] == [{"name": "财联社"}]
    assert "attachments" not in item
    assert "image" not in item


def test_json_item_image_is_a_cached_head_image_else_thumbnail(config: Config) -> None:
    head, thumb = "https://img.cls.cn/images/h.png", "https://img.cls.cn/images/t.png"
    article = make_article(config, "a.md", "A", datetime(2022, 3, 30, tzinfo=UTC),
                           headimg=head, thumbnail=thumb)
    for cached, image in (({}, None), ({thumb: "t.png"}, "t.png"),
                          ({head: "h.png", thumb: "t.png"}, "h.png")):
        infos = {url: CachedImageInfo(name, 10, "image/png") for url, name in cached.items()}
        item = json.loads(build_feed(FINANCE, [article], infos, config)[JSON])["items"][0]
        assert item.get("image") == (image and f"http://feeds.example.test/images/{image}")
        assert ("attachments" in item) == (head in cached)
    # From a host feeder does not fetch from, it is left as it is.
    elsewhere = make_article(config, "b.md", "B", datetime(2022, 3, 30, tzinfo=UTC),
                             headimg="https://example.org/h.png")
    item = json.loads(build_feed(FINANCE, [elsewhere], {}, config)[JSON])["items"][0]
    assert item["image"] == "https://example.org/h.png"
    # As a URI, as the item's link is.
    spaced = make_article(config, "c.md", "C", datetime(2022, 3, 30, tzinfo=UTC),
                          headimg="https://example.org/pics/a b/图.png")
    item = json.loads(build_feed(FINANCE, [spaced], {}, config)[JSON])["items"][0]
    assert item["image"] == "https://example.org/pics/a%20b/%E5%9B%BE.png"


def test_html_in_titles_and_content_is_escaped(config: Config) -> None:
    article = make_article(config, "x.md", "A <b>bold</b> & \"quoted\" title",
                           datetime(2022, 3, 30, tzinfo=UTC))
    docs = build_feed(FINANCE, [article], {}, config)
    assert b"<title>A &lt;b&gt;bold&lt;/b&gt; &amp; \"quoted\" title</title>" in docs[RSS]
    for name in (RSS, ATOM):
        assert "bold" in parse_feed(docs[name]).entries[0].title
    assert json.loads(docs[JSON])["items"][0]["title"] == 'A <b>bold</b> & "quoted" title'


def test_a_summary_that_looks_like_markup_is_shown_as_the_text_it_is(config: Config) -> None:
    body = "<p>Use the &lt;video&gt; tag; a&lt;b and c&gt;d; write &amp;lt; for it.</p>"
    text = article_text("T", body, date="2022-03-30T03:00:00+00:00")
    article = SourceParser(config).parse("x.md", text.encode(), MTIME)
    assert article.summary == "Use the <video> tag; a<b and c>d; write &lt; for it."
    docs = build_feed(FINANCE, [article], {}, config)
    for name in (RSS, ATOM):
        summary = parse_feed(docs[name]).entries[0].summary
        assert html.unescape(summary) == article.summary, name


@pytest.mark.parametrize("language", [None, "en-GB"])
def test_every_document_says_its_language(tmp_path: Path, articles: list[Article],
                                          language: str | None) -> None:
    config = make_config(tmp_path, site={"language": language} if language else {})
    expected = language or "zh-CN"
    docs = build_feed(FINANCE, articles, {}, config)
    assert parse_feed(docs[RSS]).feed.language == expected
    assert etree.fromstring(docs[ATOM]).get("{http://www.w3.org/XML/1998/namespace}lang") \
        == expected
    assert json.loads(docs[JSON])["language"] == expected
    page = build_article_page(articles[0], {}, {"金融": "金融"}, config)
    assert page.startswith(f'<!DOCTYPE html>\n<html lang="{expected}">'.encode())


def test_a_page_dates_to_the_second_as_html_asks(config: Config) -> None:
    when = datetime(2022, 3, 30, 3, 17, 49, 123456, tzinfo=UTC)
    page = build_article_page(make_article(config, "a.md", "A", when), {}, {}, config)
    assert b'<time datetime="2022-03-30T03:17:49Z">' in page


def test_a_category_named_all_has_an_id_of_its_own(config: Config,
                                                   articles: list[Article]) -> None:
    ids = {parse_feed(build_feed(feed, articles, {}, config)[ATOM]).feed.id
           for feed in (FeedInfo(None, "all", "All"), FeedInfo("all", "categories/all", "all"),
                        FeedInfo("feed:all", "categories/feed-all", "feed:all"))}
    assert len(ids) == 3


def test_an_enclosure_is_an_atom_link_like_any_other(config: Config) -> None:
    head = "https://img.cls.cn/images/h.png"
    article = make_article(config, "a.md", "A", datetime(2022, 3, 30, tzinfo=UTC), headimg=head)
    atom = build_feed(FINANCE, [article], {head: CachedImageInfo("h.png", 10, "image/png")},
                      config)[ATOM]
    assert b'<link rel="enclosure" href="http://feeds.example.test/images/h.png"' in atom
    enclosure = parse_feed(atom).entries[0].enclosures[0]
    assert (enclosure.href, enclosure.length, enclosure.type) == (
        "http://feeds.example.test/images/h.png", "10", "image/png")


# -- through a refresh: ordering and limits come from the store -------------------------


async def test_feed_holds_at_most_feeds_items_newest_first(tmp_path: Path) -> None:
    config = make_config(tmp_path, feeds={"items": 3})
    base = datetime(2022, 3, 1, tzinfo=UTC)
    for i in range(5):
        when = (base + timedelta(days=i)).isoformat()
        write_source(config, f"a{i}.md", article_text(f"Item {i}", date=when, categories="金融"))
    with open_refresher(config) as refresher:
        await refresher.refresh()
    for folder in ("all", "categories/金融"):
        for name in (RSS, ATOM):
            parsed = parse_feed((config.paths.feeds / folder / name).read_bytes())
            assert [e.title for e in parsed.entries] == ["Item 4", "Item 3", "Item 2"]
        items = json.loads((config.paths.feeds / folder / JSON).read_bytes())["items"]
        assert [i["title"] for i in items] == ["Item 4", "Item 3", "Item 2"]
