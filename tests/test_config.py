"""Config values that would do harm later are refused at load time, naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from feeder.cli import cli
from feeder.config import config_from_dict, load_config
from feeder.exceptions import ConfigError
from tests.conftest import article_text, config_dict, make_config, write_config_file


def refused(tmp_path: Path, **overrides: dict[str, Any]) -> str:
    """The one-line message of the ConfigError ``overrides`` raise."""
    with pytest.raises(ConfigError) as caught:
        config_from_dict(config_dict(**overrides), tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "key", "other"),
    [
        ({"cache": "sources"}, "paths.cache", "paths.sources"),
        ({"cache": "sources/images"}, "paths.cache", "paths.sources"),
        ({"sources": "cache/articles"}, "paths.cache", "paths.sources"),
        ({"feeds": "out", "state": "out/state"}, "paths.state", "paths.feeds"),
        ({"state": "./feeds/../feeds"}, "paths.state", "paths.feeds"),
        ({"sources": "."}, "paths.feeds", "paths.sources"),
    ],
)
def test_overlapping_folders_are_refused(tmp_path: Path, paths: dict[str, str], key: str,
                                         other: str) -> None:
    message = refused(tmp_path, paths=paths)
    assert message.startswith(f"{key}: must not be {other} or inside/around it")


def test_a_symlink_to_another_folder_overlaps_it(tmp_path: Path) -> None:
    (tmp_path / "sources").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sources")
    assert refused(tmp_path, paths={"cache": "link"}).startswith("paths.cache: ")


@pytest.mark.parametrize("key", ["cache", "feeds"])
@pytest.mark.parametrize("value", [".", "..", "/"])
def test_cache_and_feeds_may_not_hold_the_config_file(tmp_path: Path, key: str,
                                                      value: str) -> None:
    root = tmp_path / "site"
    root.mkdir()
    paths = {"sources": str(tmp_path / "s"), "feeds": str(tmp_path / "f"),
             "cache": str(tmp_path / "c"), "state": str(tmp_path / "t"), key: value}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(config_dict(paths=paths), root)
    assert caught.value.key == f"paths.{key}"


def test_folders_are_compared_by_path_parts_not_by_text(tmp_path: Path) -> None:
    apart = {"sources": "data/art", "cache": "data/articles", "feeds": "/srv/www/feeds",
             "state": "var"}
    assert make_config(tmp_path, paths=apart).paths.cache == tmp_path.resolve() / "data/articles"
    assert refused(tmp_path, paths={**apart, "cache": "data"}).startswith("paths.cache: ")


@pytest.mark.parametrize("key", ["sources", "feeds", "cache", "state"])
def test_a_nul_in_a_path_is_refused(tmp_path: Path, key: str) -> None:
    message = refused(tmp_path, paths={key: "fe\x00ds"})
    assert message == f"paths.{key}: 'fe\\x00ds' holds a NUL character"


def test_gc_with_the_cache_in_sources_deletes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "sources" / "keep.md"
    source.parent.mkdir()
    source.write_text(article_text("Keep me"), encoding="utf-8")
    config_file = write_config_file(tmp_path, paths={"cache": "sources"})
    result = CliRunner().invoke(cli, ["-c", str(config_file), "gc"])
    assert result.exit_code != 0
    assert "paths.cache: must not be paths.sources" in result.output
    assert "Traceback" not in result.output
    assert source.read_text(encoding="utf-8") == article_text("Keep me")


# -- numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["deadline", "timeout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, 10**400])
def test_seconds_must_be_finite_and_sensible(tmp_path: Path, key: str, value: float) -> None:
    message = refused(tmp_path, images={key: value})
    assert message.startswith(f"images.{key}: must be a finite number")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("schedule", "interval", 10**15),  # overflows the scheduler's timedelta
        ("feeds", "items", 2**63),  # overflows SQLite's LIMIT
    ],
)
def test_whole_numbers_have_a_ceiling(tmp_path: Path, section: str, key: str,
                                      value: int) -> None:
    assert refused(tmp_path, **{section: {key: value}}).startswith(f"{section}.{key}: ")


def test_a_day_is_the_longest_wait(tmp_path: Path) -> None:
    images = make_config(tmp_path, images={"deadline": 0.5, "timeout": 86400}).images
    assert (images.deadline, images.timeout) == (0.5, 86400.0)
    assert refused(tmp_path, images={"timeout": 86400.5}).startswith("images.timeout: ")


@pytest.mark.parametrize("host", ["https://img.cls.cn", "*.cls.cn", "img.cls.cn:443",
                                  "img.cls.cn/", "img.cls.cn ", "", "user@img.cls.cn", ".",
                                  "..", ":", "img.cls.cn,img2.cls.cn", "img.cls.cn\u3000",
                                  "[::1]", "a\x85b"])
def test_an_allowed_host_no_url_can_have_is_refused(tmp_path: Path, host: str) -> None:
    message = refused(tmp_path, images={"allowed_hosts": ["img.cls.cn", host]})
    assert message.startswith(f"images.allowed_hosts[1]: {host!r} is not a host name")


def test_allowed_hosts_take_names_in_any_script_and_addresses(tmp_path: Path) -> None:
    hosts = ("IMG.cls.cn.", "图片.例子", "127.0.0.1", "::1", "2001:db8::1")
    assert make_config(tmp_path, images={"allowed_hosts": list(hosts)}).images.allowed_hosts \
        == hosts


def test_category_names_in_the_config_are_read_as_sources_give_them(tmp_path: Path) -> None:
    decomposed = "Cafe\u0301  noir"  # as a macOS file name gives it, two spaces
    feeds = make_config(tmp_path, feeds={"default_category": decomposed,
                                         "slugs": {decomposed: "cafe"}}).feeds
    assert feeds.default_category == "Café noir"
    assert feeds.slugs == {"Café noir": "cafe"}
    message = refused(tmp_path, feeds={"slugs": {decomposed: "cafe", "Café noir": "other"}})
    assert message == "feeds.slugs.Café noir: the same category as 'Café noir', written otherwise"


@pytest.mark.parametrize("language", ["", "zh_CN", "中文", "zh-", "en gb"])
def test_a_language_that_is_no_tag_is_refused(tmp_path: Path, language: str) -> None:
    assert refused(tmp_path, site={"language": language}).startswith(
        f"site.language: {language!r} is not a language tag")


def test_a_yaml_error_is_one_line_naming_the_file_line_and_column(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("site: {title: t}\nserver: {port: 1\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["-c", str(config_file), "status"])
    assert result.exit_code == 1
    assert result.output == (f"Error: config: {config_file}:3:1: invalid YAML: "
                             "did not find expected ',' or '}'\n")


@pytest.mark.parametrize("value", ["''", "0", "false", "[]"])
def test_a_section_that_is_no_mapping_is_refused_even_if_empty(tmp_path: Path,
                                                               value: str) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"server: {value}\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["-c", str(config_file), "status"])
    assert result.exit_code == 1
    assert f"Error: config: {config_file}: server: must be a mapping" in result.output


@pytest.mark.parametrize("text", ["[]", "false", "0", "''"])
def test_a_file_that_is_no_mapping_is_refused(tmp_path: Path, text: str) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(config_file)
    config_file.write_text("# nothing yet\n", encoding="utf-8")
    assert load_config(config_file).server.port == 8080


def test_a_section_with_nothing_under_it_takes_the_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("server:\nimages:\n", encoding="utf-8")
    assert load_config(config_file).server.port == 8080


@pytest.mark.parametrize(("server", "base_url"), [
    ({}, "http://127.0.0.1:8080"),
    ({"port": 47315}, "http://127.0.0.1:47315"),
    ({"host": "0.0.0.0", "port": 8000}, "http://127.0.0.1:8000"),  # every address
    ({"host": "::"}, "http://127.0.0.1:8080"),
    ({"host": "::1", "port": 8000}, "http://[::1]:8000"),
    ({"host": "feeds.lan", "port": 80}, "http://feeds.lan:80"),
])
def test_base_url_is_where_the_daemon_serves_unless_given(
        tmp_path: Path, server: dict[str, Any], base_url: str) -> None:
    # The index page and the feeds link where readers found them, whatever the port.
    derived = config_from_dict({"server": server, "site": {"title": "t"}}, tmp_path)
    assert derived.site.base_url == base_url
    given = {"server": server, "site": {"base_url": "https://feeds.example.com/x/"}}
    assert config_from_dict(given, tmp_path).site.base_url == "https://feeds.example.com/x"


def test_the_shipped_config_file_is_the_defaults(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parent.parent / "config.yaml"
    assert load_config(shipped) == config_from_dict({}, shipped.parent)
    # A port set in it moves the links too: no base_url in it is set by hand.
    text = shipped.read_text(encoding="utf-8").replace("port: 8080", "port: 47315")
    (tmp_path / "config.yaml").write_text(text, encoding="utf-8")
    assert load_config(tmp_path / "config.yaml").site.base_url == "http://127.0.0.1:47315"


def test_an_impossible_date_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("site:\n  title: 2022-02-30\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["-c", str(config_file), "status"])
    assert result.exit_code == 1
    assert "invalid YAML" in result.output
    assert "Traceback" not in result.output


# -- site title and default category ----------------------------------------------------


@pytest.mark.parametrize(("section", "key"), [("site", "title"), ("feeds", "default_category")])
@pytest.mark.parametrize("value", ["", "   ", "\u3000", "Misc\n", "a\x00b", "a\x7fb",
                                   "a\x85b", "a\ufffeb"])
def test_site_title_and_default_category_must_be_names(tmp_path: Path, section: str, key: str,
                                                        value: str) -> None:
    assert refused(tmp_path, **{section: {key: value}}).startswith(f"{section}.{key}: ")


def test_site_title_spaces_are_collapsed(tmp_path: Path) -> None:
    assert make_config(tmp_path, site={"title": " 财联社  电报 "}).site.title == "财联社 电报"


def test_default_category_spaces_are_collapsed_like_a_sources(tmp_path: Path) -> None:
    config = make_config(tmp_path, feeds={"default_category": "  Not  filed "})
    assert config.feeds.default_category == "Not filed"


# -- slugs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slug", "reason"),
    [
        ("", "empty"), (" ", "empty"), (".", "dot"), ("..", "dot"), (".hidden", "dot"),
        (" a", "space"), ("a ", "space"), ("a/b", "holds one of"), ("a\\b", "holds one of"),
        ("a%20b", "holds one of"), ("a#b", "holds one of"), ("a?b", "holds one of"),
        ("fin\nance", "control"), ("a\tb", "control"), ("a\x00b", "control"),
        ("a\x1fb", "control"), ("a\x7fb", "control"), ("a\x9fb", "control"),
        ("a\u00a0b", "whitespace"), ("a\u2028b", "whitespace"), ("a\u3000b", "whitespace"),
        ("x" * 101, "longer"), ("金" * 90, "bytes"),
    ],
)
def test_a_slug_must_be_one_safe_folder_name(tmp_path: Path, slug: str, reason: str) -> None:
    message = refused(tmp_path, feeds={"slugs": {"金融": slug}})
    assert message.startswith(f"feeds.slugs.金融: {slug!r} is not a safe slug: ")
    assert reason in message


def test_a_slug_error_names_an_odd_category_on_one_line(tmp_path: Path) -> None:
    message = refused(tmp_path, feeds={"slugs": {"a\nb": "a/b"}})
    assert message.startswith("feeds.slugs.'a\\nb': ")


def test_a_slug_may_hold_dots_and_spaces_inside_up_to_100_characters(tmp_path: Path) -> None:
    slugs = {"a": "a.b", "b": "a b", "c": "x" * 100, "d": "深度", "e": "hindi-हिन्दी"}
    assert make_config(tmp_path, feeds={"slugs": slugs}).feeds.slugs == slugs
    assert refused(tmp_path, feeds={"slugs": {"c": "x" * 101}}).startswith("feeds.slugs.c: ")


def test_two_categories_may_not_be_given_one_slug(tmp_path: Path) -> None:
    message = refused(tmp_path, feeds={"slugs": {"金融": "finance", "财经": "Finance"}})
    assert message == ("feeds.slugs.财经: 'Finance' is also the slug of '金融': "
                       "each feed needs its own")


# -- URLs -------------------------------------------------------------------------------


BAD_URLS = ["http://[::1", "http://x:99999", "http://x:0", "http://x:port", "ftp://x",
            "http://", "http://:80", "//x", "http://x/a b", "http://x/\n", "http://x/?q=1",
            "http://x/#top"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_base_url_must_be_an_absolute_http_url(tmp_path: Path, url: str) -> None:
    message = refused(tmp_path, site={"base_url": url})
    shown = url.rstrip("/")  # as every link is built from it
    assert message.startswith(f"site.base_url: {shown!r} is not an absolute http(s) URL")


@pytest.mark.parametrize("url", BAD_URLS)
def test_origins_must_be_absolute_http_urls(tmp_path: Path, url: str) -> None:
    as_origin = refused(tmp_path, images={"origins": {url: "http://127.0.0.1:9"}})
    assert as_origin.startswith("images.origins.")
    assert f"{url!r} is not an absolute http(s) URL" in as_origin
    as_mirror = refused(tmp_path, images={"origins": {"https://img.cls.cn": url}})
    assert as_mirror.startswith(f"images.origins.https://img.cls.cn: {url!r} is not an absolute")


def test_a_non_ascii_base_url_is_made_a_uri(tmp_path: Path) -> None:
    good = make_config(tmp_path, site={"base_url": "https://例子.测试/新闻/"})
    assert good.site.base_url == "https://xn--fsqu00a.xn--0zwm56d/%E6%96%B0%E9%97%BB"
    message = refused(tmp_path, site={"base_url": "https://例子..测试/"})
    assert message.startswith(
        "site.base_url: 'https://例子..测试': '例子..测试' is not a valid host name")


def test_an_ipv6_url_needs_its_closing_bracket(tmp_path: Path) -> None:
    good = make_config(tmp_path, site={"base_url": "https://[::1]:8443/feeder/"})
    assert good.site.base_url == "https://[::1]:8443/feeder"
    assert refused(tmp_path, site={"base_url": "https://[::1:8443/feeder/"}).startswith(
        "site.base_url: ")


def test_an_origin_and_its_mirror_may_have_a_path_not_a_bad_port(tmp_path: Path) -> None:
    origins = {"https://img.cls.cn/images/": "http://mirror:9000/base/"}
    assert make_config(tmp_path, images={"origins": origins}).images.origins == origins
    bad = {"https://img.cls.cn/images/": "http://mirror:90000/base/"}
    assert refused(tmp_path, images={"origins": bad}).startswith(
        "images.origins.https://img.cls.cn/images/: ")
