"""HTTP: the published feeds and pages, the image cache, health and metrics.

Feeds and pages are served from memory: each file is read, hashed and gzipped once,
then revalidated on every request by its stat (inode, size, mtime), so a feed
reader polling every few minutes costs a few ``lstat`` calls and a dictionary
lookup. Images go through
:class:`aiohttp.web.FileResponse` (sendfile, Range, conditional requests). No
request reaches a file outside its folder: the path is checked, then the file
opened must be the one checked (a symlink swapped in between is refused).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import mimetypes
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from feeder.config import Config

#: Bytes of feed files (plain and gzipped copies together) kept in memory.
CACHE_MAX_BYTES = 64 * 1024 * 1024
#: Feed files larger than this are streamed from disk instead of cached.
CACHE_MAX_FILE = 8 * 1024 * 1024
#: Files larger than this are read (and gzipped) in a worker thread.
THREAD_READ_MIN = 1024 * 1024
GZIP_LEVEL = 6
#: Cached image names are content hashes: a name never changes its bytes.
IMAGE_CACHE_CONTROL = "public, max-age=31536000, immutable"
NOT_FOUND_TEXT = "404: Not Found\n"

#: Content types by file name, then by suffix; the rest is guessed.
_NAMED_TYPES = {
    "rss.xml": "application/rss+xml; charset=utf-8",
    "atom.xml": "application/atom+xml; charset=utf-8",
}
_SUFFIX_TYPES = {
    ".json": "application/feed+json; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    # OPML has no registered type; text/x-opml is what readers send and expect.
    ".opml": "text/x-opml; charset=utf-8",
    ".xml": "application/xml; charset=utf-8",
}
_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".svg": "image/svg+xml",
    ".bmp": "image/bmp",
    ".ico": "image/x-icon",
}
_FALLBACK_TYPE = "application/octet-stream"


class StatusSource(Protocol):
    """What the daemon tells the web app about itself."""

    def health(self) -> dict[str, Any]:
        """JSON-able state: last refresh time, its result, and an ``ok`` flag."""
        ...

    def metrics_text(self) -> str:
        """Prometheus exposition text, already formatted."""
        ...


CONFIG_KEY: web.AppKey[Config] = web.AppKey("config")
STATUS_KEY: web.AppKey[StatusSource] = web.AppKey("status")
FEED_FILES_KEY: web.AppKey[FeedFiles] = web.AppKey("feed_files")
IMAGE_FILES_KEY: web.AppKey[ImageFiles] = web.AppKey("image_files")


def make_app(config: Config, status: StatusSource) -> web.Application:
    """The web application serving ``paths.feeds``, ``paths.cache``, health and metrics."""
    app = web.Application()
    app[CONFIG_KEY] = config
    app[STATUS_KEY] = status
    app[FEED_FILES_KEY] = FeedFiles(config.paths.feeds, max_age=config.schedule.interval)
    app[IMAGE_FILES_KEY] = ImageFiles(config.paths.cache)
    app.router.add_get("/", serve_index)
    app.router.add_get("/feeds/{tail:.*}", serve_feed_file)
    app.router.add_get("/images/{name}", serve_image)
    app.router.add_get("/healthz", serve_health)
    app.router.add_get("/metrics", serve_metrics)
    return app


async def serve_index(request: web.Request) -> web.StreamResponse:
    """``/``: the index page of the feeds folder."""
    return await request.app[FEED_FILES_KEY].respond(request, "index.html")


async def serve_feed_file(request: web.Request) -> web.StreamResponse:
    """``/feeds/{tail}``: any file under the feeds folder."""
    return await request.app[FEED_FILES_KEY].respond(request, request.match_info["tail"])


async def serve_image(request: web.Request) -> web.StreamResponse:
    """``/images/{name}``: one cached image."""
    return await request.app[IMAGE_FILES_KEY].respond(request, request.match_info["name"])


async def serve_health(request: web.Request) -> web.Response:
    """``/healthz``: the daemon's health as JSON; 503 when it is not ok."""
    health = request.app[STATUS_KEY].health()
    return web.json_response(
        health,
        status=200 if health.get("ok", True) else 503,
        headers={hdrs.CACHE_CONTROL: "no-store"},
    )


async def serve_metrics(request: web.Request) -> web.Response:
    """``/metrics``: Prometheus text exposition format 0.0.4."""
    return web.Response(
        body=request.app[STATUS_KEY].metrics_text().encode("utf-8"),
        headers={
            hdrs.CONTENT_TYPE: "text/plain; version=0.0.4; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-store",
        },
    )


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log (give it to ``AppRunner(logger=...)``), quiet about bad requests.

    A request aiohttp cannot parse (a raw UTF-8 path, a URL over 8190 bytes) gets a
    400, and aiohttp logs it as an ERROR with a traceback: anyone could fill the log.
    It is the client's mistake, so here it is one DEBUG line, as aiohttp itself logs
    garbage on a new connection; an error in a handler keeps its ERROR and traceback.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            reason = (exc_info.message.strip().splitlines() or [""])[0].rstrip(":")
            self.debug(f"{msg}: %d %s", *args, exc_info.code, reason)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def not_found() -> web.Response:
    """A small plain-text 404 that says nothing about the file system."""
    return web.Response(status=404, text=NOT_FOUND_TEXT)


def resolve_inside(root: str, tail: str) -> tuple[str, os.stat_result] | None:
    """The real path of ``root/tail`` and its stat, or None if missing or outside ``root``.

    ``root`` must already be resolved. Refused: backslashes, NUL, empty segments
    (so absolute paths), and segments starting with a dot (``.``, ``..``, hidden
    and temporary files). Each segment is checked with ``lstat``, which also
    gives the file's stat; a symlink is resolved and must lead inside ``root``.
    Cheaper than ``os.path.realpath``, which walks ``root`` itself every time.
    """
    if "\\" in tail or "\x00" in tail:
        return None
    parts = tail.split("/")
    if any(not part or part[0] == "." for part in parts):
        return None
    path = root
    try:
        for part in parts:
            path = os.path.join(path, part)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                path = os.path.realpath(path)
                if not Path(path).is_relative_to(root):
                    return None
                st = os.stat(path)
    except (OSError, ValueError):  # missing, not a directory, a symlink loop
        return None
    return path, st


def feed_content_type(name: str) -> str:
    """Content-Type of a published file, from its name."""
    name = name.lower()
    if name in _NAMED_TYPES:
        return _NAMED_TYPES[name]
    suffix = os.path.splitext(name)[1]
    if suffix in _SUFFIX_TYPES:
        return _SUFFIX_TYPES[suffix]
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed is None or encoding is not None:
        return _FALLBACK_TYPE
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def image_content_type(name: str) -> str:
    """Content-Type of a cached image, from its extension."""
    suffix = os.path.splitext(name.lower())[1]
    return _IMAGE_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or _FALLBACK_TYPE


@lru_cache(maxsize=256)
def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (RFC 9110 §12.5.3)."""
    star = False
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip()
        if coding in ("gzip", "x-gzip"):
            return _qvalue(params) > 0
        if coding == "*":
            star = _qvalue(params) > 0
    return star


def _qvalue(params: str) -> float:
    """The ``q`` weight among ``;``-separated parameters; 1 when absent, 0 if malformed."""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0
    return 1.0


@dataclass(frozen=True, slots=True)
class CachedFile:
    """One feed file in memory, with everything a response needs precomputed."""

    #: ``(st_ino, st_size, st_mtime_ns)`` when read; any other stat means a new file.
    signature: tuple[int, int, int]
    #: The file's bytes.
    body: bytes
    #: The bytes gzipped, or None when gzip would not make them smaller.
    gzipped: bytes | None
    #: Strong ETag of the plain bytes, unquoted.
    etag: str
    #: Strong ETag of the gzipped bytes, unquoted: another representation, another tag.
    gzip_etag: str
    #: Modification time in whole seconds, as ``Last-Modified`` states it.
    mtime: int
    #: Headers of a 200 with the plain bytes.
    plain_headers: dict[str, str]
    #: Headers of a 200 with the gzipped bytes.
    gzip_headers: dict[str, str]

    @property
    def size(self) -> int:
        """Bytes this entry holds in memory."""
        return len(self.body) + len(self.gzipped or b"")

    def respond(self, request: web.Request) -> web.Response:
        """A 200 or 304 for ``request``; ``If-None-Match`` wins over ``If-Modified-Since``."""
        use_gzip = self.gzipped is not None and accepts_gzip(
            request.headers.get(hdrs.ACCEPT_ENCODING, "")
        )
        current = self.gzip_etag if use_gzip else self.etag
        headers = self.gzip_headers if use_gzip else self.plain_headers
        if (tags := request.if_none_match) is not None:
            # Weak comparison (W/"x" matches "x"), with the tag of what this request
            # gets only: a cache holding both copies sends both tags, and serves the
            # copy the 304 names (RFC 9111 §4.3.4), gzipped or not.
            if any(tag.value in ("*", current) for tag in tags):
                return self._not_modified(headers)
        elif (since := request.if_modified_since) is not None and self.mtime <= since.timestamp():
            return self._not_modified(headers)
        body = self.gzipped if use_gzip else self.body
        return web.Response(body=body, headers=self._dated(headers))

    def _not_modified(self, headers: dict[str, str]) -> web.Response:
        """A 304 for the copy whose 200 has ``headers``."""
        return web.Response(
            status=304,
            headers=self._dated({
                hdrs.ETAG: headers[hdrs.ETAG],
                hdrs.LAST_MODIFIED: headers[hdrs.LAST_MODIFIED],
                hdrs.CACHE_CONTROL: headers[hdrs.CACHE_CONTROL],
                hdrs.VARY: hdrs.ACCEPT_ENCODING,
            }),
        )

    def _dated(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers``, less ``Last-Modified`` while the file is not a second old.

        A change later in the same second has the same date (HTTP counts whole
        seconds): a client holding it would be told 304 for the changed file. The
        ETag still validates it.
        """
        if time.time() >= self.mtime + 1:
            return headers
        return {name: value for name, value in headers.items() if name != hdrs.LAST_MODIFIED}


class Replaced(OSError):
    """The file opened is not the one whose path was checked (see :func:`resolve_inside`)."""


def check_same_file(opened: os.stat_result, checked: os.stat_result) -> None:
    """Raise :class:`Replaced` unless ``opened`` is the file ``checked``.

    Between the check of a path and its open, the file may be replaced: renamed
    over (a refresh writing a feed), or swapped for a symlink leading out of the
    folder by someone who can write in it. Only the file checked is served.
    """
    if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        raise Replaced("the file was replaced after its path was checked")


def read_cached_file(path: str, max_age: int, checked: os.stat_result) -> CachedFile:
    """Read, hash and gzip the file ``checked``; the stat comes from the open file."""
    with open(path, "rb") as file:
        st = os.fstat(file.fileno())
        check_same_file(st, checked)
        body = file.read()
    gzipped: bytes | None = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
    if len(gzipped) >= len(body):
        gzipped = None
    etag = hashlib.blake2b(body, digest_size=8).hexdigest()
    common = {
        hdrs.CONTENT_TYPE: feed_content_type(os.path.basename(path)),
        hdrs.LAST_MODIFIED: formatdate(st.st_mtime, usegmt=True),
        hdrs.CACHE_CONTROL: f"public, max-age={max_age}",
        hdrs.VARY: hdrs.ACCEPT_ENCODING,
        "X-Content-Type-Options": "nosniff",
    }
    return CachedFile(
        signature=(st.st_ino, st.st_size, st.st_mtime_ns),
        body=body,
        gzipped=gzipped,
        etag=etag,
        gzip_etag=f"{etag}-gz",
        mtime=int(st.st_mtime),
        plain_headers={**common, hdrs.ETAG: f'"{etag}"'},
        gzip_headers={**common, hdrs.ETAG: f'"{etag}-gz"', hdrs.CONTENT_ENCODING: "gzip"},
    )


#: What finds a file inside a folder: its real path and stat, or None (resolve_inside).
Finder = Callable[[], "tuple[str, os.stat_result] | None"]


class CheckedFileResponse(web.FileResponse):
    """A :class:`~aiohttp.web.FileResponse` of a file whose path was checked.

    It sends the file checked. If another was put in its place since (see
    :func:`check_same_file`), the path is checked again, once, with ``find``: a
    refresh renames new feeds over old ones, but a symlink swapped in is a 404. It
    never sends a stray ``.gz``/``.br`` sibling instead, as aiohttp would to a
    client accepting gzip or brotli. Its errors are not cached.
    """

    def __init__(self, find: Finder, found: tuple[str, os.stat_result],
                 headers: dict[str, str]) -> None:
        super().__init__(found[0], headers=headers)
        self._find = find
        self._checked = found[1]

    # aiohttp (3.13, 3.14) calls this in a worker thread, to stat and open the file.
    def _make_response(self, request: web.BaseRequest, accept_encoding: str) -> Any:
        try:
            return self._checked_response(request)
        except Replaced:
            found = self._find()
            if found is None:
                raise FileNotFoundError(self._path) from None  # aiohttp answers 404
            self._path, self._checked = Path(found[0]), found[1]
            return self._checked_response(request)

    def _checked_response(self, request: web.BaseRequest) -> Any:
        # No encoding accepted: aiohttp looks for no compressed sibling.
        result = super()._make_response(request, "")
        opened, st = result[1], result[2]
        try:
            check_same_file(st, self._checked)
        except Replaced:
            if opened is not None:
                opened.close()
            raise
        return result

    async def _prepare_open_file(self, request: web.BaseRequest, fobj: Any,
                                 st: os.stat_result, file_encoding: str | None) -> Any:
        # aiohttp reads If-Range as a date alone. One holding an entity tag that is not
        # this file's (strongly: RFC 9110, 13.1.5) asks for the whole file, not a part
        # of another copy to splice with the part the client has.
        condition = request.headers.get(hdrs.IF_RANGE, "").strip()
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # as aiohttp tags the file
        if condition.startswith(('"', "W/")) and condition != etag:
            request = request.clone(headers=[
                (key, value) for key, value in request.headers.items() if key != hdrs.RANGE])
        return await super()._prepare_open_file(request, fobj, st, file_encoding)

    def set_status(self, status: int, reason: str | None = None) -> None:
        super().set_status(status, reason)
        if status >= 400:  # aiohttp keeps the headers given for the file's 200
            self.headers[hdrs.CACHE_CONTROL] = "no-store"
            self.headers.pop(hdrs.CONTENT_TYPE, None)


class FileCache:
    """Least recently used :class:`CachedFile` entries, bounded by their total bytes."""

    def __init__(self, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedFile] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._size

    def get(self, path: str, signature: tuple[int, int, int]) -> CachedFile | None:
        """The entry for ``path`` if it was read from the file that has ``signature``."""
        entry = self._entries.get(path)
        if entry is None:
            return None
        if entry.signature != signature:
            self._drop(path)
            return None
        self._entries.move_to_end(path)
        return entry

    def put(self, path: str, entry: CachedFile) -> None:
        """Keep ``entry``, evicting the least recently used ones to stay in bounds."""
        self._drop(path)
        if entry.size > self._max_bytes:
            return
        self._entries[path] = entry
        self._size += entry.size
        while self._size > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._size -= evicted.size

    def _drop(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is not None:
            self._size -= entry.size


class FeedFiles:
    """The feeds folder over HTTP: cached, validated, conditional and compressed."""

    def __init__(self, root: Path, max_age: int, cache: FileCache | None = None) -> None:
        #: The folder, resolved; every file served lies inside it.
        self.root = os.path.realpath(root)
        #: Seconds clients may reuse a file without asking: the refresh interval.
        self.max_age = max_age
        self.cache = cache if cache is not None else FileCache()

    async def respond(self, request: web.Request, tail: str) -> web.StreamResponse:
        """The file ``tail`` names; a directory (``all/``) gives its ``index.html``."""
        if not tail or tail.endswith("/"):
            tail += "index.html"
        # Twice at most: a refresh may rename a new copy over the file just checked.
        for _ in range(2):
            found = resolve_inside(self.root, tail)
            if found is None or not stat.S_ISREG(found[1].st_mode):
                return not_found()
            path, st = found
            if st.st_size > CACHE_MAX_FILE:
                return self._stream(tail, found)
            entry = self.cache.get(path, (st.st_ino, st.st_size, st.st_mtime_ns))
            if entry is not None:
                return entry.respond(request)
            try:
                if st.st_size > THREAD_READ_MIN:
                    entry = await asyncio.to_thread(read_cached_file, path, self.max_age, st)
                else:
                    entry = read_cached_file(path, self.max_age, st)
            except Replaced:
                continue
            except OSError:
                return not_found()
            self.cache.put(path, entry)
            return entry.respond(request)
        return not_found()

    def _stream(self, tail: str, found: tuple[str, os.stat_result]) -> web.FileResponse:
        """A file too large to cache, from disk; FileResponse handles 304 and Range."""
        return CheckedFileResponse(
            lambda: resolve_inside(self.root, tail),
            found,
            headers={
                hdrs.CONTENT_TYPE: feed_content_type(os.path.basename(found[0])),
                hdrs.CACHE_CONTROL: f"public, max-age={self.max_age}",
                hdrs.VARY: hdrs.ACCEPT_ENCODING,
                "X-Content-Type-Options": "nosniff",
            },
        )


class ImageFiles:
    """The flat image cache over HTTP, with long-lived and locked-down headers."""

    def __init__(self, root: Path) -> None:
        #: The folder, resolved; every image served lies inside it.
        self.root = os.path.realpath(root)

    async def respond(self, request: web.Request, name: str) -> web.StreamResponse:
        """The image ``name``; dot-files (downloads in progress) are never served."""
        if "/" in name:  # a decoded %2F
            return not_found()
        found = resolve_inside(self.root, name)
        if found is None or not stat.S_ISREG(found[1].st_mode):
            return not_found()
        return CheckedFileResponse(
            lambda: resolve_inside(self.root, name),
            found,
            headers={
                hdrs.CONTENT_TYPE: image_content_type(name),
                hdrs.CACHE_CONTROL: IMAGE_CACHE_CONTROL,
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'",
            },
        )
