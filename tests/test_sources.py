"""Parsing source files: what is accepted (and how it reads), what is refused (and why)."""

from __future__ import annotations

import os
import random
import re
import threading
from datetime import UTC, datetime
from pathlib import Path

import feedparser
import lxml.html
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import feeder.sources
from feeder.config import Config
from feeder.exceptions import FeederError, SourceError
from feeder.feeds import FeedInfo, build_feed
from feeder.imagehtml import is_allowed
from feeder.sources import (
    MAX_AMPERSANDS,
    MAX_DEPTH,
    MAX_MARKDOWN_LINES,
    SEPARATING_ELEMENTS,
    SUMMARY_CHARS,
    SourceParser,
    html_blocks_as_rendered,
    markdown_renderer,
    read_date,
    read_source,
    scan_sources,
    text_of_cleaned,
)
from feeder.types import Article
from tests.conftest import SEED_TEXT, make_config, write_source
from tests.imagerefs import extract_image_urls

MTIME = datetime(2021, 6, 1, 12, 0, 0, tzinfo=UTC)
#: 2022-03-30 11:17:49 in Shanghai.
SEED_DATE = datetime(2022, 3, 30, 3, 17, 49, tzinfo=UTC)


@pytest.fixture
def parser(config: Config) -> SourceParser:
    return SourceParser(config)


def parse(parser: SourceParser, text: str | bytes, path: str = "post.md") -> Article:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return parser.parse(path, data, MTIME)


def refuse(parser: SourceParser, text: str | bytes, path: str = "post.md") -> SourceError:
    with pytest.raises(SourceError) as info:
        parse(parser, text, path)
    assert str(info.value).startswith(path + ":")
    assert info.value.reason in str(info.value)
    return info.value


def front(meta: str, body: str = "Body.") -> str:
    """A source file from front matter lines as written on disk; dated unless ``meta`` says."""
    if "date:" not in meta:
        meta += "\ndate: 2022-03-30 11:17:49"
    return f"---\n{meta.strip()}\n---\n{body}\n"


def seed_body() -> str:
    return SEED_TEXT.split("\n---\n", 2)[2]


def normalized_text(html: str) -> str:
    return " ".join(lxml.html.fragment_fromstring(html, create_parent="div").text_content()
                    .split())


def shown_text(html: str) -> str:
    """The text of ``html`` as a browser lays it out, on one line: the words of elements
    shown apart (paragraphs, list items, cells, line breaks) are apart."""
    tree = lxml.html.fragment_fromstring(html, create_parent="div")
    for element in tree.iter(*SEPARATING_ELEMENTS):
        element.tail = " " + (element.tail or "")
        if element.tag not in lxml.html.defs.empty_tags:
            element.text = " " + (element.text or "")
    return " ".join(tree.text_content().split())


def image_sources(html: str) -> list[str]:
    tree = lxml.html.fragment_fromstring(html, create_parent="div")
    return [img.get("src") for img in tree.iter("img")]


def assert_like_seed(article: Article) -> None:
    assert article.title == "沪上险企战疫进行时：加强健康服务、保障菜篮子、线上线下同守_沪_"
    assert article.categories == ("金融", "财联社", "深度")
    assert article.published == SEED_DATE
    assert article.author == "财联社"


# -- accepted ---------------------------------------------------------------------------


def test_seed_article(parser: SourceParser) -> None:
    article = parse(parser, SEED_TEXT, "cls-seed.md")
    assert_like_seed(article)
    assert article.published.utcoffset() is not None
    assert article.updated is None
    assert article.headimg == "https://img.cls.cn/images/20220330/8ZNa70Fbl8.png"
    assert article.thumbnail == article.headimg
    assert article.link is None
    assert article.warnings == ()
    body_images = [u for u in article.images if u != article.headimg]
    assert len(article.images) >= 4
    assert all(u.startswith("https://img.cls.cn/images/") for u in article.images)
    assert len(body_images) >= 3
    # The HTML body is published as written, only sanitized: same text, same images,
    # same emphasis; no Markdown processing of an HTML body.
    original = seed_body()
    assert normalized_text(article.content) == normalized_text(original)
    assert image_sources(article.content) == image_sources(original)
    assert article.content.count("<strong>") == original.count("<strong>")
    assert article.content.count("<p>") == original.count("<p>")
    assert "referrerpolicy=\"no-referrer\"" in article.content
    assert "财联社（北京，记者 杨芮）讯" in article.summary


def test_leading_blank_line(parser: SourceParser) -> None:
    assert SEED_TEXT.startswith("\n---\n")  # the seed itself has one
    assert_like_seed(parse(parser, SEED_TEXT))
    assert_like_seed(parse(parser, "\n \n\t\n" + SEED_TEXT.lstrip()))


@pytest.mark.parametrize("text", [
    "\ufeff" + SEED_TEXT.lstrip(), "\ufeff" + SEED_TEXT, "\ufeff\ufeff" + SEED_TEXT.lstrip(),
    "\n\ufeff" + SEED_TEXT.lstrip(),
], ids=["bom---", "bom-blank---", "bom-bom---", "blank-bom---"])
def test_utf8_bom_before_front_matter(parser: SourceParser, text: str) -> None:
    article = parse(parser, text.encode())
    assert_like_seed(article)
    assert article.headimg is not None
    assert "title:" not in article.content


def test_crlf_line_ends(parser: SourceParser) -> None:
    article = parse(parser, SEED_TEXT.replace("\n", "\r\n"))
    assert_like_seed(article)
    assert "\r" not in article.content
    assert normalized_text(article.content) == normalized_text(seed_body())


def test_trailing_whitespace(parser: SourceParser) -> None:
    text = "---   \ntitle: Spaced out   \ndate: 2022-03-30 11:17:49  \n---  \nBody.   \n\n\n"
    article = parse(parser, text)
    assert article.title == "Spaced out"
    assert article.published == SEED_DATE
    assert article.content.strip() == "<p>Body.</p>"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("date: Wed, 30 Mar 2022 03:17:49 GMT", SEED_DATE, id="rfc822-gmt"),
        pytest.param("date: Wed, 30 Mar 2022 11:17:49 +0800", SEED_DATE, id="rfc822-offset"),
        pytest.param("date: 2022-03-30T11:17:49+08:00", SEED_DATE, id="iso-offset"),
        pytest.param("date: 2022-03-30T03:17:49Z", SEED_DATE, id="iso-z"),
        pytest.param("date: 2022-03-30t03:17:49z", SEED_DATE, id="iso-lowercase-t-z"),
        pytest.param("date: Wed, 30 Mar 2022 11:17:49", SEED_DATE,
                     id="rfc822-no-zone-is-shanghai"),
        pytest.param("date: Wed, 30 Mar 2022 11:17:49 +08:00", SEED_DATE,
                     id="rfc822-offset-with-colon"),
        pytest.param("date: Wed, 30 Mar 2022 03:17:49 +00:00", SEED_DATE,
                     id="rfc822-utc-with-colon"),
        pytest.param("date: Wed, 30 Mar 2022 03:17:49 -0000 (UTC)", SEED_DATE,
                     id="rfc822-minus-zero-with-comment"),
        pytest.param("date: Wed, 30 Mar 22 03:17:49 GMT", SEED_DATE, id="rfc822-2-digit-year"),
        pytest.param("date: Wed, 30 Mar 22 11:17:49 0800", SEED_DATE,
                     id="rfc822-2-digit-year-unsigned-zone"),
        pytest.param("date: Thu, 29 Feb 24 11:17:49 0800",
                     datetime(2024, 2, 29, 3, 17, 49, tzinfo=UTC), id="rfc822-leap-day"),
        pytest.param("date: 30-Mar-2022 03:17:49 GMT", SEED_DATE, id="rfc850"),
        pytest.param("date: '2022-03-30T11:17:49'", SEED_DATE, id="iso-no-offset-is-shanghai"),
        pytest.param("date: 2022-03-30 11:17:49", SEED_DATE, id="hexo-unquoted-yaml-datetime"),
        pytest.param("date: '2022-03-30 11:17:49'", SEED_DATE, id="hexo-quoted"),
        pytest.param("date: 2022-03-30", datetime(2022, 3, 29, 16, tzinfo=UTC),
                     id="yaml-date-only"),
        pytest.param("date: 2022-03-30 11:17:49 +08:00", SEED_DATE, id="yaml-timestamp-offset"),
    ],
)
def test_date_forms(parser: SourceParser, line: str, expected: datetime) -> None:
    article = parse(parser, front(f"title: t\n{line}"))
    assert article.published == expected
    assert article.published.utcoffset() is not None
    assert article.warnings == ()


def test_rfc822_minus_zero_zone_is_utc(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ndate: Wed, 30 Mar 2022 03:17:49 -0000"))
    assert article.published == SEED_DATE


def test_date_without_offset_follows_configured_timezone(tmp_path: Path) -> None:
    parser = SourceParser(make_config(tmp_path, site={"timezone": "UTC"}))
    article = parse(parser, front("title: t\ndate: 2022-03-30 11:17:49"))
    assert article.published == datetime(2022, 3, 30, 11, 17, 49, tzinfo=UTC)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("updated: Thu, 31 Mar 2022 00:00:00 GMT",
                     datetime(2022, 3, 31, tzinfo=UTC), id="rfc822"),
        pytest.param("updated: 2022-03-31T08:00:00+08:00",
                     datetime(2022, 3, 31, tzinfo=UTC), id="iso-offset"),
        pytest.param("updated: '2022-03-31T08:00:00'",
                     datetime(2022, 3, 31, tzinfo=UTC), id="iso-no-offset"),
        pytest.param("updated: 2022-03-31 08:00:00",
                     datetime(2022, 3, 31, tzinfo=UTC), id="hexo-unquoted"),
        pytest.param("updated: '2022-03-31 08:00:00'",
                     datetime(2022, 3, 31, tzinfo=UTC), id="hexo-quoted"),
        pytest.param("updated: 2022-03-31",
                     datetime(2022, 3, 30, 16, tzinfo=UTC), id="yaml-date-only"),
    ],
)
def test_updated_forms(parser: SourceParser, line: str, expected: datetime) -> None:
    article = parse(parser, front(f"title: t\ndate: 2022-03-30 11:17:49\n{line}"))
    assert article.published == SEED_DATE
    assert article.updated == expected
    assert article.last_change == expected


def test_an_update_dated_before_the_article_dates_nothing(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ndate: 2022-03-30 11:17:49\nupdated: 2022-01-01"))
    assert article.last_change == article.published == SEED_DATE


def test_names_typed_with_decomposed_accents_are_the_same_names(parser: SourceParser) -> None:
    article = parse(parser, front("title: Cafe\u0301\ncategories: [Café, Cafe\u0301]\n"
                                  "author: Ame\u0301lie"))
    assert (article.title, article.categories, article.author) == ("Café", ("Café",), "Amélie")


def test_no_date_uses_mtime_with_warning(parser: SourceParser) -> None:
    article = parse(parser, "---\ntitle: Undated\n---\nBody.\n")
    assert article.published == MTIME
    assert any("date" in w for w in article.warnings)


def test_unreadable_date_is_a_warning(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ndate: sometime last week"))
    assert article.published == MTIME
    assert any("sometime last week" in w for w in article.warnings)


@pytest.mark.parametrize(("line", "warning"), [
    ("date: 2022-02-30", "date: cannot read '2022-02-30' as a date"),
    ("date: 2022-03-30 25:00:00", "date: cannot read '2022-03-30 25:00:00' as a date"),
    ("date: !!timestamp someday", "date: cannot read 'someday' as a date"),
    ("date: 0001-01-01 00:00:00", "date: '0001-01-01T00:00:00' is before 1900"),
    ("date: 1 Jan 0001 00:00 +0800", "date: '1 Jan 0001 00:00 +0800' is before 1900"),
    ("date: 30 Mar 0099 03:17:49 GMT", "date: '30 Mar 0099 03:17:49 GMT' is before 1900"),
    ("date: 30-Mar-0099 03:17:49 GMT", "date: '30-Mar-0099 03:17:49 GMT' is before 1900"),
    ("date: 30 Mar 0000 03:17:49 GMT", "date: cannot read '30 Mar 0000 03:17:49 GMT' as a date"),
    ("date: 0001-01-01T00:00:00Z", "date: '0001-01-01T00:00:00+00:00' is before 1900"),
    ("date: 1899-12-31", "date: '1899-12-31' is before 1900"),
    ("date: 9999-12-31T23:00:00Z", "date: '9999-12-31T23:00:00+00:00' is after 9998"),
    ("date: Wed, 30 Mar 99999999999999999999 03:17:49 GMT",
     "date: cannot read 'Wed, 30 Mar 99999999999999999999 03:17:49 GMT' as a date"),
])
def test_a_date_yaml_or_a_feed_cannot_carry_is_a_warning(parser: SourceParser, line: str,
                                                         warning: str) -> None:
    article = parse(parser, front(f"title: t\n{line}"))
    assert article.published == MTIME
    assert article.warnings == (warning, "no date: using the file's modification time")


@pytest.mark.parametrize("zone", ["CEST", "JST", "hkt", "CEST (Paris)", "PM", "+25:00",
                                  "GMT+2500"])
def test_a_zone_not_understood_is_read_as_utc_with_a_warning(parser: SourceParser,
                                                              zone: str) -> None:
    article = parse(parser, front(f"title: t\ndate: Wed, 30 Mar 2022 03:17:49 {zone}"))
    assert article.published == datetime(2022, 3, 30, 3, 17, 49, tzinfo=UTC)
    name = zone.removesuffix(" (Paris)")  # a comment is no part of it
    assert article.warnings == (f"date: 'Wed, 30 Mar 2022 03:17:49 {zone}': time zone "
                                f"{name!r} not understood: read as UTC",)


@pytest.mark.parametrize("date", [
    "Wed, 30 Mar 2022 03:17:49 EDT", "Wed, 30 Mar 2022 03:17:49 -0400",
    "Wed Mar 30 2022 15:17:49 GMT+0800 (China Standard Time)",  # JavaScript's Date
    "Wed, 30 Mar 2022 05:17:49 UTC-2", "Wed, 30 Mar 2022 12:47:49 GMT+05:30",
])
def test_zones_understood(parser: SourceParser, date: str) -> None:
    article = parse(parser, front(f"title: t\ndate: {date}"))
    assert (article.published, article.warnings) == (
        datetime(2022, 3, 30, 7, 17, 49, tzinfo=UTC), ())


def test_a_zone_not_understood_leaves_the_year_checked(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ndate: Sat, 30 Mar 1850 03:17:49 CEST"))
    assert article.published == MTIME
    assert article.warnings == (
        "date: 'Sat, 30 Mar 1850 03:17:49 CEST': time zone 'CEST' not understood: read as UTC",
        "date: 'Sat, 30 Mar 1850 03:17:49 CEST' is before 1900",
        "no date: using the file's modification time")


@pytest.mark.parametrize(("line", "field", "value"), [
    ("title: 2022-02-30", "title", "2022-02-30"),
    ("tags: [2022-02-30, x]", "tags", ("2022-02-30", "x")),
    ("updated: 2022-02-31", "updated", None),
])
def test_a_timestamp_yaml_cannot_build_is_kept_as_written(parser: SourceParser, line: str,
                                                          field: str, value: object) -> None:
    assert getattr(parse(parser, front(line)), field) == value


@pytest.mark.parametrize("line", ["x: !!int abc", "x: !!float abc", "x: !!bool maybe"])
def test_a_value_its_yaml_tag_cannot_build_refuses_the_file(parser: SourceParser,
                                                            line: str) -> None:
    error = refuse(parser, front(f"title: t\n{line}"), "tagged.md")
    assert error.reason.startswith("invalid YAML front matter: ")


def test_an_unforeseen_error_refuses_that_file_only(parser: SourceParser,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = feeder.sources.show_lazy_images

    def broken_on_a(content: str) -> str:
        if "from-a" in content:
            raise KeyError("a bug")
        return real(content)

    monkeypatch.setattr(feeder.sources, "show_lazy_images", broken_on_a)
    error = refuse(parser, front("title: a", '<img src="https://img.cls.cn/from-a.png">'), "a.md")
    assert error.reason == "unexpected error: KeyError: 'a bug'"
    b = parse(parser, front("title: b", '<img src="https://img.cls.cn/from-b.png">'), "b.md")
    assert b.images == ("https://img.cls.cn/from-b.png",)  # nothing left over from a.md


def test_yaml_aliases_cannot_make_a_file_expensive(parser: SourceParser) -> None:
    levels = ["l0: &l0 [a, b, c, d, e, f, g, h, i, j]"]
    levels += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 5)]
    article = parse(parser, front("\n".join([*levels, "title: *l4", "categories: *l4"])),
                    "bomb-that-was.md")
    assert article.title == "bomb that was"
    assert article.categories == tuple("abcdefghij")
    assert "more than 100 category entries: the rest dropped" in article.warnings
    empty = ["e0: &e0 []"] + [f"e{n}: &e{n} [{', '.join([f'*e{n - 1}'] * 10)}]"
                              for n in range(1, 5)]
    article = parse(parser, front("\n".join([*empty, "title: t", "tags: *e4"])))
    assert article.tags == ()
    assert "more than 100 tag entries: the rest dropped" in article.warnings
    # Entries of mappings count too: 100 lists of the same 100-entry mapping.
    mapping = "m: &m {" + ", ".join(f"k{i}: v" for i in range(100)) + "}"
    lists = f"l: &l [{', '.join(['*m'] * 100)}]"
    article = parse(parser, front("\n".join([mapping, lists, "title: t", "categories: *l"])))
    assert len(article.categories) == 99
    assert len(article.warnings) == 100  # 99 mappings read, and the cap
    # Shown in a warning, a bomb is a short line (title, author, headimg, thumbnail, date).
    sevens = ["s0: &s0 [x, x, x, x, x, x, x]"]
    sevens += [f"s{n}: &s{n} [{', '.join([f'*s{n - 1}'] * 7)}]" for n in range(1, 7)]
    keys = [f"{key}: *s6" for key in ("title", "author", "headimg", "thumbnail", "date")]
    article = parse(parser, front("\n".join([*sevens, *keys])))
    assert len(article.warnings) == 6  # the five, and no date
    assert all(len(warning) < 200 for warning in article.warnings), article.warnings


def test_categories_as_list(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ncategories:\n  - 金融\n  - 深度\n  - 金融"))
    assert article.categories == ("金融", "深度")
    assert article.warnings == ()


def test_category_as_single_string(parser: SourceParser) -> None:
    assert parse(parser, front("title: t\ncategories: 金融")).categories == ("金融",)
    assert parse(parser, front("title: t\ncategory: 深度")).categories == ("深度",)


def test_categories_as_hexo_nested_list(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ncategories:\n  - [金融, 股票]\n  - 深度"))
    assert article.categories == ("金融", "股票", "深度")


def test_no_category_gets_default(tmp_path: Path) -> None:
    default = SourceParser(make_config(tmp_path))
    assert parse(default, front("title: t")).categories == ("Uncategorized",)
    other = SourceParser(make_config(tmp_path, feeds={"default_category": "杂项"}))
    assert parse(other, front("title: t")).categories == ("杂项",)


def test_category_mapping_is_kept_as_key_value_with_warning(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ncategories:\n - 科创板: 新股\n - 金融"))
    assert article.categories == ("科创板: 新股", "金融")
    assert len(article.warnings) == 1
    assert "科创板" in article.warnings[0]


def test_category_comment_entry_is_dropped_with_warning(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\ncategories:\n - #热点\n - 金融"))
    assert article.categories == ("金融",)
    assert len(article.warnings) == 1
    assert "empty" in article.warnings[0]


def test_tags_like_categories(parser: SourceParser) -> None:
    assert parse(parser, front("title: t\ntags: [a, b, a]")).tags == ("a", "b")
    assert parse(parser, front("title: t\ntags: 单个")).tags == ("单个",)
    assert parse(parser, front("title: t\ntags:\n - [x, y]\n - z")).tags == ("x", "y", "z")
    assert parse(parser, front("title: t")).tags == ()
    mapping = parse(parser, front("title: t\ntags:\n - 科创板: 新股"))
    assert mapping.tags == ("科创板: 新股",)
    assert len(mapping.warnings) == 1
    comment = parse(parser, front("title: t\ntags:\n - #热点\n - ok"))
    assert comment.tags == ("ok",)
    assert len(comment.warnings) == 1


def test_no_title_comes_from_file_name(parser: SourceParser) -> None:
    article = parse(parser, "---\ndate: 2022-03-30 11:17:49\n---\nBody.\n", "2022/my-first_post.md")
    assert article.title == "my first post"


def test_markdown_body_is_rendered(parser: SourceParser) -> None:
    body = "# Hi\n\nSome **b** and *i*.\n\n- one\n- two\n\n<div class=\"raw\"><em>raw</em></div>"
    article = parse(parser, front("title: t", body))
    assert "<h1>Hi</h1>" in article.content
    assert "<strong>b</strong>" in article.content
    assert "<li>one</li>" in article.content
    assert "<em>raw</em>" in article.content  # raw HTML passes through
    assert "#" not in article.content


def test_a_whole_html_page_gives_its_body_only(parser: SourceParser) -> None:
    page = ("<!DOCTYPE html><html><head><title>Head title</title><style>p {}</style></head>"
            '<body><p>Text.</p><noscript><img src="https://img.cls.cn/n.png"></noscript>'
            "</body></html>")
    article = parse(parser, front("title: t", page), "page.html")
    assert article.content == "<p>Text.</p>"
    assert (article.summary, article.images) == ("Text.", ())


def test_markdown_body_may_open_with_code(parser: SourceParser) -> None:
    article = parse(parser, front("title: t", "\n    first line code\n    <b>x</b>\n\ntext"))
    assert article.content.startswith("<pre><code>first line code\n&lt;b&gt;x&lt;/b&gt;")


def test_markdown_tables_and_strikethrough_render_as_hexo_shows_them(
        parser: SourceParser) -> None:
    body = "| 指数 | 涨跌 |\n|---|---:|\n| 沪指 | ~~-0.5%~~ +1.2% |\n"
    content = parse(parser, front("title: t", body)).content
    root = lxml.html.fromstring(content)
    assert root.xpath("//th/text()") == ["指数", "涨跌"]
    assert root.xpath("//td/s/text()") == ["-0.5%"]
    assert [th.get("style") for th in root.xpath("//th")] == [None, "text-align:right"]
    assert "|" not in content


def test_table_cells_keep_their_alignment_and_no_other_style(parser: SourceParser) -> None:
    body = ('<table><tr><td style="text-align: center; position: fixed; color: red">'
            "1</td></tr></table>")
    content = parse(parser, front("title: t", body)).content
    assert lxml.html.fromstring(content).xpath("//td/@style") == ["text-align:center"]


def test_html_file_body_is_not_markdown(parser: SourceParser) -> None:
    article = parse(parser, front("title: t", "# not a heading\n\n**not bold**"), "page.html")
    assert "<h1>" not in article.content
    assert "<strong>" not in article.content
    assert "# not a heading" in article.content


@pytest.mark.parametrize("key", ["link", "url", "permalink"])
def test_link_keys(parser: SourceParser, key: str) -> None:
    article = parse(parser, front(f"title: t\n{key}: https://www.cls.cn/detail/979489"))
    assert article.link == "https://www.cls.cn/detail/979489"


def test_no_link_is_none(parser: SourceParser) -> None:
    assert parse(parser, front("title: t")).link is None


@pytest.mark.parametrize("value", ["not a url", "detail/979489", "javascript:alert(1)",
                                   "[https://a.example/1, https://a.example/2]",
                                   "https://a.example:99999/", "'https://exa mple.com/'",
                                   "'https://a.example\"/x'", "'https://例子 测试/x'"])
def test_a_link_that_is_no_absolute_url_is_dropped_with_a_warning(
        parser: SourceParser, value: str) -> None:
    article = parse(parser, front(f"title: t\nlink: {value}\nurl: https://www.cls.cn/d/1"))
    assert article.link == "https://www.cls.cn/d/1"
    [warning] = article.warnings
    assert warning.startswith("link: ")
    assert "is not an absolute http(s) URL" in warning


@pytest.mark.parametrize("link", [
    "https://app.example.com/#/search?q=R%26D&page=2", "https://b.example/?to=https%3A%2F%2Fc",
    "https://B.example:443/./x/../y?", "https://[::1]:8443/a+b%2Fc",
])
def test_a_valid_link_is_kept_as_it_is(parser: SourceParser, link: str) -> None:
    assert parse(parser, front(f"title: t\nlink: '{link}'")).link == link


def test_a_site_path_as_permalink_is_no_link_and_no_warning(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\npermalink: /2020/01/post/"))
    assert (article.link, article.warnings) == (None, ())


def test_a_link_is_made_a_valid_uri(parser: SourceParser) -> None:
    article = parse(parser, front("title: t\nlink: https://例子.测试/路径 a?q=中&r=%E4%B8%AD"))
    assert article.link == (
        "https://xn--fsqu00a.xn--0zwm56d/%E8%B7%AF%E5%BE%84%20a?q=%E4%B8%AD&r=%E4%B8%AD"
    )
    article = parse(parser, front("title: t\nlink: 'https://a.example/x\"><s>{a|b}^`\\'"))
    assert article.link == "https://a.example/x%22%3E%3Cs%3E%7Ba%7Cb%7D%5E%60%5C"
    article = parse(parser, front("title: t\nlink: 'https://us er:p\"w@a.example/x'"))
    assert article.link == "https://us%20er:p%22w@a.example/x"


def test_xml_forbidden_characters_are_removed(parser: SourceParser) -> None:
    text = ("---\ntitle: a\x00b\x0bc\x1fd\ufffee\ndate: 2022-03-30 11:17:49\n---\n"
            "x\x00y\x0bz\ufffe!\n")
    article = parse(parser, text)
    assert article.title == "abcde"
    assert article.published == SEED_DATE
    assert normalized_text(article.content) == "xyz!"


def test_controls_yaml_refuses_leave_the_front_matter_with_a_warning(
        parser: SourceParser) -> None:
    article = parse(parser, "---\ntitle: cp1252 \x93quoted\x94 \x7f\ndate: 2022-03-30 11:17:49"
                            "\n---\nBody.\n")
    assert article.title == "cp1252 quoted"
    assert article.warnings == ("front matter: 3 control characters removed",)


@pytest.mark.parametrize("path", ["page.html", "post.md"])
def test_controls_leave_the_body_with_a_warning(
        parser: SourceParser, config: Config, path: str) -> None:
    # XML takes them, but readers show boxes, and the W3C validator flags them.
    article = parse(parser, front("title: t", "<p>Body \x93quoted\x94, \x85 &#127;.</p>"), path)
    assert "<p>Body quoted,  .</p>" in article.content
    assert article.summary == "Body quoted, ."
    assert article.warnings == ("body: 4 control characters removed",)
    assert_feed_valid(article, config)


def test_a_value_of_the_wrong_type_is_left_out_with_a_warning(parser: SourceParser) -> None:
    article = parse(parser, front("title: [a, b]\nauthor: {name: Bob}\nheadimg: 42\n"
                                  "thumbnail: [https://img.cls.cn/t.png]"), "my-post.md")
    assert (article.title, article.author, article.headimg, article.thumbnail) == (
        "my post", None, None, None)
    assert article.warnings == (
        "title: ['a', 'b'] is not text: left out", "author: {'name': 'Bob'} is not text: left out",
        "headimg: '42' is not an absolute http(s) URL: left out",
        "thumbnail: ['https://img.cls.cn/t.png'] is not an absolute http(s) URL: left out",
    )


def test_an_image_at_a_site_path_is_left_out_unwarned_as_hexo_writes_it(
        parser: SourceParser) -> None:
    article = parse(parser, front("title: t\nheadimg: /images/cover.jpg"))
    assert (article.headimg, article.warnings) == (None, ())


def test_plain_words_and_numbers_stay_the_text_they_were_written_as(
        parser: SourceParser) -> None:
    article = parse(parser, front("title: 010\ncategories: [ON, no, yes, 1:30, 0755, 3.10, true,"
                                  " FALSE]\ntags: [off, 1e3]\nauthor: 0x1F"))
    assert (article.title, article.author) == ("010", "0x1F")
    # YAML's booleans as text, in lower case (YAML keeps no other spelling of them).
    assert article.categories == ("ON", "no", "yes", "1:30", "0755", "3.10", "true", "false")
    assert article.tags == ("off", "1e3")
    assert article.warnings == ()


def test_surrogate_escapes_as_json_writes_them_are_read_as_their_characters(
        parser: SourceParser) -> None:
    article = parse(parser, front('title: "Rocket \\ud83d\\ude80 launch \\uD83D\\uDE00"\n'
                                  'author: "lone \\ud800, kept \\\\ud800"'))
    assert article.title == "Rocket \U0001f680 launch \U0001f600"
    assert article.author == "lone , kept \\ud800"  # an escaped backslash, then text
    assert article.warnings == ("front matter: 1 lone surrogate escape removed",)
    # \U takes 8 digits: this is no code point, and no surrogate either.
    refused = refuse(parser, front('title: "\\UD83DDE80 \\ud83d"'))
    assert "invalid YAML front matter" in refused.reason


def test_xml_forbidden_characters_from_yaml_escapes_are_removed(
        parser: SourceParser, config: Config) -> None:
    article = parse(parser, '---\ntitle: "a\\x00b\\x0bc"\nauthor: "x\\x01y"\n---\nBody.\n')
    assert not _XML_FORBIDDEN.search(article.title)
    assert article.title.startswith("a")
    assert article.author is not None
    assert not _XML_FORBIDDEN.search(article.author)
    assert_feed_valid(article, config)


@pytest.mark.parametrize("path", ["page.html", "post.md"])
def test_xml_forbidden_character_references_are_removed(
        parser: SourceParser, config: Config, path: str) -> None:
    article = parse(parser, front("title: t", "<p>a&#1;b&#x0b;c&#xFFFE;d</p>"), path)
    assert not _XML_FORBIDDEN.search(article.content)
    assert not _XML_FORBIDDEN.search(article.summary)
    assert_feed_valid(article, config)


_SUMMARY_PIECES = ("财联社讯", "word", " ", "\n", "&amp;", "&lt;b&gt;", "&#x4e2d;", "&nbsp;",
                   "<strong>bold</strong>", "</p><p>", "&CounterClockwiseContourIntegral;")


def summary_of(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def markup_of(length: int) -> str:
    return f'<img src="https://img.cls.cn/images/{"a" * length}.png">'


@pytest.mark.parametrize("pieces", [60, 400], ids=["short-text", "long-text"])
def test_summary_is_the_opening_of_the_body_text(parser: SourceParser, pieces: int) -> None:
    # Only a window at the start of the body is cleaned for the summary: wherever its
    # cut falls (a step of 3 shares no factor with the window sizes), what it finds
    # must be what the whole body's text begins with.
    rng = random.Random(pieces)
    text_html = "".join(rng.choice(_SUMMARY_PIECES) for _ in range(pieces))
    for markup in range(0, 5000, 3):
        body = f"<p>{markup_of(markup)}{text_html}</p>"
        article = parse(parser, front("title: t", body), "page.html")
        assert article.summary == summary_of(shown_text(article.content)), markup


@pytest.mark.parametrize("path", ["page.html", "post.md"])
def test_summary_keeps_apart_the_words_of_blocks_minified_html_joins(
        parser: SourceParser, path: str) -> None:
    body = ('<p>One.</p><p>Two.</p><ul><li>a</li><li>b</li></ul>line<br>break<figure>'
            '<img src="https://x.example/i.png"><figcaption>cap</figcaption></figure>'
            '<table><tr><td>c1</td><td>c2</td></tr></table><p><b>bo</b>ld <a href="#">link</a>'
            '<span>s</span>pan</p>')
    article = parse(parser, front("title: t", body), path)
    assert article.summary == "One. Two. a b line break cap c1 c2 bold linkspan"  # inline: one word


@pytest.mark.parametrize(("cleaned", "text"), [
    # nh3 writes every value in double quotes; it escapes ">" too, but need not.
    ('<p><img alt="a > b" src="x.png">One <a title="1 > 0">two</a> &lt;3&gt;</p>',
     "One two <3>"),
    ("<p>One</p>\n<pre>\ntwo&nbsp;&amp; three</pre>", "One two & three"),
    ('<p>One <img alt="a > b" src="https://img.cls.cn/x', "One"),  # a window's cut
])
def test_text_of_cleaned_html(cleaned: str, text: str) -> None:
    assert text_of_cleaned(cleaned) == text


def test_summary_window_cut_inside_a_character_reference(parser: SourceParser) -> None:
    # A reference the window cuts reads as its raw characters ("&nb"), not as the one
    # it stands for (a no-break space, a word gap in a summary): that must not show.
    text_html = "x" * 278 + "&nbsp;" + "y" * 100
    for markup in range(700, 1100):
        body = f"<p>{markup_of(markup)}{text_html}</p>"
        article = parse(parser, front("title: t", body), "page.html")
        assert article.summary == "x" * 278 + " …", markup


def test_sanitizing(parser: SourceParser) -> None:
    body = (
        '<p onclick="steal()">Hello <a href="javascript:alert(1)">link</a>'
        ' <a href="https://ok.example/">fine</a></p>'
        "<script>alert('x')</script><iframe src=\"https://evil.example/\"></iframe>"
        "<style>body{display:none}</style>"
        '<p><img srcset="https://img.cls.cn/1.png 1x, javascript:alert(2) 2x">'
        '<img data-src="java&#9;Script:alert(3)" src="https://img.cls.cn/a.png">'
        '<picture><source srcset="data:image/svg+xml,alert(4)"></picture></p>'
    )
    for path in ("page.html", "post.md"):
        content = parse(parser, front("title: t", body), path).content
        assert "<script" not in content
        assert "alert(" not in content
        assert "<iframe" not in content
        assert "onclick" not in content
        assert "javascript:" not in content
        assert "<style" not in content
        assert 'href="https://ok.example/"' in content
        assert "Hello" in content
        assert 'srcset="https://img.cls.cn/1.png 1x"' in content  # its safe candidate kept


# -- refused ----------------------------------------------------------------------------


def test_empty_file(parser: SourceParser) -> None:
    assert "empty" in refuse(parser, b"").reason


def test_html_nested_past_the_limit_is_refused(parser: SourceParser) -> None:
    deep = "<div>" * 100_000 + "x" + "</div>" * 100_000  # minutes of nh3's time
    error = refuse(parser, front("title: t", deep), "deep.html")
    assert error.reason == f"HTML nested deeper than {MAX_DEPTH} elements"
    limit = "<blockquote>" * MAX_DEPTH + "x" + "<p>y" * 5000 + "<br>" * 5000
    assert "x" in parse(parser, front("title: t", limit), "limit.html").content


def test_markdown_past_the_line_limit_is_refused(parser: SourceParser) -> None:
    table = "|a|b|\n|-|-|\n" + "|x|y|\n" * MAX_MARKDOWN_LINES  # seconds, and GBs
    error = refuse(parser, front("title: t", table), "table.md")
    assert error.reason == f"Markdown of over {MAX_MARKDOWN_LINES:,} lines"
    limit = "x  \n" * (MAX_MARKDOWN_LINES - 10)
    assert parse(parser, front("title: t", limit), "limit.md").content.count("<br>") > 19_000
    as_html = "<p>x</p>\n\n" * MAX_MARKDOWN_LINES  # HTML in a .md file is not rendered
    assert parse(parser, front("title: t", as_html), "html.md").content.count("<p>") > 19_000


def test_a_body_past_the_ampersand_limit_is_refused(parser: SourceParser) -> None:
    error = refuse(parser, front("title: t", "<p>" + "&" * (MAX_AMPERSANDS + 1)), "amp.html")
    assert error.reason == f"over {MAX_AMPERSANDS:,} '&' (character references)"
    limit = "<p>" + "&amp;" * MAX_AMPERSANDS
    assert parse(parser, front("title: t", limit), "limit.html").content.count("&") > 99_000


def test_whitespace_only_file(parser: SourceParser) -> None:
    assert "empty" in refuse(parser, " \n\t\r\n  \n").reason


def test_no_front_matter(parser: SourceParser) -> None:
    error = refuse(parser, "# Just Markdown\n\nNo front matter here.\n", "notes/readme.md")
    assert "front matter" in error.reason
    assert str(error).startswith("notes/readme.md")


def test_unclosed_front_matter(parser: SourceParser) -> None:
    error = refuse(parser, "---\ntitle: t\n\nbody without closing\n")
    assert "front matter" in error.reason


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("---\ntitle: ok\nauthor: a: b\ndate: 2022-03-30\n---\nBody.\n", 3,
                     id="plain"),
        pytest.param("\n\n---\ntitle: ok\nauthor: a: b\n---\nBody.\n", 5,
                     id="after-blank-lines"),
        pytest.param("---   \ntitle: ok\nx: 1\nauthor: a: b\n---\nBody.\n", 4,
                     id="spaces-after-opening"),
        pytest.param("---\r\ntitle: ok\r\nauthor: a: b\r\n---\r\nBody.\r\n", 3, id="crlf"),
        pytest.param("---\n\ntitle: ok\nauthor: a: b\n---\nBody.\n", 4,
                     id="blank-line-after-opening"),
        pytest.param("\n---\n\n\n\ntitle: ok\nauthor: a: b\n---\nBody.\n", 7,
                     id="blank-lines-around-opening"),
    ],
)
def test_broken_yaml_names_the_bad_line(parser: SourceParser, text: str, line: int) -> None:
    error = refuse(parser, text, "broken.md")
    assert "YAML" in error.reason
    assert error.line == line  # the "author: a: b" line
    assert str(error).startswith(f"broken.md:{line}: ")


def test_broken_yaml_is_refused_with_a_line(parser: SourceParser) -> None:
    error = refuse(parser, "---\ntitle: [unclosed\ndate: x\n---\nBody.\n", "broken.md")
    assert "YAML" in error.reason
    assert error.line is not None
    assert f"broken.md:{error.line}:" in str(error)


def test_not_utf8(parser: SourceParser) -> None:
    data = "---\ntitle: 沪上险企\n---\n正文\n".encode("gbk")
    error = refuse(parser, data, "gbk.md")
    assert "UTF-8" in error.reason
    assert error.line == 2
    assert "gbk.md:2:" in str(error)


@pytest.mark.parametrize(
    ("meta", "kind"), [("- a\n- b", "list"), ("just a sentence", "str"), ("true", "bool")]
)
def test_front_matter_not_a_mapping(parser: SourceParser, meta: str, kind: str) -> None:
    error = refuse(parser, f"---\n{meta}\n---\nBody.\n")
    assert "mapping" in error.reason
    assert kind in error.reason


def test_file_over_max_bytes(tmp_path: Path) -> None:
    parser = SourceParser(make_config(tmp_path, sources={"max_bytes": 1000}))
    small = front("title: t", "x" * 900)
    assert parse(parser, small).title == "t"
    error = refuse(parser, front("title: t", "x" * 1000), "big.md")
    assert "max_bytes" in error.reason


# -- scanning and dates -----------------------------------------------------------------


def test_scan_finds_articles_recursively_skipping_dot_files(config: Config) -> None:
    write_source(config, "a.md", front("title: a"))
    write_source(config, "sub/b.html", front("title: b"))
    write_source(config, "sub/deeper/c.markdown", front("title: c"))
    write_source(config, ".hidden.md", front("title: h"))
    write_source(config, ".git/d.md", front("title: d"))
    write_source(config, "notes.txt", "not an article")
    found = scan_sources(config.paths.sources)
    assert set(found) == {"a.md", "sub/b.html", "sub/deeper/c.markdown"}
    st_a = os.stat(config.paths.sources / "a.md")
    assert found["a.md"] == (st_a.st_size, st_a.st_mtime_ns)


@pytest.mark.parametrize(("size", "max_bytes", "read"), [
    (1000, 1000, 1000), (1001, 1000, 1001), (5000, 1000, 1001), (0, 1000, 0),
])
def test_read_source_reads_at_most_one_byte_over_max(tmp_path: Path, size: int,
                                                     max_bytes: int, read: int) -> None:
    path = tmp_path / "a.md"
    path.write_bytes(b"x" * size)
    assert read_source(path, max_bytes, "a.md") == b"x" * read


def test_read_source_reads_a_file_grown_since_its_stat(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.md"
    path.write_bytes(b"x" * 500)
    stat = os.stat(path)
    # As if the file had 100 bytes when stat'ed, and grew before the read.
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*stat[:6], 100, *stat[7:])))
    assert read_source(path, 1000, "a.md") == b"x" * 500
    assert read_source(path, 300, "a.md") == b"x" * 301


def test_scan_leaves_out_a_path_that_is_not_utf8(config: Config) -> None:
    write_source(config, "a.md", front("title: a"))
    folder = os.fsencode(config.paths.sources)
    for name in (b"\xd6\xd0\xce\xc4.md", b"\xb8\xdf/b.md"):  # GBK names
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(front("title: gbk").encode())
    misnamed: list[str] = []
    assert set(scan_sources(config.paths.sources, misnamed)) == {"a.md"}
    assert sorted(misnamed) == ["\\xb8\\xdf/b.md", "\\xd6\\xd0\\xce\\xc4.md"]


def test_scan_of_a_missing_folder_is_an_error_not_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FeederError, match="nowhere: the sources folder does not exist"):
        scan_sources(tmp_path / "nowhere")


def test_scan_skips_what_is_not_a_regular_file(config: Config) -> None:
    write_source(config, "a.md", front("title: a"))
    os.mkfifo(config.paths.sources / "fifo.md")
    (config.paths.sources / "dangling.md").symlink_to("nowhere.md")
    (config.paths.sources / "linked.md").symlink_to("a.md")
    assert set(scan_sources(config.paths.sources)) == {"a.md", "linked.md"}


def test_reading_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.md"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_source(fifo, 1000, "fifo.md"))
        except SourceError as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked until a writer comes: be one, so the thread ends
        with open(fifo, "wb"):
            pass
        reader.join(5)
    assert len(outcome) == 1
    assert str(outcome[0]) == "fifo.md: not a regular file"


def test_read_date_rejects_non_dates(config: Config) -> None:
    assert read_date("not a date", config.site.tz) == (None, None)
    assert read_date(12345, config.site.tz) == (None, None)
    assert read_date(["2022-03-30"], config.site.tz) == (None, None)


# -- properties -------------------------------------------------------------------------


def assert_feed_valid(article: Article, config: Config) -> None:
    documents = build_feed(FeedInfo(None, "all", "All"), [article], {}, config)
    for name in ("rss.xml", "atom.xml"):
        parsed = feedparser.parse(documents[name])
        assert parsed.bozo == 0, (name, parsed.get("bozo_exception"))
        assert len(parsed.entries) == 1


#: What XML 1.0 cannot carry, written independently of feeder's own pattern.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

_PROPERTY = settings(max_examples=50, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPERTY
@given(data=st.binary(max_size=300))
def test_any_bytes_only_source_error(parser: SourceParser, config: Config, data: bytes) -> None:
    for prefix in (b"", b"---\ntitle: t\n---\n"):
        try:
            article = parse(parser, prefix + data)
        except SourceError:
            continue
        assert_feed_valid(article, config)


@_PROPERTY
@given(body=st.text(max_size=300), html=st.booleans())
def test_any_text_body_parses_to_a_valid_feed(
        parser: SourceParser, config: Config, body: str, html: bool) -> None:
    path = "page.html" if html else "post.md"
    try:
        article = parse(parser, "---\ntitle: t\ndate: 2022-03-30 11:17:49\n---\n" + body, path)
    except SourceError:
        return
    assert article.title == "t"
    assert_feed_valid(article, config)


# Backslashes are left out: YAML escapes of forbidden characters are a known bug,
# covered by test_xml_forbidden_characters_from_yaml_escapes_are_removed.
_RAW_TITLE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\\"),
                     max_size=80)


@_PROPERTY
@given(title=_RAW_TITLE)
def test_any_raw_title_only_source_error(
        parser: SourceParser, config: Config, title: str) -> None:
    try:
        article = parse(parser, f"---\ntitle: {title}\ncategories: [x]\n---\nBody.\n")
    except SourceError:
        return
    assert article.title
    assert_feed_valid(article, config)


@_PROPERTY
@given(title=st.text(min_size=1, max_size=80))
def test_any_title_written_as_yaml_round_trips(
        parser: SourceParser, config: Config, title: str) -> None:
    if not title.strip() or _XML_FORBIDDEN.search(title):
        return  # forbidden characters: see the xfail test above
    text = "---\n" + yaml.safe_dump({"title": title}, allow_unicode=True) + "---\nBody.\n"
    article = parse(parser, text)
    assert article.title == " ".join(title.split())
    assert_feed_valid(article, config)


# -- Markdown bodies made of HTML blocks ---------------------------------------------------

#: Lines that open, continue or break HTML blocks, or are Markdown of their own.
BODY_LINES = [
    "<p>段落 *not emphasis*</p>", "<P CLASS=x>", "</div>", "<div>", "<hr/>", "<hr>",
    "<details open>", "<table><tr><td>1</td></tr></table>", "<p>", "text *emph*",
    "# heading", "    indented code", "  <p>indented two</p>", "<img src=x>", "<pre>",
    "<!-- comment -->", "<span>inline</span>", "> quote", "- item", "1. item",
    "[ref]: /url", "<p\u3000x>", "<pa>", "<p/>", "```", "", " ", "\t", " \t ",
    "a &amp; b", "<p>trailing  ", "===", "---",
    "<p>来源 | 财联社</p>", "---|---", "| - | - |", "<div>a|b", "|---|",
]


@given(st.lists(st.sampled_from(BODY_LINES), max_size=12))
def test_html_block_bodies_render_as_markdown_it_does(lines: list[str]) -> None:
    body = "\n".join(lines).strip()
    fast = html_blocks_as_rendered(body)
    if fast is not None:
        assert fast == markdown_renderer().render(body)


def test_seed_body_skips_the_markdown_parser() -> None:
    body = SEED_TEXT.split("---", 2)[2].strip()
    assert html_blocks_as_rendered(body) == markdown_renderer().render(body)
    assert html_blocks_as_rendered("<p>a</p>\n\n*b*") is None  # Markdown: parsed as such
    head_of_a_table = "<p>来源 | 财联社</p>\n---|---"  # a GFM table, to markdown-it
    assert html_blocks_as_rendered(head_of_a_table) is None
    assert "<table>" in markdown_renderer().render(head_of_a_table)


IMAGE_FRAGMENTS = [
    '<img src="https://img.cls.cn/a.png">', "<img src=https://img.cls.cn/b.png alt=b>",
    '<img data-src="https://img.cls.cn/lazy.png" src="data:image/gif;base64,R0lGOD">',
    '<img srcset="https://img.cls.cn/1.png 1x, https://img.cls.cn/2.png 2x">',
    '<picture><source srcset="https://img.cls.cn/s.webp" type="image/webp"></picture>',
    '<img src="/relative.png">', '<img src="https://img.cls.cn/q.png?a=1&amp;b=2">',
    '<img src="https://img.cls.cn/c&#1;d.png">', '<video><img src="https://x.test/v.png"></video>',
    "<script><img src='https://img.cls.cn/no.png'></script>", "<p>text</p>",
    '<img data-original="https://img.cls.cn/a.png">', "<img src=\"javascript:alert(1)\">",
    '<a href="https://img.cls.cn/link.png">a link is not an image</a>',
    '<img src="//img.cls.cn/pr.png">', '<img srcset="//img.cls.cn/p1.png 1x, /p2.png 2x">',
    '<img src="https://img.cls.cn/中文 图.png">', '<img src=" https://img.cls.cn/pad.png ">',
    '<img alt="a>b" data-src="https://img.cls.cn/l&amp;z.png" src="">',
    '<img src="https://img.cls.cn/grey.gif" data-src="https://img.cls.cn/real.png">',
    '<img srcset="https://img.cls.cn/g.gif 1x" data-srcset="https://img.cls.cn/r.png 2x">',
]


def test_a_lazy_image_gets_its_real_url_as_src(parser: SourceParser) -> None:
    # Readers run no script: the placeholder (or nothing) is what they would show.
    article = parse(parser, front("title: t", (
        '<p><img data-src="https://img.cls.cn/lazy.png" src="data:image/gif;base64,R0lGOD"></p>'
        '<p><img data-original=" https://img.cls.cn/orig.png "></p>'
        '<p><img src="https://img.cls.cn/grey.gif" data-src="https://img.cls.cn/big.png"></p>'
        '<p><img src="/static/grey.gif" data-src="https://img.cls.cn/real.png"></p>'
        '<p><img src="https://img.cls.cn/same.png" data-src="https://img.cls.cn/same.png"></p>'
        '<p><img data-src="javascript:alert(1)"><img data-original="data:image/svg+xml,x"></p>'
        '<p><img src="https://img.cls.cn/s.gif" srcset="https://img.cls.cn/s.gif 1x"'
        ' data-srcset="https://img.cls.cn/s1.png 1x, https://img.cls.cn/s2.png 2x"></p>'
    )))
    images = list(lxml.html.fragment_fromstring(article.content, create_parent="div").iter("img"))
    assert [img.get("src") for img in images] == [
        "https://img.cls.cn/lazy.png", "https://img.cls.cn/orig.png", "https://img.cls.cn/big.png",
        "https://img.cls.cn/real.png", "https://img.cls.cn/same.png", None, None,
        "https://img.cls.cn/s.gif"]
    assert images[-1].get("srcset") == "https://img.cls.cn/s1.png 1x, https://img.cls.cn/s2.png 2x"
    # The placeholders shown nowhere are not fetched.
    assert article.images == tuple(f"https://img.cls.cn/{name}" for name in (
        "lazy.png", "orig.png", "big.png", "real.png", "same.png", "s.gif", "s1.png", "s2.png"))


def test_relative_urls_resolve_against_the_articles_own_link(parser: SourceParser) -> None:
    body = ('<p><a href="/telegraph">t</a> <a href="#notes">n</a> <a href="javascript:x()">j</a>'
            '<img src="a.png"><img data-src="/lazy.png" srcset="b.png 2x, https://x.test/c.png 3x">'
            '<img src="https://img.cls.cn/abs.png"></p>')
    linked = parse(parser, front("title: t\nlink: https://img.cls.cn/detail/9", body))
    assert 'href="https://img.cls.cn/telegraph"' in linked.content
    assert 'href="https://img.cls.cn/detail/9#notes"' in linked.content
    assert "javascript" not in linked.content
    assert 'src="https://img.cls.cn/detail/a.png"' in linked.content
    assert 'srcset="https://img.cls.cn/detail/b.png 2x, https://x.test/c.png 3x"' in linked.content
    assert linked.images == tuple(f"https://img.cls.cn/{name}" for name in (
        "detail/a.png", "lazy.png", "detail/b.png", "abs.png"))
    # With no page of its own to resolve them against, they are left as written.
    unlinked = parse(parser, front("title: t", body))
    assert 'href="/telegraph"' in unlinked.content
    assert 'src="a.png"' in unlinked.content
    assert unlinked.images == ("https://img.cls.cn/abs.png",)


def test_protocol_relative_images_are_https(parser: SourceParser) -> None:
    article = parse(parser, front(
        "title: t\nheadimg: //img.cls.cn/head.png",
        '<p><img src="//img.cls.cn/a.png" srcset="//img.cls.cn/b.png 2x, /c.png 3x"></p>',
    ))
    assert article.headimg == "https://img.cls.cn/head.png"
    assert 'src="https://img.cls.cn/a.png"' in article.content
    assert 'srcset="https://img.cls.cn/b.png 2x, /c.png 3x"' in article.content
    assert article.images == ("https://img.cls.cn/a.png", "https://img.cls.cn/b.png",
                              "https://img.cls.cn/head.png")
    # Even where the article's own page, relative URLs resolve against, is http:.
    linked = parse(parser, front(
        "title: t\nlink: http://www.cls.cn/detail/1",
        '<p><img src="//img.cls.cn/a.png" srcset="//img.cls.cn/b.png 2x"></p>'))
    assert 'src="https://img.cls.cn/a.png"' in linked.content
    assert 'srcset="https://img.cls.cn/b.png 2x"' in linked.content
    assert linked.images == ("https://img.cls.cn/a.png", "https://img.cls.cn/b.png")


@given(st.lists(st.sampled_from(IMAGE_FRAGMENTS), max_size=8))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_images_noted_while_cleaning_are_those_in_the_content(config: Config,
                                                               body: list[str]) -> None:
    text = "---\ntitle: t\n---\n" + "\n".join(body)
    article = SourceParser(config).parse("a.html", text.encode(), datetime.now(UTC))
    # Images of other hosts (x.test) are left as they are: not fetched, not noted.
    found = extract_image_urls(article.content)
    assert list(article.images) == [url for url in found if is_allowed(url, config.images)]
