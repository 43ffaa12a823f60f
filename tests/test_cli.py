"""The command line as a user runs it: output lines and exit status."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from feeder import __version__
from feeder.cli import cli
from feeder.config import Config, load_config
from feeder.images import cache_name
from feeder.sources import SourceParser
from tests.conftest import SEED_TEXT, make_unlistable_folder, write_config_file, write_source
from tests.imageserver import PNG

#: Sources refused by `check`, and a word their reason must contain.
BAD = {
    "bad/empty.md": (b"", "empty"),
    "bad/no-front-matter.md": (b"# Notes\n\nNo front matter.\n", "front matter"),
    "bad/broken.md": (b"---\ntitle: ok\nauthor: a: b\n---\nBody.\n", "YAML"),
    "bad/gbk.md": ("---\ntitle: 沪上险企\n---\n正文\n".encode("gbk"), "UTF-8"),
    "bad/list.md": (b"---\n- a\n- b\n---\nBody.\n", "mapping"),
    "bad/int.md": (b"---\ntitle: ok\nn: !!int abc\n---\nBody.\n", "YAML"),
    "deep/er/huge.md": (b"---\ntitle: huge\n---\n" + b"x" * 10_000 + b"\n", "max_bytes"),
}
GOOD = {
    "cls-seed.md": SEED_TEXT.encode(),
    "sub/clean.md": b"---\ntitle: Clean\ndate: 2022-03-30\ncategories: [A]\n---\nBody.\n",
    "sub/page.html": b"---\ntitle: Page\ndate: 2022-03-30\ncategories: A\n---\n<p>x</p>\n",
}
#: Published, with warnings: no date, a category read as a mapping, a commented-out one.
WARNED = {
    "warn/undated.md": b"---\ntitle: Undated\ncategories: [A]\n---\nBody.\n",
    "warn/odd.md": "---\ntitle: Odd\ndate: 2022-03-30\ncategories:\n - 科创板: 新股\n - #热点\n"
                   "---\nBody.\n".encode(),
    "warn/no-such-day.md": b"---\ntitle: No such day\ndate: 2022-02-30\n---\nBody.\n",
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config_file(tmp_path, sources={"max_bytes": 8192})


@pytest.fixture
def config(config_file: Path) -> Config:
    return load_config(config_file)


def run(config_file: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["-c", str(config_file), *args], catch_exceptions=False)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def write_all(config: Config, *groups: dict[str, bytes | tuple[bytes, str]]) -> None:
    for group in groups:
        for path, value in group.items():
            write_source(config, path, value[0] if isinstance(value, tuple) else value)


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"feeder, version {__version__}"


def test_help_needs_no_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "missing.yaml"), "--help"])
    assert result.exit_code == 0
    for command in ("refresh", "check", "status", "gc"):
        assert command in result.stdout


# -- refresh ----------------------------------------------------------------------------


def test_refresh_prints_one_summary_line(config_file: Path, config: Config) -> None:
    write_all(config, GOOD, BAD)
    result = run(config_file, "refresh")
    assert result.exit_code == 0  # bad sources do not fail the refresh
    out = lines(result.stdout)
    assert len(out) == 1
    summary = out[0]
    scanned = len(GOOD) + len(BAD)
    assert f"{scanned} files scanned" in summary
    assert f"{len(BAD)} failed" in summary
    assert f"{len(GOOD)} articles" in summary
    assert (config.paths.feeds / "all" / "rss.xml").is_file()
    again = lines(run(config_file, "refresh").stdout)
    assert len(again) == 1
    assert "0 changed" in again[0]
    assert "0 files written" in again[0]


def test_refresh_finds_config_in_environment(tmp_path: Path, config_file: Path,
                                             config: Config) -> None:
    write_all(config, GOOD)
    result = CliRunner().invoke(cli, ["refresh"], env={"FEEDER_CONFIG": str(config_file)})
    assert result.exit_code == 0, result.output
    assert f"{len(GOOD)} files scanned" in result.stdout
    assert (tmp_path / "feeds" / "index.opml").is_file()


def test_refresh_of_empty_folder(config_file: Path, config: Config) -> None:
    config.paths.sources.mkdir()
    result = run(config_file, "refresh")
    assert result.exit_code == 0
    assert "0 files scanned" in result.stdout
    assert (config.paths.feeds / "index.html").is_file()


def test_refresh_names_a_feeds_folder_that_is_a_file(config_file: Path, config: Config) -> None:
    write_all(config, GOOD)
    config.paths.feeds.write_text("not a folder\n")
    result = CliRunner().invoke(cli, ["-c", str(config_file), "refresh"])
    assert result.exit_code == 1
    assert result.output == f"Error: {config.paths.feeds}: Not a directory (paths.feeds)\n"
    assert config.paths.feeds.read_text() == "not a folder\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_refresh_names_the_file_a_full_disk_refused(config_file: Path, config: Config) -> None:
    write_all(config, GOOD)
    config.paths.feeds.mkdir()
    (config.paths.feeds / ".index.html.tmp").symlink_to("/dev/full")  # its writes: ENOSPC
    result = CliRunner().invoke(cli, ["-c", str(config_file), "refresh"])
    assert result.exit_code == 1
    index = config.paths.feeds / "index.html"
    assert result.output == f"Error: {index}: No space left on device (paths.feeds)\n"


# -- check ------------------------------------------------------------------------------


def test_check_reports_each_refused_source_once(config_file: Path, config: Config) -> None:
    write_all(config, GOOD, BAD, WARNED)
    result = run(config_file, "check")
    assert result.exit_code == 1
    out = lines(result.stdout)
    refused = [line for line in out if ": warning: " not in line]
    warned = [line for line in out if ": warning: " in line]
    assert len(refused) == len(BAD)
    by_path = {re.match(r"([^:]+):", line).group(1): line for line in refused}  # type: ignore[union-attr]
    assert set(by_path) == set(BAD)
    for path, (_, reason) in BAD.items():
        assert reason in by_path[path]
    assert "bad/gbk.md:2: " in by_path["bad/gbk.md"]
    # Warnings name the (published) source and say what was odd.
    assert {line.split(": warning: ")[0] for line in warned} == set(WARNED)
    assert any("date" in line for line in warned if line.startswith("warn/undated.md"))
    odd = [line for line in warned if line.startswith("warn/odd.md")]
    assert len(odd) == 2
    assert any("科创板" in line for line in odd)
    # Nothing about the good ones.
    assert not any(line.startswith(tuple(GOOD)) for line in out)


def test_check_names_a_file_whose_name_is_not_utf8(config_file: Path, config: Config,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    write_all(config, GOOD)
    gbk_name = os.path.join(os.fsencode(config.paths.sources), "沪上.md".encode("gbk"))
    with open(gbk_name, "wb") as f:
        f.write(GOOD["sub/clean.md"])
    result = run(config_file, "check")
    assert result.exit_code == 1
    assert lines(result.stdout) == [
        "\\xbb\\xa6\\xc9\\xcf.md: skipped: the file name is not UTF-8 (rename it)"]
    refreshed = run(config_file, "refresh")
    assert f"1 failed, {len(GOOD)} articles" in refreshed.stdout
    assert "\\xbb\\xa6\\xc9\\xcf.md: skipped: the file name is not UTF-8" in caplog.text
    assert ("failing source \\xbb\\xa6\\xc9\\xcf.md: skipped: the file name is not UTF-8"
            in run(config_file, "status").stdout)
    assert "1 failed" in run(config_file, "refresh").stdout  # still there, still counted
    os.rename(gbk_name, config.paths.sources / "renamed.md")
    assert f"0 failed, {len(GOOD) + 1} articles" in run(config_file, "refresh").stdout
    assert "failing source" not in run(config_file, "status").stdout


def test_check_refresh_and_status_escape_control_characters_in_a_name(
        config_file: Path, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    write_source(config, "evil\nx.md: fake reason\ny\x1b[31m.md", b"no front matter\n")
    write_source(config, "odd\n.md", b"---\ntitle: Odd\n---\nNo date.\n")
    shown = "evil\\x0ax.md: fake reason\\x0ay\\x1b[31m.md"
    result = run(config_file, "check")
    assert result.exit_code == 1
    assert lines(result.stdout) == [
        f"{shown}:1: no front matter (a file must start with ---)",
        "odd\\x0a.md: warning: no date: using the file's modification time"]
    with caplog.at_level(logging.WARNING):
        assert run(config_file, "refresh").exit_code == 0
    assert [r.getMessage() for r in caplog.records] == [
        "odd\\x0a.md: warning: no date: using the file's modification time",
        f"{shown}:1: no front matter (a file must start with ---)"]
    status = lines(run(config_file, "status").stdout)
    assert f"failing source {shown}: line 1: no front matter (a file must start with ---)" in status
    assert "source odd\\x0a.md: warning: no date: using the file's modification time" in status
    assert not [line for line in status if line.startswith(("x.md", "y"))]


def test_check_names_a_missing_sources_folder(config_file: Path, config: Config) -> None:
    result = CliRunner().invoke(cli, ["-c", str(config_file), "check"])
    assert result.exit_code == 1
    assert result.output == f"Error: {config.paths.sources}: no such folder (paths.sources)\n"


def test_check_clean_folder_exits_0(config_file: Path, config: Config) -> None:
    write_all(config, GOOD)
    result = run(config_file, "check")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_check_warnings_alone_exit_0(config_file: Path, config: Config) -> None:
    write_all(config, GOOD, WARNED)
    result = run(config_file, "check")
    assert result.exit_code == 0
    assert all(": warning: " in line for line in lines(result.stdout))
    assert len(lines(result.stdout)) == 5


def test_check_one_file(config_file: Path, config: Config) -> None:
    write_all(config, GOOD, BAD)
    bad = config.paths.sources / "bad" / "gbk.md"
    result = run(config_file, "check", str(bad))
    assert result.exit_code == 1
    assert lines(result.stdout) == [lines(result.stdout)[0]]
    assert result.stdout.startswith("bad/gbk.md:2: ")
    assert "UTF-8" in result.stdout
    good = run(config_file, "check", str(config.paths.sources / "sub" / "clean.md"))
    assert good.exit_code == 0
    assert good.stdout == ""


def test_check_one_folder(config_file: Path, config: Config) -> None:
    write_all(config, GOOD, BAD)
    result = run(config_file, "check", str(config.paths.sources / "sub"))
    assert result.exit_code == 0
    result = run(config_file, "check", str(config.paths.sources / "deep"))
    assert result.exit_code == 1
    assert lines(result.stdout)[0].startswith("deep/er/huge.md: ")


def test_check_names_a_folder_it_cannot_list(config_file: Path, config: Config) -> None:
    write_source(config, "good.md", SEED_TEXT)
    make_unlistable_folder(config.paths.sources)
    result = run(config_file, "check")
    assert result.exit_code == 1
    assert "cannot list the folder" in result.output
    assert len(lines(result.output)) == 1
    assert "Traceback" not in result.output


def test_check_names_a_link_as_a_refresh_does(tmp_path: Path, config_file: Path,
                                              config: Config) -> None:
    outside = tmp_path / "elsewhere.md"
    outside.write_bytes(b"no front matter\n")
    write_source(config, "real.md", "---\ntitle: Real\ndate: someday\n---\nx\n")
    (config.paths.sources / "inside.md").symlink_to(outside)
    (config.paths.sources / "alias.md").symlink_to("real.md")
    result = run(config_file, "check")
    assert result.exit_code == 1
    assert lines(result.stdout) == [
        "alias.md: warning: date: cannot read 'someday' as a date",
        "alias.md: warning: no date: using the file's modification time",
        "inside.md:1: no front matter (a file must start with ---)",
        "real.md: warning: date: cannot read 'someday' as a date",
        "real.md: warning: no date: using the file's modification time",
    ]


def test_check_file_outside_sources(tmp_path: Path, config_file: Path) -> None:
    outside = tmp_path / "elsewhere.md"
    outside.write_bytes(b"no front matter\n")
    result = run(config_file, "check", str(outside))
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{outside}:")


# -- config errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"images": {"max_byte": 5}}, "images.max_byte"),
        ({"feeds": {"items": -1}}, "feeds.items"),
        ({"site": {"timezone": "Mars/Olympus"}}, "site.timezone"),
        ({"schedule": {"interval": "often"}}, "schedule.interval"),
    ],
)
@pytest.mark.parametrize("command", ["refresh", "check", "status", "gc"])
def test_bad_config_names_the_key(tmp_path: Path, overrides: dict[str, dict[str, object]],
                                  key: str, command: str) -> None:
    config_file = write_config_file(tmp_path, **overrides)
    result = CliRunner().invoke(cli, ["-c", str(config_file), command])
    assert result.exit_code != 0
    assert f"Error: config: {config_file}: {key}: " in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "feeds").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["-c", str(tmp_path / "nope.yaml"), "refresh"])
    assert result.exit_code != 0
    assert "nope.yaml" in result.output


@pytest.mark.parametrize("command", ["refresh", "status"])
def test_a_state_folder_that_is_a_file_is_named(config_file: Path, config: Config,
                                                command: str) -> None:
    config.paths.state.write_text("not a folder\n")
    result = CliRunner().invoke(cli, ["-c", str(config_file), command])
    assert result.exit_code == 1
    assert lines(result.output)[-1] == f"Error: {config.paths.state}: Not a directory (paths.state)"
    assert "Traceback" not in result.output


# -- status -----------------------------------------------------------------------------


def test_status_before_any_refresh_creates_nothing(config_file: Path, config: Config) -> None:
    result = run(config_file, "status")
    assert result.exit_code == 0
    assert result.stdout == "daemon: not running\nnever refreshed\n"
    assert not config.paths.state.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root connects whatever the socket's mode")
@pytest.mark.parametrize("command", ["refresh", "status"])
def test_a_daemon_of_another_user_is_named_not_taken_for_none(config_file: Path, config: Config,
                                                              command: str) -> None:
    config.paths.state.mkdir()
    with socket.socket(socket.AF_UNIX) as listening:  # as the daemon's socket: mode 0600
        listening.bind(str(config.control_socket))
        listening.listen()
        config.control_socket.chmod(0)  # not this user's, as far as connecting goes
        result = run(config_file, command)
    assert result.exit_code == 1
    assert result.output == (f"Error: cannot ask the daemon at {config.control_socket} "
                             "(paths.state): permission denied\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the folder's mode")
def test_status_in_a_state_folder_it_may_not_write_says_so(config_file: Path,
                                                           config: Config) -> None:
    write_all(config, GOOD, {})
    assert run(config_file, "refresh").exit_code == 0
    config.paths.state.chmod(0o555)  # as a monitoring user in the service's group sees it
    try:
        result = run(config_file, "status")
    finally:
        config.paths.state.chmod(0o755)
    assert result.exit_code == 1
    assert result.output.endswith(f"({config.paths.state} must be writable)\n")


@pytest.mark.parametrize("command", ["refresh", "status"])
def test_a_damaged_state_database_is_named_with_what_to_do(config_file: Path, config: Config,
                                                           command: str) -> None:
    write_all(config, GOOD, {f"more/{i}.md": GOOD["cls-seed.md"] for i in range(20)})
    assert run(config_file, "refresh").exit_code == 0
    with open(config.database, "r+b") as database:  # its header left whole
        database.seek(2 * 4096)
        database.write(b"\xff" * 8 * 4096)
    result = run(config_file, command)
    assert result.exit_code == 1
    assert lines(result.output)[-1] == (
        f"Error: {config.database}: database disk image is malformed (paths.state; "
        "once deleted, the next refresh rebuilds it)")


@pytest.mark.parametrize("command", ["refresh", "status"])
def test_a_state_database_that_is_none_is_named_with_what_to_do(
        config_file: Path, config: Config, command: str) -> None:
    config.paths.state.mkdir()
    config.database.write_bytes(b"not SQLite at all, " * 100)  # say, restored wrong
    result = run(config_file, command)
    assert result.exit_code == 1
    assert lines(result.output)[-1] == (
        f"Error: {config.database}: cannot open the state database: file is not a database "
        "(once deleted, the next refresh rebuilds it)")


def test_status_lists_failing_sources(config_file: Path, config: Config) -> None:
    write_all(config, GOOD, BAD, WARNED)
    run(config_file, "refresh")
    result = run(config_file, "status")
    assert result.exit_code == 0
    out = result.stdout
    assert "files scanned" in out
    for path, (_, reason) in BAD.items():
        line = next(line for line in lines(out) if f" {path}: " in line)
        assert line.startswith("failing source ")
        assert reason in line
    assert not any(f"failing source {path}" in out for path in (*GOOD, *WARNED))
    assert "source warn/undated.md: warning: " in out
    # The seed's images could not be fetched: they are listed with their error.
    assert "failing image https://img.cls.cn/images/20220330/8ZNa70Fbl8.png" in out
    counts = f"{len(GOOD) + len(WARNED)} articles"
    assert counts in out


def test_status_answers_while_a_refresh_holds_the_database(config_file: Path,
                                                           config: Config) -> None:
    write_all(config, GOOD)
    run(config_file, "refresh")
    refreshing = sqlite3.connect(config.database, isolation_level=None)
    try:
        refreshing.execute("BEGIN IMMEDIATE")  # what a refresh holds while it parses
        result = run(config_file, "status")
    finally:
        refreshing.close()
    assert result.exit_code == 0, result.output
    assert f"{len(GOOD)} articles" in result.stdout


def test_status_shows_the_first_twenty_of_a_long_list(config_file: Path,
                                                      config: Config) -> None:
    for i in range(25):
        write_source(config, f"undated/{i:02d}.md", "---\ntitle: Undated\n---\nx\n")
    run(config_file, "refresh")
    out = lines(run(config_file, "status").stdout)
    warned = [line for line in out if line.startswith("source undated/")]
    assert len(warned) == 20
    assert "... and 5 more warnings (feeder check lists them all)" in out


def test_status_forgets_a_fixed_source(config_file: Path, config: Config) -> None:
    write_source(config, "bad/gbk.md", BAD["bad/gbk.md"][0])
    run(config_file, "refresh")
    assert "failing source bad/gbk.md" in run(config_file, "status").stdout
    write_source(config, "bad/gbk.md", "---\ntitle: 沪上险企\ndate: 2022-03-30\n---\n正文\n")
    run(config_file, "refresh")
    assert "failing source" not in run(config_file, "status").stdout


# -- gc ---------------------------------------------------------------------------------


def test_gc_removes_stray_files(config_file: Path, config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)  # its images: referenced, not cached
    run(config_file, "refresh")
    cache = config.paths.cache
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "stray.png").write_bytes(b"x" * 100)
    (cache / "old.jpg").write_bytes(b"y" * 23)
    (cache / ".old.jpg.part").write_bytes(b"y" * 7)  # a killed download's
    (cache / ".gitkeep").write_bytes(b"")
    result = run(config_file, "gc")
    assert result.exit_code == 0
    assert result.stdout.strip() == "3 cached images removed, 130 bytes freed, 0 kept"
    assert list(cache.iterdir()) == [cache / ".gitkeep"]
    again = run(config_file, "gc")
    assert again.stdout.strip() == "0 cached images removed, 0 bytes freed, 0 kept"


def test_gc_with_no_cache_folder(config_file: Path, config: Config) -> None:
    config.paths.sources.mkdir()
    run(config_file, "refresh")
    result = run(config_file, "gc")
    assert result.exit_code == 0
    assert result.stdout.strip().startswith("0 cached images removed")


def test_gc_deletes_nothing_the_refreshes_have_not_seen(config_file: Path,
                                                        config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    run(config_file, "refresh")
    url = "https://img.cls.cn/images/20220330/c8Agbj08W6.png"
    config.paths.cache.mkdir(exist_ok=True)
    restored = config.paths.cache / cache_name(url, ".png")
    restored.write_bytes(PNG)
    # An article restored from a backup with its image, and no refresh since.
    write_source(config, "restored.md", f'---\ntitle: r\n---\n<img src="{url}">')
    (config.paths.sources / "cls-seed.md").unlink()
    result = run(config_file, "gc")
    assert result.exit_code == 1
    assert "sources/ changed since the last refresh: run `feeder refresh` first" in result.output
    assert restored.exists()
    run(config_file, "refresh")
    assert run(config_file, "gc").stdout.startswith("0 cached images removed")


def test_gc_is_not_held_up_by_a_file_no_refresh_can_read(config_file: Path,
                                                          config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    (config.paths.sources / "loop.md").symlink_to("loop.md")  # refused at each refresh
    run(config_file, "refresh")
    config.paths.cache.mkdir(exist_ok=True)
    (config.paths.cache / "stray.png").write_bytes(PNG)
    result = run(config_file, "gc")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("1 cached images removed")


def test_gc_refuses_to_empty_the_cache(config_file: Path, config: Config) -> None:
    # sources/ is an empty mount point: the refresh unpublished everything.
    config.paths.sources.mkdir()
    run(config_file, "refresh")
    config.paths.cache.mkdir()
    (config.paths.cache / "a.png").write_bytes(PNG)
    result = run(config_file, "gc")
    assert result.exit_code == 1
    assert "no article references an image (is sources/ mounted?)" in result.output
    assert (config.paths.cache / "a.png").exists()


def test_gc_before_a_refresh_finished_deletes_nothing(config_file: Path,
                                                     config: Config) -> None:
    # A state database just rebuilt (or a refresh killed midway) knows some
    # articles only: the others' images would look unreferenced.
    cache = config.paths.cache
    cache.mkdir(parents=True)
    (cache / "a.png").write_bytes(PNG)
    result = run(config_file, "gc")
    assert result.exit_code == 1
    assert "no refresh has run yet: run `feeder refresh` first" in result.output
    assert (cache / "a.png").exists()


def test_gc_keeps_referenced_images(config_file: Path, config: Config) -> None:
    write_source(config, "cls-seed.md", SEED_TEXT)
    run(config_file, "refresh")
    # Record one referenced image as cached, as a successful fetch would.
    url = "https://img.cls.cn/images/20220330/c8Agbj08W6.png"
    assert url in SourceParser(config).parse(
        "cls-seed.md", SEED_TEXT.encode(), datetime.now(UTC)).images
    cache = config.paths.cache
    cache.mkdir(parents=True, exist_ok=True)
    kept = cache_name(url, ".png")  # the state database need not know it
    (cache / kept).write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 8)
    (cache / "stray.png").write_bytes(b"z" * 10)
    result = run(config_file, "gc")
    assert result.exit_code == 0
    assert result.stdout.strip() == "1 cached images removed, 10 bytes freed, 1 kept"
    assert sorted(p.name for p in cache.iterdir()) == [kept]
    # Once no article references it, it goes too.
    (config.paths.sources / "cls-seed.md").unlink()
    write_source(config, "other.md", '---\ntitle: o\n---\n<img src="https://img.cls.cn/o.png">')
    run(config_file, "refresh")
    result = run(config_file, "gc")
    assert result.stdout.strip() == "1 cached images removed, 16 bytes freed, 0 kept"
    assert list(cache.iterdir()) == []


def test_status_says_why_the_last_refresh_failed_until_one_succeeds(config_file: Path,
                                                                     config: Config) -> None:
    write_all(config, GOOD)
    assert run(config_file, "refresh").exit_code == 0
    pages = config.paths.feeds / "articles"
    shutil.rmtree(pages)
    pages.write_text("not a folder of pages\n")
    write_source(config, "new.md", "---\ntitle: New\ndate: 2022-03-31\n---\nx\n")
    failed = CliRunner().invoke(cli, ["-c", str(config_file), "refresh"])
    assert failed.exit_code == 1
    error = lines(failed.output)[-1].removeprefix("Error: ")
    assert str(pages) in error
    out = lines(run(config_file, "status").stdout)
    assert out[1].startswith("last refresh ")
    assert out[1].endswith(f": failed: {error}")
    assert out[2].startswith("refresh ")  # the last that succeeded
    pages.unlink()
    assert run(config_file, "refresh").exit_code == 0
    assert ": failed: " not in run(config_file, "status").stdout
