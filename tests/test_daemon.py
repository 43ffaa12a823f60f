"""End to end: ``feeder run`` as a real process, a fake img.cls.cn, real HTTP and real CLIs.

Every test starts its own daemon (``python -m feeder -c config.yaml run``) on a free
loopback port, with every folder under ``tmp_path`` and ``https://img.cls.cn`` mapped
to an :class:`~tests.imageserver.ImageServer` running in the test's event loop, so the
seed article's images are really fetched, cached and served. Teardown always stops
the daemon with SIGTERM and checks that it exited with status 0.

Nothing here measures time, except what the issue requires: SIGTERM ends the daemon
within 5 seconds (``proc.wait(timeout=5)``), and during a large refresh every request
is answered (a 2 s client timeout per request: a liveness check).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import feedparser
import pytest
import yaml
from multidict import CIMultiDict

from feeder.config import load_config
from feeder.daemon import Daemon, _is_watched_source, run_daemon
from feeder.exceptions import DaemonRunningError, RefreshAbandoned
from feeder.refresh import open_refresher
from tests.conftest import (
    make_config,
    running,
    wait_for_workers,
    write_config_file,
    write_source,
)
from tests.imageserver import PNG, ImageServer, hang, image, png_of_size

_REPO = Path(__file__).resolve().parents[1]
#: The reference article (byte-identical to shared/samples/cls-seed.md).
SEED_TEXT = (_REPO / "sources" / "cls-seed.md").read_text(encoding="utf-8")
SEED_TITLE: str = yaml.safe_load(SEED_TEXT.split("---", 2)[1])["title"]
#: Paths of the seed's images on img.cls.cn (also on the fake server, by the mirror).
SEED_IMAGE_PATHS = sorted(set(re.findall(r"https://img\.cls\.cn(/images/[\w/.-]+\.png)",
                                         SEED_TEXT)))
#: What the fake server serves for each: a real PNG, then distinct PNG-headed bodies.
IMAGE_BODIES = {path: PNG if i == 0 else png_of_size(200 + 10 * i)
                for i, path in enumerate(SEED_IMAGE_PATHS)}

#: schedule.interval: long enough that no scheduled refresh runs during a test.
INTERVAL = 3600
#: Written in config.yaml: must never appear in any response.
SECRET = "e2e-secret-3f9c1b7a-never-served"
START_TIMEOUT = 30.0
CLI_TIMEOUT = 90.0


# -- helpers --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class RunningDaemon:
    """One ``feeder run`` process and what it runs on."""

    proc: subprocess.Popen[bytes]
    root: Path
    config_file: Path
    port: int
    images: ImageServer
    log_file: Path
    #: False once a test takes over checking how (and whether) the process ends.
    check_exit: bool = True
    cli_procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def feeds(self) -> Path:
        return self.root / "feeds"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    async def get(self, path: str, headers: dict[str, str] | None = None, *,
                  decompress: bool = True, limit: float = 10.0) -> Reply:
        """GET ``path`` (already URL-encoded as wanted) with aiohttp."""
        async with aiohttp.ClientSession(auto_decompress=decompress) as session, \
                session.get(self.base_url + path, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=limit)) as response:
            body = await response.read()
            return Reply(response.status, CIMultiDict(response.headers), body)

    async def health(self, limit: float = 10.0) -> dict[str, Any]:
        reply = await self.get("/healthz", limit=limit)
        assert reply.status in (200, 503), reply
        data: dict[str, Any] = json.loads(reply.body)
        return data

    async def metrics(self) -> dict[str, float]:
        reply = await self.get("/metrics")
        assert reply.status == 200
        values = {}
        for line in reply.body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split()
                values[name] = float(value)
        return values

    async def refreshes(self) -> int:
        return int((await self.metrics())["feeder_refreshes_total"])

    async def wait_ready(self, *, refreshed: bool = True) -> dict[str, Any]:
        """Wait until /healthz answers (and, if ``refreshed``, shows a finished refresh)."""
        return await self.wait_health(
            lambda h: not refreshed or h["last_refresh"] is not None, START_TIMEOUT)

    async def wait_health(self, condition: Callable[[dict[str, Any]], bool],
                          limit: float = START_TIMEOUT) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                health = await self.health(limit=5)
                if condition(health):
                    return health
            if loop.time() > deadline:
                pytest.fail(f"daemon health never got there in {limit} s:\n{self.log()}")
            await asyncio.sleep(0.02)

    async def cli(self, *args: str) -> CliResult:
        """Run ``feeder -c config.yaml ARGS`` to the end."""
        return await finish(await self.start_cli(*args))

    async def start_cli(self, *args: str) -> asyncio.subprocess.Process:
        """Start ``feeder -c config.yaml ARGS`` without waiting for it."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feeder", "-c", str(self.config_file), *args,
            cwd=self.root, env=_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.cli_procs.append(proc)
        return proc

    async def terminate(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``), then wait at most 5 s for the exit status (TimeoutExpired
        if not)."""
        self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, 5)

    async def sigterm(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``); the exit status, or the test fails if the daemon outlives
        5 s."""
        try:
            return await self.terminate(sig)
        except subprocess.TimeoutExpired:
            self.check_exit = False
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            pytest.fail(f"{sig.name} did not end the daemon within 5 s:\n{self.log()}")


async def finish(proc: asyncio.subprocess.Process) -> CliResult:
    """Wait for a CLI process and collect its output."""
    stdout, stderr = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    assert proc.returncode is not None
    return CliResult(proc.returncode, stdout.decode(), stderr.decode())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FEEDER_CONFIG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _error_line(result: CliResult) -> str:
    """The one line a command that failed cleanly ends on: exit 1, no traceback."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    line: str = result.stderr.splitlines()[-1]
    return line


def _spawn_daemon(config_file: Path, log_file: Path, *,
                  nohup: bool = False) -> subprocess.Popen[bytes]:
    """``feeder run``; with ``nohup``, SIGHUP ignored, as ``nohup`` starts it."""
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "feeder", "-c", str(config_file), "run"],
            cwd=config_file.parent, env=_env(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None,
        )


def _write_config(root: Path, port: int, image_url: str, *, watch: bool,
                  interval: int = INTERVAL) -> Path:
    raw = {
        "paths": {"sources": "sources", "feeds": "feeds", "cache": "cache", "state": "state"},
        "site": {"base_url": f"http://127.0.0.1:{port}", "title": "E2E feeds"},
        "server": {"host": "127.0.0.1", "port": port},
        "schedule": {"interval": interval, "watch": watch},
        "images": {"origins": {"https://img.cls.cn": image_url}, "attempts": 1,
                   "timeout": 10, "deadline": 30},
    }
    path = root / "config.yaml"
    path.write_text(f"# {SECRET}\n" + yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def write_article(sources: Path, name: str, title: str, category: str = "测试",
                  body: str = "正文。") -> Path:
    front = yaml.safe_dump({"title": title, "date": "2022-04-01 10:00:00",
                            "categories": [category]}, allow_unicode=True)
    path = sources / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{front}---\n\n{body}\n", encoding="utf-8")
    return path


def generate_articles(sources: Path, count: int, prefix: str = "gen") -> None:
    """``count`` small articles in five categories, under ``sources/<prefix>/``."""
    folder = sources / prefix
    folder.mkdir(parents=True, exist_ok=True)
    filler = "Lorem ipsum dolor sit amet. " * 20
    for i in range(count):
        category = ("金融", "科技", "深度", "财联社", "市场")[i % 5]
        (folder / f"{prefix}-{i:05d}.md").write_text(
            f"---\ntitle: 'Generated {prefix} {i}'\n"
            f"date: 2022-03-{1 + i % 28:02d} 10:{i % 60:02d}:00\n"
            f"categories:\n - {category}\n---\n\nArticle {i}. {filler}\n",
            encoding="utf-8",
        )


def count_files(folder: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(folder) if not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def assert_feeds_parse(feeds: Path) -> int:
    """Every ``feeds/**/*.xml`` parses cleanly (feedparser bozo == 0); returns how many."""
    files = sorted(feeds.rglob("*.xml"))
    for file in files:
        parsed = feedparser.parse(file.read_bytes())
        assert parsed.bozo == 0, f"{file}: {parsed.get('bozo_exception')!r}"
    leftovers = [p for p in feeds.rglob(".*") if p.is_file()]
    assert leftovers == [], f"temp files left in feeds/: {leftovers}"
    return len(files)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written: http.client neither normalizes nor re-encodes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept-Encoding": "identity"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def hold_lock(path: Path) -> Iterator[Callable[[], None]]:
    """Hold the refresh lock as another feeder process would; yields a release function."""
    with open(path, "a+b") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield lambda: fcntl.flock(file, fcntl.LOCK_UN)
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def unix_connections(sock: Path) -> int:
    """Open connections the daemon accepted on its control socket (Linux /proc/net/unix).

    Accepted sockets carry the listening socket's path, so every line naming it but
    the listening one is a connected client.
    """
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return max(0, sum(1 for line in lines if line.split()[-1] == str(sock)) - 1)


# -- fixtures -------------------------------------------------------------------------------

StartDaemon = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """``await start_daemon(watch=False, seed=True, ready=True, prepare=None)``.

    Starts a fake image server serving the seed's images, writes config.yaml and
    sources/ under ``tmp_path`` and starts ``feeder run``; with ``ready`` it waits
    until /healthz shows the first refresh finished.
    """
    started: list[RunningDaemon] = []
    servers: list[ImageServer] = []

    async def start(*, watch: bool = False, seed: bool = True, ready: bool = True,
                    prepare: Callable[[Path], None] | None = None,
                    interval: int = INTERVAL, nohup: bool = False) -> RunningDaemon:
        server = ImageServer()
        for path, body in IMAGE_BODIES.items():
            server.route(path, image(body))
        await server.start()
        servers.append(server)
        sources = tmp_path / "sources"
        sources.mkdir(exist_ok=True)
        if seed:
            (sources / "cls-seed.md").write_text(SEED_TEXT, encoding="utf-8")
        if prepare is not None:
            prepare(tmp_path)
        for _attempt in range(3):  # another process may take the free port first
            port = _free_port()
            config_file = _write_config(tmp_path, port, server.url, watch=watch,
                                        interval=interval)
            log_file = tmp_path / f"daemon-{len(started)}.log"
            daemon = RunningDaemon(_spawn_daemon(config_file, log_file, nohup=nohup), tmp_path,
                                   config_file, port, server, log_file)
            started.append(daemon)
            try:
                await daemon.wait_health(lambda _: True)
            except pytest.fail.Exception:
                if daemon.proc.poll() is not None and "address already in use" in daemon.log():
                    continue
                raise
            if ready:
                await daemon.wait_ready()
            return daemon
        pytest.fail("no free port for the daemon")

    try:
        yield start
    finally:
        problems = []
        for daemon in started:
            for proc in daemon.cli_procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.communicate()
            if daemon.proc.poll() is None:
                try:
                    await daemon.terminate()
                except subprocess.TimeoutExpired:
                    daemon.proc.kill()
                    await asyncio.to_thread(daemon.proc.wait)
                    if daemon.check_exit:
                        problems.append(f"daemon ignored SIGTERM for 5 s:\n{daemon.log()}")
            if (daemon.check_exit and daemon.proc.returncode not in (0, None)
                    and "address already in use" not in daemon.log()):
                problems.append(f"daemon exited with {daemon.proc.returncode}:\n"
                                f"{daemon.log()}")
        for server in servers:
            await server.close()
        assert not problems, "\n".join(problems)


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> RunningDaemon:
    """A daemon that has published the seed article."""
    return await start_daemon()


# -- serving --------------------------------------------------------------------------------


def age_feeds(daemon: RunningDaemon) -> None:
    """Date the published feeds a minute back: a feed under a second old has no
    Last-Modified, which a change in the same second would share."""
    then = time.time() - 60
    for path in (daemon.feeds / "all").iterdir():
        os.utime(path, (then, then))


async def test_feeds_index_and_images_are_served_with_their_types(daemon: RunningDaemon):
    health = await daemon.health()
    assert health["ok"] is True
    assert health["articles"] == 1

    age_feeds(daemon)
    rss = await daemon.get("/feeds/all/rss.xml")
    assert rss.status == 200
    assert rss.content_type == "application/rss+xml"
    assert rss.headers["Cache-Control"] == f"public, max-age={INTERVAL}"
    assert rss.headers["ETag"]
    assert rss.headers["Last-Modified"]
    parsed = feedparser.parse(rss.body)
    assert parsed.bozo == 0, parsed.get("bozo_exception")
    assert [entry.title for entry in parsed.entries] == [SEED_TITLE]
    assert f"<ttl>{INTERVAL // 60}</ttl>" in rss.body.decode()

    atom = await daemon.get("/feeds/all/atom.xml")
    assert atom.status == 200
    assert atom.content_type == "application/atom+xml"
    assert feedparser.parse(atom.body).bozo == 0

    feed_json = await daemon.get("/feeds/all/feed.json")
    assert feed_json.status == 200
    assert feed_json.content_type == "application/feed+json"
    assert [item["title"] for item in json.loads(feed_json.body)["items"]] == [SEED_TITLE]

    index = await daemon.get("/")
    assert index.status == 200
    assert index.content_type == "text/html"
    assert b"/feeds/all/rss.xml" in index.body

    # Every image in the feed was rewritten to the daemon's own /images/ and is served
    # there with the bytes the (fake) origin served.
    text = rss.body.decode()
    assert "img.cls.cn" not in text
    image_urls = set(re.findall(r"http://127\.0\.0\.1:\d+/images/[\w.%-]+", text))
    assert image_urls
    assert {url.rsplit("/images/", 1)[0] for url in image_urls} == {daemon.base_url}
    served = set()
    for url in sorted(image_urls):
        reply = await daemon.get(url.removeprefix(daemon.base_url))
        assert reply.status == 200, url
        assert reply.content_type == "image/png"
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Content-Security-Policy"] == "default-src 'none'"
        assert "immutable" in reply.headers["Cache-Control"]
        served.add(reply.body)
    assert served == set(IMAGE_BODIES.values())
    assert all(daemon.images.requests[path] == 1 for path in IMAGE_BODIES)


async def test_repeated_conditional_get_is_answered_304(daemon: RunningDaemon):
    age_feeds(daemon)
    identity = {"Accept-Encoding": "identity"}
    first = await daemon.get("/feeds/all/rss.xml", identity)
    assert first.status == 200
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]

    by_etag = await daemon.get("/feeds/all/rss.xml", {**identity, "If-None-Match": etag})
    assert by_etag.status == 304
    assert by_etag.body == b""
    assert by_etag.headers["ETag"] == etag

    by_date = await daemon.get("/feeds/all/rss.xml",
                               {**identity, "If-Modified-Since": last_modified})
    assert by_date.status == 304
    assert by_date.body == b""

    # The gzipped representation revalidates with its own tag.
    gzipped = await daemon.get("/feeds/all/atom.xml", {"Accept-Encoding": "gzip"})
    again = await daemon.get("/feeds/all/atom.xml", {"Accept-Encoding": "gzip",
                                                     "If-None-Match": gzipped.headers["ETag"]})
    assert again.status == 304

    # Not a blanket 304: another tag or an older date gets the feed.
    stale = await daemon.get("/feeds/all/rss.xml", {**identity, "If-None-Match": '"stale"'})
    assert stale.status == 200
    assert stale.body == first.body
    earlier = parsedate_to_datetime(last_modified) - timedelta(hours=1)
    older = await daemon.get("/feeds/all/rss.xml", {
        **identity, "If-Modified-Since": format_datetime(earlier, usegmt=True)})
    assert older.status == 200


async def test_feeds_are_gzipped_when_the_client_accepts_it(daemon: RunningDaemon):
    plain = await daemon.get("/feeds/all/rss.xml", {"Accept-Encoding": "identity"})
    assert plain.status == 200
    assert "Content-Encoding" not in plain.headers

    gzipped = await daemon.get("/feeds/all/rss.xml", {"Accept-Encoding": "gzip"},
                               decompress=False)
    assert gzipped.status == 200
    assert gzipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in gzipped.headers["Vary"]
    assert gzipped.content_type == "application/rss+xml"
    assert gzipped.body != plain.body
    assert gzip.decompress(gzipped.body) == plain.body
    assert gzipped.headers["ETag"] != plain.headers["ETag"]


TRAVERSALS = [
    "/feeds/../config.yaml",
    "/feeds/%2e%2e/config.yaml",
    "/images/%2e%2e/config.yaml",
    "/images/..%2fconfig.yaml",
    "/feeds/%2e%2e%2fconfig.yaml",
    "/feeds/..%2fconfig.yaml",
    "/feeds/all/..%2f..%2fconfig.yaml",
    "/feeds/all/%2e%2e/%2e%2e/config.yaml",
    "/images/%2e%2e%2fconfig.yaml",
    "/images/..%5cconfig.yaml",
    "/feeds/..%5cconfig.yaml",
    "/feeds/%2fetc%2fpasswd",
    "/feeds//etc/passwd",
    "/images/%00config.yaml",
    "/feeds/.%2e/config.yaml",
    "/feeds/leak.yaml",  # symlinks out of the folder, made by the test
    "/images/leak.png",
]


async def test_path_traversal_gets_404_and_nothing_else(daemon: RunningDaemon):
    config_text = daemon.config_file.read_bytes()
    (daemon.feeds / "leak.yaml").symlink_to(daemon.config_file)
    (daemon.root / "cache" / "leak.png").symlink_to(daemon.config_file)
    # Sanity: the requests reach the app (a real file is served the same way).
    status, body = await asyncio.to_thread(raw_get, daemon.port, "/feeds/all/rss.xml")
    assert status == 200
    answers = {path: await asyncio.to_thread(raw_get, daemon.port, path) for path in TRAVERSALS}
    wrong = {path: status for path, (status, _) in answers.items() if status != 404}
    assert wrong == {}
    for path, (_, body) in answers.items():
        assert SECRET.encode() not in body, path
        assert config_text not in body, path
        assert b"base_url" not in body, path


def send_raw(port: int, request: bytes) -> bytes:
    """Send ``request`` bytes as they are; the response's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        return conn.makefile("rb").readline().rstrip()


async def test_malformed_requests_get_400_and_log_no_error(daemon: RunningDaemon):
    """A raw (unescaped) UTF-8 path, a URL over 8190 bytes: the client's mistake, not ours."""
    for target in ("/feeds/categories/金融/rss.xml".encode(), b"/feeds/" + b"a" * 9000):
        request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        status_line = await asyncio.to_thread(send_raw, daemon.port, request)
        assert status_line.split(b" ")[1] == b"400", status_line
    assert (await daemon.get("/feeds/all/rss.xml")).status == 200
    log = daemon.log()
    assert " ERROR " not in log
    assert "Traceback" not in log


# -- the control socket and the CLI ---------------------------------------------------------


async def test_refresh_command_is_run_by_the_daemon(daemon: RunningDaemon):
    before = await daemon.refreshes()
    last_before = (await daemon.health())["last_refresh"]
    write_article(daemon.sources, "new/arrival.md", "新到的文章")
    (daemon.sources / "broken.md").write_text("---\ntitle: [broken\n---\nx\n", encoding="utf-8")

    result = await daemon.cli("refresh")

    assert result.returncode == 0, result
    assert result.stdout.startswith("daemon: "), result
    assert "2 changed, 1 failed" in result.stdout
    assert "2 articles" in result.stdout
    # What was refused, and why, as a refresh run here says it.
    assert result.stderr.startswith("broken.md:3: invalid YAML front matter: "), result
    assert await daemon.refreshes() == before + 1
    assert (await daemon.health())["last_refresh"] != last_before
    rss = await daemon.get("/feeds/all/rss.xml")
    assert "新到的文章" in [entry.title for entry in feedparser.parse(rss.body).entries]


@pytest.mark.slow
async def test_two_refresh_commands_at_once_share_one_refresh(daemon: RunningDaemon):
    """Requests made while a refresh runs share the next one.

    To start both commands "at once" deterministically, the test holds the refresh
    lock: a first ``feeder refresh`` (X) starts refresh R1, which waits for the lock;
    then A and B connect while R1 waits. Once the lock is released, R1 runs for X
    and a single R2 for A and B together.
    """
    lock_file = daemon.state / "refresh.lock"
    before = await daemon.refreshes()
    write_article(daemon.sources, "x.md", "Before X")
    with hold_lock(lock_file) as release:
        try:
            x = await daemon.start_cli("refresh")
            await daemon.wait_health(lambda h: h["refreshing"])
            a = await daemon.start_cli("refresh")
            b = await daemon.start_cli("refresh")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while unix_connections(daemon.state / "control.sock") < 3:
                assert loop.time() < deadline, "the refresh commands never connected"
                assert a.returncode is None
                assert b.returncode is None
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # their requests are read as soon as they connect
        finally:
            release()
        results = [await finish(p) for p in (x, a, b)]

    for result in results:
        assert result.returncode == 0, result
        assert result.stdout.startswith("daemon: "), result
    x_out, a_out, b_out = (r.stdout for r in results)
    assert "1 changed" in x_out
    assert a_out == b_out  # the very same refresh, down to its duration
    assert "0 changed" in a_out
    assert await daemon.refreshes() == before + 2  # R1 for X, one R2 for A and B


async def test_status_command_shows_the_running_daemon(daemon: RunningDaemon):
    result = await daemon.cli("status")
    assert result.returncode == 0, result
    first = result.stdout.splitlines()[0]
    assert first.startswith("daemon: running"), result.stdout
    assert f"pid {daemon.proc.pid}" in first
    assert "1 articles" in result.stdout


async def test_second_daemon_on_the_same_state_refuses_to_start(daemon: RunningDaemon):
    result = await daemon.cli("run")
    assert result.returncode == 1
    assert "already running" in result.stderr
    assert (await daemon.health())["ok"] is True


async def test_watch_publishes_a_new_file_without_any_command(start_daemon: StartDaemon):
    daemon = await start_daemon(watch=True)
    before = await daemon.refreshes()
    write_article(daemon.sources, "watched.md", "自动发现的文章")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    titles: list[str] = []
    while "自动发现的文章" not in titles:
        assert loop.time() < deadline, f"never published; feed has {titles}\n{daemon.log()}"
        await asyncio.sleep(0.1)
        rss = await daemon.get("/feeds/all/rss.xml")
        titles = [entry.title for entry in feedparser.parse(rss.body).entries]
    assert await daemon.refreshes() > before


async def wait_for_title(daemon: RunningDaemon, title: str, limit: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    titles: list[str] = []
    while title not in titles:
        assert loop.time() < deadline, f"never published; feed has {titles}\n{daemon.log()}"
        await asyncio.sleep(0.1)
        rss = await daemon.get("/feeds/all/rss.xml")
        titles = [entry.title for entry in feedparser.parse(rss.body).entries]


async def test_watch_publishes_what_came_with_a_file_named_in_no_utf8(start_daemon: StartDaemon):
    daemon = await start_daemon(watch=True)
    (daemon.sources / os.fsdecode(b"bad\xff.md")).write_text("---\ntitle: x\n---\nx\n")
    write_article(daemon.sources, "beside.md", "同时写入的文章")
    await wait_for_title(daemon, "同时写入的文章")
    assert "Traceback" not in daemon.log()


async def test_watch_follows_a_sources_folder_that_is_replaced(start_daemon: StartDaemon):
    daemon = await start_daemon(watch=True)
    # A deploy that swaps the folder, or a share mounted again: another inode.
    daemon.sources.rename(daemon.root / "sources.old")
    daemon.sources.mkdir()
    (daemon.root / "sources.old" / "cls-seed.md").rename(daemon.sources / "cls-seed.md")
    write_article(daemon.sources, "after.md", "换了文件夹之后")
    await wait_for_title(daemon, "换了文件夹之后")
    write_article(daemon.sources, "later.md", "再后来的文章")  # still watched
    await wait_for_title(daemon, "再后来的文章")


def test_the_watch_ignores_dot_files_and_editor_leftovers(tmp_path: Path) -> None:
    sources = tmp_path / ".local" / "sources"  # under a dot-folder itself
    (sources / "folder.d").mkdir(parents=True)
    watched = {name: _is_watched_source(sources, False, str(sources / name))
               for name in ("a.md", "b.HTML", "sub", "folder.d", ".a.md.swp", ".hidden.md",
                            "a.md~", ".git/config", "notes.txt", "2022.03")}
    assert watched == {"a.md": True, "b.HTML": True, "sub": True, "folder.d": True,
                       ".a.md.swp": False, ".hidden.md": False, "a.md~": False,
                       ".git/config": False, "notes.txt": False, "2022.03": False}
    # Gone, "2022.03" may have been a folder of sources.
    assert _is_watched_source(sources, True, str(sources / "2022.03"))
    assert not _is_watched_source(sources, True, str(sources / ".git"))


async def test_watch_publishes_once_a_missing_sources_folder_appears(
        start_daemon: StartDaemon):
    def unmount(root: Path) -> None:
        (root / "sources").rename(root / "unmounted")

    daemon = await start_daemon(watch=True, prepare=unmount)
    (daemon.root / "unmounted").rename(daemon.sources)  # mounted, late
    await wait_for_title(daemon, "沪上险企战疫进行时：加强健康服务、保障菜篮子、线上线下同守_沪_")


async def test_a_refresh_failing_for_a_known_reason_is_one_log_line(daemon: RunningDaemon):
    daemon.sources.rename(daemon.root / "unmounted")
    result = await daemon.cli("refresh")
    assert result.returncode == 1
    assert "the sources folder does not exist" in result.stderr
    log = daemon.log()
    assert "refresh failed: " in log
    assert "sources folder does not exist" in log
    assert "Traceback" not in log
    assert "Running job" not in log  # nor the scheduler's two lines per refresh
    assert (await daemon.health())["ok"] is False
    status = await daemon.cli("status")
    assert ": failed: " in status.stdout
    assert "the sources folder does not exist" in status.stdout


async def test_health_counts_what_is_published_even_if_the_first_refresh_fails(
        start_daemon: StartDaemon):
    def publish_then_unmount(root: Path) -> None:
        config_file = _write_config(root, _free_port(), "http://127.0.0.1:9", watch=False)
        subprocess.run([sys.executable, "-m", "feeder", "-c", str(config_file), "refresh"],
                       check=True, capture_output=True, env=_env(), timeout=CLI_TIMEOUT)
        (root / "sources").rename(root / "unmounted")

    daemon = await start_daemon(prepare=publish_then_unmount)
    health = await daemon.health()
    assert (health["ok"], health["articles"]) == (False, 1)
    assert (await daemon.metrics())["feeder_articles"] == 1


async def run_cli(config_file: Path, *args: str) -> CliResult:
    """Run ``feeder -c CONFIG_FILE ARGS`` to the end, with no daemon fixture around."""
    return await finish(await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feeder", "-c", str(config_file), *args,
        cwd=config_file.parent, env=_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ))


@pytest.mark.parametrize("command", ["refresh", "gc"])
async def test_a_command_waiting_for_another_refresh_says_so(tmp_path: Path, command: str):
    config_file = write_config_file(tmp_path, server={"port": _free_port()})
    config = load_config(config_file)
    write_article(config.paths.sources, "a.md", "A")
    assert (await run_cli(config_file, "refresh")).returncode == 0  # gc needs one
    with hold_lock(config.lock_file) as release:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feeder", "-c", str(config_file), command,
            cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), START_TIMEOUT)
        assert line == b"another refresh is running: waiting for it to end\n"
        assert proc.returncode is None
        release()
        result = await finish(proc)
    assert result.returncode == 0, result
    assert result.stdout.startswith("1 files scanned" if command == "refresh" else "0 cached")


async def test_two_daemons_started_at_once_on_one_state_leave_one_running(tmp_path: Path):
    """Two daemons (other ports, same paths.state) start before either made its socket.

    Both run in this event loop, so the second one starts while the first is still
    setting up: deciding from the socket, both ran and the second took the socket.
    """
    write_article(tmp_path / "sources", "a.md", "An article")
    configs = [make_config(tmp_path, server={"port": _free_port()}) for _ in range(2)]
    config_file = write_config_file(tmp_path)  # the same paths.state, for the commands
    tasks = [asyncio.create_task(run_daemon(config)) for config in configs]
    try:
        done, running = await asyncio.wait(tasks, timeout=5,
                                           return_when=asyncio.FIRST_COMPLETED)
        assert (len(done), len(running)) == (1, 1), "both daemons kept running"
        [refused], [survivor] = done, running
        with pytest.raises(DaemonRunningError,
                           match=rf"^a daemon is already running \(pid {os.getpid()}, "
                                 r"lock .*/state/daemon\.lock is held\)$"):
            refused.result()

        refresh = await run_cli(config_file, "refresh")
        assert refresh.returncode == 0, refresh
        assert refresh.stdout.startswith("daemon: "), refresh
        assert "1 articles" in refresh.stdout
        status = await run_cli(config_file, "status")
        assert status.stdout.startswith(f"daemon: running (pid {os.getpid()},"), status
        third = await run_cli(config_file, "run")
        assert third.returncode == 1, third
        assert third.stderr.startswith("Error: a daemon is already running"), third
        assert "Traceback" not in third.stderr

        os.kill(os.getpid(), signal.SIGTERM)  # the survivor's handler: it stops cleanly
        await asyncio.wait_for(survivor, 5)
        assert not (tmp_path / "state" / "control.sock").exists()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_run_names_a_port_in_use(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_file = write_config_file(tmp_path, server={"host": "127.0.0.1", "port": port})
        result = await run_cli(config_file, "run")
    assert _error_line(result) == (
        f"Error: cannot listen on 127.0.0.1:{port} (server.host/server.port): "
        "address already in use")
    assert not (tmp_path / "state" / "control.sock").exists()


async def test_run_names_a_host_that_does_not_resolve(tmp_path: Path):
    port = _free_port()
    config_file = write_config_file(tmp_path, server={"host": "no-such-host.invalid",
                                                      "port": port})
    result = await run_cli(config_file, "run")
    assert _error_line(result).startswith(
        f"Error: cannot listen on no-such-host.invalid:{port} (server.host): "), result


async def test_run_names_a_control_socket_path_too_long(tmp_path: Path):
    state = tmp_path / ("s" * 120)  # control.sock in it is past the AF_UNIX limit
    config_file = write_config_file(tmp_path, paths={"state": state.name},
                                    server={"port": _free_port()})
    result = await run_cli(config_file, "run")
    sock = state / "control.sock"
    assert _error_line(result) == (
        f"Error: cannot make the control socket {sock} (paths.state): AF_UNIX path too long: "
        f"{len(os.fsencode(sock))} bytes, where a socket's path may have 107; "
        "choose a shorter one")


async def test_run_names_a_state_folder_that_is_a_file(tmp_path: Path):
    (tmp_path / "state").write_text("not a folder\n")
    config_file = write_config_file(tmp_path, server={"port": _free_port()})
    result = await run_cli(config_file, "run")
    assert _error_line(result) == (
        f"Error: {tmp_path / 'state'}: Not a directory (paths.state)")


async def test_refresh_by_the_daemon_names_a_feeds_folder_that_is_a_file(
        daemon: RunningDaemon):
    shutil.rmtree(daemon.feeds)
    daemon.feeds.write_text("not a folder\n")

    result = await daemon.cli("refresh")

    assert result.returncode == 1, result
    reason = f"{daemon.feeds}: Not a directory (paths.feeds)"
    assert result.stderr == f"Error: refresh failed: {reason}\n"
    assert f"ERROR refresh failed: {reason}\n" in daemon.log()
    assert "Traceback" not in daemon.log()
    health = await daemon.health()  # the daemon goes on, and says what is wrong
    assert (health["ok"], health["last_result"]) == (False, reason)


# -- shutting down --------------------------------------------------------------------------


async def test_sigterm_stops_an_idle_daemon(daemon: RunningDaemon):
    sock = daemon.state / "control.sock"
    assert sock.exists()
    assert await daemon.sigterm() == 0
    assert not sock.exists()
    assert "Traceback" not in daemon.log()
    # With the daemon gone, `feeder status` says so.
    status = await daemon.cli("status")
    assert status.stdout.startswith("daemon: not running"), status


async def test_started_with_nohup_it_outlives_a_sighup(start_daemon: StartDaemon):
    daemon = await start_daemon(nohup=True)
    daemon.proc.send_signal(signal.SIGHUP)
    before = await daemon.refreshes()
    assert (await daemon.cli("refresh")).returncode == 0  # it still answers, and refreshes
    assert await daemon.refreshes() == before + 1
    assert "SIGHUP" not in daemon.log()
    assert await daemon.sigterm() == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_during_a_cold_start_refresh_exits_0(start_daemon: StartDaemon,
                                                           sig: signal.Signals):
    """3000 articles and no state: SIGTERM while the first (scheduled) refresh parses them.

    SIGHUP (a terminal closed) stops it as cleanly, instead of killing it on the spot.
    """
    daemon = await start_daemon(
        ready=False, prepare=lambda root: generate_articles(root / "sources", 3000))
    await daemon.wait_health(lambda h: h["refreshing"])

    assert await daemon.sigterm(sig) == 0

    assert f"{sig.name}: stopping" in daemon.log()
    assert "refresh abandoned: the next refresh completes it" in daemon.log()
    assert_feeds_parse(daemon.feeds)  # whatever was written is whole
    assert not (daemon.state / "control.sock").exists()
    status = await daemon.cli("status")
    assert "last refresh did not finish (stopped or killed)" in status.stdout, status
    # What was done is kept and the rest is done by the next refresh (here, in-process).
    after = await daemon.cli("refresh")
    assert after.returncode == 0, after
    assert not after.stdout.startswith("daemon:")
    assert "3001 articles" in after.stdout
    assert count_files(daemon.feeds / "articles") == 3001
    assert assert_feeds_parse(daemon.feeds) >= 6  # all/ and at least a category
    assert "did not finish" not in (await daemon.cli("status")).stdout


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no worker processes")
async def test_sigterm_to_the_daemon_and_its_workers_exits_0_quietly(start_daemon: StartDaemon):
    """As a service manager stops a service: SIGTERM to each of its processes."""
    daemon = await start_daemon(
        ready=False, prepare=lambda root: generate_articles(root / "sources", 3000))
    workers = await asyncio.to_thread(wait_for_workers, daemon.proc.pid, 2, daemon.proc.poll)
    for worker in workers:  # the workers first: the daemon must not take it for a failure
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGTERM)
    await asyncio.sleep(0.2)  # a signal may take that long to reach the daemon's loop
    assert await daemon.sigterm() == 0
    assert "worker processes failed" not in daemon.log()
    assert "Traceback" not in daemon.log()
    assert not any(map(running, workers))


@pytest.mark.slow
async def test_sigterm_while_a_large_refresh_writes_exits_0_and_leaves_valid_feeds(
        daemon: RunningDaemon):
    """3000 new articles through `feeder refresh`; SIGTERM while their pages are written."""
    articles = daemon.feeds / "articles"
    pages = count_files(articles)
    await asyncio.to_thread(generate_articles, daemon.sources, 3000)
    refresh = await daemon.start_cli("refresh")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while count_files(articles) <= pages:  # feeds are written first, then pages
        assert loop.time() < deadline, daemon.log()
        assert refresh.returncode is None
        await asyncio.sleep(0.01)
    assert (await daemon.health())["refreshing"] is True

    assert await daemon.sigterm() == 0

    # The command waiting for that refresh is told it was abandoned (or that it ran).
    result = await finish(refresh)
    assert (result.returncode, result.stdout.startswith("daemon: ")) == (0, True) or (
        result.returncode == 1 and "abandoned" in result.stderr), result
    assert "Traceback" not in daemon.log()
    assert assert_feeds_parse(daemon.feeds) >= 6
    after = await daemon.cli("refresh")
    assert after.returncode == 0, after
    assert "3001 articles" in after.stdout
    assert count_files(articles) == 3001
    assert_feeds_parse(daemon.feeds)


def write_slow_image_article(sources: Path) -> None:
    """An article whose image the fake img.cls.cn answers slowly once routed to ``hang()``."""
    write_article(sources, "slow.md", "Slow image",
                  body="<p><img src='https://img.cls.cn/images/slow.png'></p>")


async def start_stuck_on_a_slow_image(start_daemon: StartDaemon,
                                     interval: int = INTERVAL) -> RunningDaemon:
    """A daemon whose first, scheduled refresh waits on an image that never comes."""
    daemon = await start_daemon(ready=False, interval=interval,
                                prepare=lambda root: write_slow_image_article(root / "sources"))
    daemon.images.route("/images/slow.png", hang())
    return daemon


@pytest.mark.slow
async def test_sigterm_during_a_scheduled_refresh_logs_no_error(start_daemon: StartDaemon):
    """The first refresh waits on a slow image when SIGTERM comes; no command waits for it."""

    daemon = await start_stuck_on_a_slow_image(start_daemon)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while daemon.images.requests["/images/slow.png"] == 0:
        assert loop.time() < deadline, daemon.log()
        await asyncio.sleep(0.02)

    assert await daemon.sigterm() == 0
    assert " ERROR " not in daemon.log()
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
async def test_a_refresh_longer_than_the_interval_logs_no_warning(start_daemon: StartDaemon):
    daemon = await start_stuck_on_a_slow_image(start_daemon, interval=1)
    await asyncio.sleep(3.5)  # three ticks while the first refresh waits
    assert await daemon.sigterm() == 0
    assert " WARNING " not in daemon.log()  # such as "skipped: maximum number of ..."


@pytest.mark.slow
async def test_sigterm_while_images_download_and_a_refresh_command_waits(
        daemon: RunningDaemon):
    """A refresh stuck on a slow image download, requested by `feeder refresh`."""
    daemon.images.route("/images/slow.png", hang())
    write_slow_image_article(daemon.sources)
    refresh = await daemon.start_cli("refresh")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while daemon.images.requests["/images/slow.png"] == 0:
        assert loop.time() < deadline, daemon.log()
        await asyncio.sleep(0.02)
    assert (await daemon.health())["refreshing"] is True

    assert await daemon.sigterm() == 0
    # The waiting command is told by the daemon (it does not redo the refresh itself).
    result = await finish(refresh)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_sigterm_never_starts_a_refresh_asked_for_before_it(start_daemon: StartDaemon):
    """The first refresh waits on a slow image; `feeder refresh` asks for the next one."""

    daemon = await start_stuck_on_a_slow_image(start_daemon)
    refresh = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while "refresh requested on the control socket" not in daemon.log():
        assert loop.time() < deadline, daemon.log()
        if refresh is None and daemon.images.requests["/images/slow.png"]:
            refresh = await daemon.start_cli("refresh")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # past the moment the request would start a refresh

    assert await daemon.sigterm() == 0  # within 5 s: the asked-for refresh never ran
    assert daemon.images.requests["/images/slow.png"] == 1
    assert refresh is not None
    result = await finish(refresh)
    assert result.returncode == 1, result
    assert "daemon stopped" in result.stderr
    assert "Traceback" not in daemon.log()


async def test_stop_abandons_a_refresh_still_waiting_for_the_lock(tmp_path: Path):
    """`feeder gc` holds the lock when a refresh is asked for, then the daemon is stopped."""
    config = make_config(tmp_path)
    write_source(config, "a.md", SEED_TEXT)
    config.paths.state.mkdir(parents=True)
    with open_refresher(config) as refresher, hold_lock(config.lock_file) as release:
        daemon = Daemon(config, refresher)
        asked = daemon.trigger_refresh()
        await asyncio.sleep(0.3)  # the refresh has started, and waits for the lock
        stopping = asyncio.create_task(daemon.stop())
        await asyncio.sleep(0.1)
        release()  # gc is done before the daemon's stop timeout
        await stopping
        with pytest.raises(RefreshAbandoned, match="daemon stopped"):
            await asked
    assert not (config.paths.feeds / "all" / "rss.xml").exists()  # it never ran


@pytest.mark.slow
async def test_sigterm_while_the_refresh_waits_for_the_lock(start_daemon: StartDaemon,
                                                            tmp_path: Path):
    """Another process (`feeder gc`, an in-process refresh) holds the lock at SIGTERM."""
    (tmp_path / "state").mkdir()
    with hold_lock(tmp_path / "state" / "refresh.lock"):
        # The first, scheduled refresh waits for the lock; no command waits for it.
        daemon = await start_daemon(ready=False)
        await daemon.wait_health(lambda h: h["refreshing"])
        assert await daemon.sigterm() == 0


# -- clients --------------------------------------------------------------------------------


def _read_with_reader(db: Path, url: str) -> dict[str, Any]:
    """Subscribe with the `reader` library and update twice; record every HTTP exchange."""
    from reader import make_reader

    exchanges: list[dict[str, Any]] = []

    def record(session: Any, response: Any, request: Any, **kwargs: Any) -> None:
        exchanges.append({"status": response.status_code, "sent": CIMultiDict(request.headers),
                          "received": CIMultiDict(response.headers)})

    reader = make_reader(str(db))
    try:
        # The hook API reader's own plugins use (reader.plugins.ua_fallback).
        @reader._parser.lazy_init
        def add_hook(parser: Any) -> None:
            parser.get_retriever("http://").response_hooks.append(record)

        reader.add_feed(url)
        first = list(reader.update_feeds_iter())
        entries = [(e.id, e.title, e.link, e.updated) for e in reader.get_entries()]
        # Not "scheduled": reader honours Cache-Control max-age and would wait an hour.
        second = list(reader.update_feeds_iter(scheduled=False))
        entries_again = [(e.id, e.title, e.link, e.updated) for e in reader.get_entries()]
        feed = reader.get_feed(url)
        return {"first": first, "second": second, "entries": entries,
                "entries_again": entries_again, "exchanges": exchanges,
                "last_exception": feed.last_exception}
    finally:
        reader.close()


async def test_a_real_feed_reader_subscribes_and_revalidates(daemon: RunningDaemon,
                                                             tmp_path: Path):
    url = f"{daemon.base_url}/feeds/all/rss.xml"
    age_feeds(daemon)
    got = await asyncio.to_thread(_read_with_reader, tmp_path / "reader.sqlite", url)

    assert got["last_exception"] is None
    [first] = got["first"]
    assert first.value is not None, first
    assert not isinstance(first.value, Exception), first
    assert first.value.new == 1
    [(_, title, link, _)] = got["entries"]
    assert title == SEED_TITLE
    assert link.startswith(daemon.base_url + "/")

    # Second update of the unchanged feed: reader reports "not modified" (value None)...
    [second] = got["second"]
    assert second.value is None, second
    assert got["entries_again"] == got["entries"]
    # ...because the server answered 304 to the validators it got the first time.
    first_http, second_http = got["exchanges"]
    assert first_http["status"] == 200
    assert second_http["status"] == 304
    assert second_http["sent"]["If-None-Match"] == first_http["received"]["ETag"]
    assert second_http["sent"]["If-Modified-Since"] == first_http["received"]["Last-Modified"]
    # The same validators, sent by hand, get 304 too.
    again = await daemon.get("/feeds/all/rss.xml", {
        "Accept-Encoding": first_http["received"].get("Content-Encoding", "identity"),
        "If-None-Match": second_http["sent"]["If-None-Match"],
        "If-Modified-Since": second_http["sent"]["If-Modified-Since"],
    })
    assert again.status == 304


# -- under load -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_daemon_keeps_answering_while_it_refreshes_a_large_corpus(
        daemon: RunningDaemon):
    """5000 new articles: health, metrics and the previous feed answer all along."""
    await asyncio.to_thread(generate_articles, daemon.sources, 5000)
    before = await daemon.refreshes()
    refresh = await daemon.start_cli("refresh")

    answers: list[tuple[str, int]] = []
    saw_refreshing = False
    failures: list[str] = []
    while refresh.returncode is None and not failures:
        for path in ("/healthz", "/feeds/all/rss.xml", "/metrics"):
            try:
                reply = await daemon.get(path, limit=2)
            except TimeoutError:
                failures.append(f"{path}: no answer within 2 s")
                break
            answers.append((path, reply.status))
            if path == "/healthz":
                saw_refreshing |= json.loads(reply.body)["refreshing"]
        await asyncio.sleep(0.1)
    result = await finish(refresh)

    assert failures == []
    assert saw_refreshing, "never saw the refresh running"
    assert {status for _, status in answers} == {200}, answers
    assert len(answers) >= 6
    assert result.returncode == 0, result
    assert result.stdout.startswith("daemon: ")
    assert "5001 articles" in result.stdout
    assert await daemon.refreshes() == before + 1
    rss = await daemon.get("/feeds/all/rss.xml")
    assert feedparser.parse(rss.body).bozo == 0
