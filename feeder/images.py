"""Images: fetch those articles show into the cache (:mod:`feeder.imagehtml` finds them).

Only URLs found in sources are fetched, and only from allowed hosts; every redirect
hop is checked again, the body must be a raster image by its magic bytes, the size
cap holds while streaming, and addresses that are not public are refused after DNS
resolution unless the host is a configured mirror. A download is written to a
dot-prefixed temp file and renamed only once complete, so a partial image never
appears under its final name.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, urljoin, urlsplit

import aiofiles
import aiofiles.os
import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import ContentLengthError
from aiohttp.resolver import DefaultResolver

from feeder import __version__
from feeder.config import ImagesConfig
from feeder.exceptions import ImageError, one_line, type_and_message
from feeder.imagehtml import allowed_hosts, is_absolute_http, is_allowed, is_allowed_by, url_host
from feeder.output import folder_names, temp_path, write_atomically

log = logging.getLogger(__name__)

#: Redirect hops followed per attempt.
MAX_REDIRECTS: Final = 3
#: Longest ``Retry-After`` waited for within one call; a longer one ends the attempts.
MAX_RETRY_WAIT: Final = 5.0
#: Longest back-off between two refreshes.
MAX_RETRY_DELAY: Final = timedelta(days=1)
#: Back-off after the first failure, doubled after each further one.
FIRST_RETRY_DELAY: Final = timedelta(minutes=1)
#: Bytes read before the magic bytes are checked.
SNIFF_BYTES: Final = 16
#: Bytes read from the network at a time.
CHUNK_BYTES: Final = 16 * 1024
#: An image up to this size is held in memory and written in one go; a larger one is
#: streamed to disk. 64 downloads at once, and 64 more waiting for the disk, hold at
#: most 32 MB.
BUFFER_BYTES: Final = 256 * 1024
#: Downloads started per turn of the event loop: 40,000 at once would hold it for 0.3 s.
_TASK_BATCH: Final = 256

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class CachedImage:
    #: Original URL as found in the source.
    url: str
    #: File name in the cache folder: URL hash plus the extension of the real format.
    name: str
    #: Bytes on disk.
    size: int
    #: MIME type from the magic bytes, not from the server's header.
    mime: str
    #: Found in the cache already (the state database was rebuilt), not downloaded.
    adopted: bool = False


@dataclass(frozen=True)
class FailedImage:
    #: Original URL as found in the source.
    url: str
    #: Why it failed, in one line: ``HTTP 404``, ``timed out``...
    error: str
    #: True when retrying within this refresh is pointless (404, not an image, too large...).
    permanent: bool
    #: Seconds the server asked us to wait (``Retry-After``), if it said.
    retry_after: float | None


#: What :func:`fetch_images` gives for each URL that finished.
ImageResult = CachedImage | FailedImage


@dataclass(frozen=True)
class _Downloaded:
    """An image checked and downloaded, streamed to the cache already or still to write."""

    image: CachedImage
    #: The body, when it is held in memory; empty once the file is in the cache.
    chunks: tuple[bytes, ...] = ()


# -- URLs and decisions -------------------------------------------------------------------


def split_refused(urls: Iterable[str], config: ImagesConfig) -> tuple[list[FailedImage], list[str]]:
    """The URLs never to be fetched, as permanent failures, and the others, in order."""
    refused, wanted = [], []
    hosts = allowed_hosts(config)
    for url in urls:
        if is_allowed_by(url, hosts):
            wanted.append(url)
        elif is_absolute_http(url):
            refused.append(FailedImage(url, f"host {url_host(url)} is not allowed", True, None))
        else:
            refused.append(FailedImage(url, "not an absolute http(s) URL", True, None))
    return refused, wanted


def mirror_url(url: str, config: ImagesConfig) -> str:
    """``url`` with its origin replaced by the configured mirror base URL, if one matches."""
    try:
        parts = urlsplit(url)
        origin = _origin(parts)
    except ValueError:
        return url
    for source, mirror in config.origins.items():
        try:
            prefix = urlsplit(source)
            matches = _origin(prefix) == origin
        except ValueError:
            continue
        base_path = prefix.path.rstrip("/")
        if matches and (parts.path == base_path or parts.path.startswith(base_path + "/")):
            rest = parts.path[len(base_path) :]
            query = f"?{parts.query}" if parts.query else ""
            return mirror.rstrip("/") + rest + query
    return url


def sniff_image(head: bytes) -> tuple[str, str] | None:
    """(MIME type, extension) of a raster image from its first bytes; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", ".jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", ".gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp", ".webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "image/avif", ".avif"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"heim", b"heis"):
        return "image/heic", ".heic"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "image/jxl", ".jxl"
    if head.startswith(b"BM") and len(head) >= 14 and head[6:10] == b"\x00\x00\x00\x00":
        return "image/bmp", ".bmp"
    if head.startswith(b"\x00\x00\x01\x00") and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "image/x-icon", ".ico"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff", ".tif"
    return None


def cache_name(url: str, extension: str) -> str:
    """File name of ``url`` in the cache: a hash of the URL plus the real extension."""
    return cache_key(url) + extension


def cache_key(url: str) -> str:
    """The part of a cached file's name that comes from its URL: the name up to its ``.``."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def find_cached(urls: list[str], cache_dir: Path) -> tuple[list[CachedImage], list[str]]:
    """Those of ``urls`` whose image is in the cache already, and the others, in order.

    The state database says which images are cached; this is for when it does not
    know (deleted, rebuilt): a file of the URL's name whose magic bytes say image.
    """
    names = {name.partition(".")[0]: name for name in folder_names(cache_dir)
             if not name.startswith(".")}
    found: list[CachedImage] = []
    missing: list[str] = []
    for url in urls:
        name = names.get(cache_key(url))
        image = _cached_file(url, cache_dir / name) if name else None
        if image is None:
            missing.append(url)
        else:
            found.append(image)
    return found, missing


def _cached_file(url: str, path: Path) -> CachedImage | None:
    try:
        with open(path, "rb") as f:
            kind = sniff_image(f.read(SNIFF_BYTES))
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if kind is None or cache_name(url, kind[1]) != path.name:
        return None
    return CachedImage(url=url, name=path.name, size=size, mime=kind[0], adopted=True)


def retry_delay(failures: int, retry_after: float | None = None) -> timedelta:
    """How long after ``failures`` consecutive failures a later refresh should try again.

    One minute, doubled per further failure, at least ``retry_after``, at most one day.
    """
    if failures < 1:
        delay = timedelta(0)
    elif failures > 32:  # 2**31 minutes is far beyond the cap already
        delay = MAX_RETRY_DELAY
    else:
        delay = FIRST_RETRY_DELAY * 2 ** (failures - 1)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, timedelta(seconds=min(retry_after, MAX_RETRY_DELAY.total_seconds())))
    return min(delay, MAX_RETRY_DELAY)


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in; ValueError on a bad port."""
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").rstrip("."), port


def _mirror_hosts(config: ImagesConfig) -> frozenset[str]:
    hosts = (url_host(mirror) for mirror in config.origins.values())
    return frozenset(host for host in hosts if host)


def _is_public(address: str) -> bool:
    """False for loopback, private, link-local, unspecified, multicast, reserved... addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:  # deprecated, and not global; Python counts it as global
            return False
        # An IPv4 address inside an IPv6 one, mapped or 6to4. (Teredo's 2001::/32 is
        # no global address at all.)
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return _is_public(str(embedded))
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
        or ip.is_private or ip.is_unspecified
    )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a ``Retry-After`` header, in its seconds or HTTP-date form."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# -- fetching -----------------------------------------------------------------------------


class _NonPublicAddressError(OSError):
    """A host resolved to an address feeder must not connect to."""


class _PublicOnlyResolver(AbstractResolver):
    """The default resolver, refusing hosts that resolve to non-public addresses.

    Mirror hosts are exempt: they are named in the config, typically a local server.
    """

    def __init__(self, exempt: frozenset[str]) -> None:
        self._resolver = DefaultResolver()
        self._exempt = exempt

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        if host.lower().rstrip(".") not in self._exempt:
            for result in results:
                if not _is_public(result["host"]):
                    raise _NonPublicAddressError(
                        None, f"{host} resolves to non-public address {result['host']}"
                    )
        return results

    async def close(self) -> None:
        await self._resolver.close()


#: An image to write: where, its bytes, and the future its download waits on.
_QueuedWrite = tuple[Path, tuple[bytes, ...], asyncio.Future[None]]


class _CacheWriter:
    """Writes images held in memory to the cache, a batch at a time, in one thread.

    A hand-off to a thread for each image cost a third of the download rate; a batch
    of whatever arrived meanwhile costs one hand-off. One batch is written at a
    time, by one thread, so two writes of a name never race (see
    :func:`~feeder.output.write_atomically`).
    """

    def __init__(self, capacity: int) -> None:
        #: Images waiting for (or being) written: it bounds the memory they hold.
        self._room = asyncio.Semaphore(capacity)
        self._queue: list[_QueuedWrite] = []
        self._draining: asyncio.Task[None] | None = None

    async def reserve(self) -> None:
        """Wait for room for one more image; a :meth:`write` must follow."""
        await self._room.acquire()

    async def write(self, target: Path, chunks: tuple[bytes, ...]) -> None:
        """Write ``chunks`` to ``target`` atomically; an OSError if it could not be."""
        try:
            future = asyncio.get_running_loop().create_future()
            self._queue.append((target, chunks, future))
            if self._draining is None:
                self._draining = asyncio.create_task(self._drain())
            await future
        finally:
            self._room.release()

    async def close(self) -> None:
        """Wait for the batch being written, if any: no write goes on after this."""
        if self._draining is not None:
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        batch: list[_QueuedWrite] = []
        try:
            while self._queue:
                # Writes whose download was cancelled meanwhile are dropped.
                batch = [item for item in self._queue if not item[2].done()]
                self._queue = []
                errors = await asyncio.to_thread(_write_batch, [item[:2] for item in batch])
                for (_target, _chunks, future), error in zip(batch, errors, strict=True):
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        except asyncio.CancelledError:  # its loop is closing
            self._fail_waiting(batch, None)
            raise
        except Exception as e:  # no thread to write in (the interpreter is ending)
            self._fail_waiting(batch, e)
        finally:
            self._draining = None

    def _fail_waiting(self, batch: list[_QueuedWrite], error: Exception | None) -> None:
        """Let every write still waiting know it failed (None: was cancelled)."""
        for _target, _chunks, future in batch + self._queue:
            if future.done():
                continue
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)
        self._queue = []


def _write_batch(batch: list[tuple[Path, tuple[bytes, ...]]]) -> list[Exception | None]:
    """Write each ``(target, chunks)``; the error of each, or None."""
    errors: list[Exception | None] = []
    for target, chunks in batch:
        try:
            write_atomically(target, chunks)
        except Exception as e:  # an OSError, or a bug: raised where the write was awaited
            errors.append(e)
        else:
            errors.append(None)
    return errors


@dataclass
class _Limits:
    """Semaphores taken around each attempt (so a queued download's timeout has not
    started), and the writer of the images held in memory."""

    #: Downloads in flight overall.
    overall: asyncio.Semaphore
    #: Downloads in flight per requested ``host:port``.
    per_host: dict[str, asyncio.Semaphore]
    #: Size of each per-host semaphore.
    per_host_size: int
    writer: _CacheWriter
    #: Per requested ``host:port``: when it may be asked again (loop time), as its
    #: ``Retry-After`` said. It asked for the host, not one image.
    resume: dict[str, float] = field(default_factory=dict)

    def host(self, host: str) -> asyncio.Semaphore:
        if host not in self.per_host:
            self.per_host[host] = asyncio.Semaphore(self.per_host_size)
        return self.per_host[host]

    def pause(self, host: str, seconds: float) -> None:
        """Ask ``host`` nothing for ``seconds`` (its ``Retry-After``)."""
        until = asyncio.get_running_loop().time() + seconds
        self.resume[host] = max(self.resume.get(host, until), until)

    async def wait_for(self, host: str) -> None:
        """Wait until ``host`` may be asked again, each waiter a random bit more, so
        they do not all come back at once.

        Raises:
            _HostPaused: the wait is longer than :data:`MAX_RETRY_WAIT`.
        """
        loop = asyncio.get_running_loop()
        while (wait := self.resume.get(host, 0.0) - loop.time()) > 0:
            if wait > MAX_RETRY_WAIT:
                raise _HostPaused(host)
            await asyncio.sleep(wait + random.uniform(0, min(1.0, wait / 4)))


class _HostPaused(Exception):
    """A host asked for a longer pause than a refresh waits: its images not asked for
    yet are left pending, as if cut short by the deadline (no failure of theirs)."""


async def fetch_images(
    urls: Iterable[str],
    config: ImagesConfig,
    cache_dir: Path,
    *,
    deadline: float | None = None,
    stop: asyncio.Event | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
) -> list[ImageResult]:
    """Download each URL (once, however often given) into ``cache_dir``.

    Returns one result per URL that finished within ``deadline`` seconds (default
    ``config.deadline``), or before ``stop`` was set, in the order given; downloads
    still running then are cancelled, their temp files removed, and their URLs left
    out: they are pending, unless an attempt failed already, which is then their
    result (else an origin that never answers would hold every refresh for its
    deadline, and never show as failing). ``on_result`` is called as each URL
    finishes. Failures are results, not errors.
    """
    unique = list(dict.fromkeys(urls))
    deadline = config.deadline if deadline is None else deadline
    await aiofiles.os.makedirs(cache_dir, exist_ok=True)
    finished: dict[str, ImageResult] = {}
    failed_attempts: dict[str, FailedImage] = {}  # the last of each URL

    def report(result: ImageResult) -> ImageResult:
        finished[result.url] = result
        if on_result is not None:
            on_result(result)
        return result

    # Off the event loop: checking 40,000 URLs (a cold start) takes tens of ms.
    refused, wanted = await asyncio.to_thread(split_refused, unique, config)
    for failure in refused:
        report(failure)
    # A state database rebuilt finds images cached already, which the origin may have lost.
    found, wanted = await asyncio.to_thread(find_cached, wanted, cache_dir)
    for image in found:
        report(image)
    if wanted:
        writer = _CacheWriter(config.concurrency)
        limits = _Limits(asyncio.Semaphore(config.concurrency), {}, config.per_host, writer)
        resolver = _PublicOnlyResolver(_mirror_hosts(config))
        try:
            async with _open_session(config, resolver) as session:

                unexpected: list[str] = []  # URLs a bug in feeder failed

                async def fetch_and_report(url: str) -> None:
                    try:
                        result = await _fetch_image(session, limits, url, config, cache_dir,
                                                    failed_attempts)
                    except Exception as e:  # a bug: that image fails, not all of them
                        if not unexpected:  # one traceback, not one per image
                            log.exception("%s: unexpected error while fetching", url)
                        unexpected.append(url)
                        reason = one_line(f"unexpected error: {type_and_message(e)}")
                        result = FailedImage(url, reason, permanent=False, retry_after=None)
                    if result is not None:  # None: left pending
                        report(result)

                tasks: list[asyncio.Task[None]] = []
                try:
                    async with asyncio.timeout(deadline):
                        for start in range(0, len(wanted), _TASK_BATCH):
                            if stop is not None and stop.is_set():
                                break
                            tasks += [asyncio.create_task(fetch_and_report(url))
                                      for url in wanted[start : start + _TASK_BATCH]]
                            await asyncio.sleep(0)  # their first steps, then other work
                        await _all_done(tasks, stop)
                except TimeoutError:
                    pass  # what is still running is cancelled below, and left pending
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                for task in tasks:
                    if not task.cancelled():
                        task.result()  # a bug in reporting (on_result) is raised, not hidden
                if len(unexpected) > 1:
                    log.error("%d more images failed with an unexpected error",
                              len(unexpected) - 1)
        finally:
            try:
                await writer.close()
            finally:
                await resolver.close()
        for url, failure in failed_attempts.items():
            if url not in finished:  # cut short in its backoff or its next attempt
                report(failure)
    return [finished[url] for url in unique if url in finished]


async def _all_done(tasks: list[asyncio.Task[None]], stop: asyncio.Event | None) -> None:
    """Wait until every task is done, or ``stop`` is set (the tasks go on running)."""
    if not tasks:
        return
    waits = [asyncio.ensure_future(asyncio.wait(tasks))]
    if stop is not None:
        waits.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _open_session(config: ImagesConfig, resolver: AbstractResolver) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.concurrency, limit_per_host=config.per_host, resolver=resolver
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=CHUNK_BYTES,  # per connection: memory does not grow with image size
        headers={"User-Agent": f"feeder/{__version__}", "Accept": "image/*"},
        timeout=aiohttp.ClientTimeout(
            total=config.timeout, sock_connect=min(10.0, config.timeout)
        ),
    )


async def _fetch_image(
    session: aiohttp.ClientSession,
    limits: _Limits,
    url: str,
    config: ImagesConfig,
    cache_dir: Path,
    failed_attempts: dict[str, FailedImage],
) -> ImageResult | None:
    """One URL, with up to ``config.attempts`` attempts on errors worth retrying;
    None if its host asked for a pause longer than a refresh waits (it is pending).

    Each failed attempt is noted in ``failed_attempts``, in case no other follows.
    """
    target = mirror_url(url, config)
    # The host actually requested (the mirror's, if any), by port as aiohttp counts hosts.
    host = urlsplit(target).netloc.lower()
    for attempt in range(config.attempts):
        try:
            return await _fetch_once(session, limits, host, url, target, config, cache_dir)
        except ImageError as e:
            failure = FailedImage(url, e.reason, e.permanent, e.retry_after)
        except _HostPaused:
            return None
        failed_attempts[url] = failure
        log.debug("%s: attempt %d: %s", url, attempt + 1, failure.error)
        if failure.retry_after is not None:  # every download from the host waits for it
            limits.pause(host, failure.retry_after)
        if failure.permanent or attempt + 1 == config.attempts:
            return failure
        if failure.retry_after is not None and failure.retry_after > MAX_RETRY_WAIT:
            return failure  # the next refresh retries, once the server is ready
        await asyncio.sleep(0.2 * 2**attempt + random.uniform(0, 0.2))
    raise AssertionError("config.attempts must be at least 1")


async def _fetch_once(
    session: aiohttp.ClientSession, limits: _Limits, host: str, url: str, target: str,
    config: ImagesConfig, cache_dir: Path,
) -> CachedImage:
    """One attempt at ``url``; an image held in memory is written once its connection is free.

    A connection kept waiting for the disk would fetch nothing meanwhile: on a busy
    machine, writing each image before the next download halves the rate. (That
    write is not under ``config.timeout``: a thread's write cannot be interrupted.)
    """
    async with limits.host(host):
        await limits.wait_for(host)  # in the host's turn: nothing else asks it meanwhile
        async with limits.overall:
            downloaded = await _attempt(session, url, target, config, cache_dir)
            if not downloaded.chunks:  # streamed to the cache already
                return downloaded.image
            await limits.writer.reserve()  # a slow disk slows the downloads, not the memory
    try:
        await limits.writer.write(cache_dir / downloaded.image.name, downloaded.chunks)
    except OSError as e:
        raise _write_error(url, e) from e
    return downloaded.image


async def _attempt(
    session: aiohttp.ClientSession, url: str, target: str, config: ImagesConfig,
    cache_dir: Path,
) -> _Downloaded:
    """One attempt at ``url`` (requested as ``target``, its mirror URL), redirects included.

    Every failure is raised as an :class:`ImageError`.
    """
    try:
        async with asyncio.timeout(config.timeout):  # aiohttp's is per request: per hop
            return await _download(session, url, target, config, cache_dir)
    except ImageError:
        raise
    except TimeoutError as e:  # aiohttp's timeouts are TimeoutErrors too
        raise ImageError(url, "timed out") from e
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, _NonPublicAddressError):
            reason = e.os_error.strerror or "non-public address"
            raise ImageError(url, reason, permanent=True) from e
        dns = isinstance(e, aiohttp.ClientConnectorDNSError)
        what = "cannot resolve" if dns else "cannot connect to"
        reason = e.os_error.strerror or str(e.os_error) or type(e.os_error).__name__
        raise ImageError(url, f"{what} {e.host}:{e.port}: {reason}") from e
    except aiohttp.ClientPayloadError as e:
        if isinstance(e.__cause__, ContentLengthError):
            raise ImageError(url, "body shorter than Content-Length") from e
        raise ImageError(url, f"broken body: {e}") from e
    except aiohttp.ServerDisconnectedError as e:
        raise ImageError(url, "server disconnected") from e
    except aiohttp.InvalidURL as e:
        raise ImageError(url, f"invalid URL {e.url}", permanent=True) from e
    except aiohttp.ClientError as e:
        raise ImageError(url, type_and_message(e)) from e
    except OSError as e:  # after the aiohttp errors, many of which are OSErrors
        raise _write_error(url, e) from e


async def _download(
    session: aiohttp.ClientSession, url: str, target: str, config: ImagesConfig,
    cache_dir: Path,
) -> _Downloaded:
    """Request ``target``, following redirects by hand, and stream it to the cache."""
    for _hop in range(MAX_REDIRECTS + 1):
        host = url_host(target) or ""
        if _is_ip_literal(host) and host not in _mirror_hosts(config) and not _is_public(host):
            # aiohttp does not ask the resolver about a literal address
            raise ImageError(url, f"{host} is a non-public address", permanent=True)
        async with session.get(target, allow_redirects=False) as response:
            if response.status in _REDIRECTS:
                target = _redirect_target(url, target, response, config)
                continue
            if response.status != 200:
                raise _status_error(url, response)
            return await _save(url, response, config.max_bytes, cache_dir)
    raise ImageError(url, f"too many redirects (more than {MAX_REDIRECTS})", permanent=True)


def _redirect_target(
    url: str, current: str, response: aiohttp.ClientResponse, config: ImagesConfig
) -> str:
    """The next URL to request, if the ``Location`` may be followed."""
    location = response.headers.get("Location")
    if not location:
        raise ImageError(url, f"HTTP {response.status} without Location", permanent=True)
    try:
        target = urljoin(current, location.strip())  # "http://[::1" is a ValueError
        # A mirror need not know the origin's name, so it may redirect to itself.
        same_mirror = url_host(current) in _mirror_hosts(config) and _origin(
            urlsplit(target)
        ) == _origin(urlsplit(current))
    except ValueError:
        raise ImageError(url, f"redirect to invalid URL {location!r}", permanent=True) from None
    if same_mirror:
        return target
    if is_allowed(target, config):
        return mirror_url(target, config)
    raise ImageError(
        url, f"redirect to disallowed host {url_host(target) or location}", permanent=True
    )


def _status_error(url: str, response: aiohttp.ClientResponse) -> ImageError:
    status = response.status
    if status == 429 or status >= 500:
        retry_after = None
        if status in (429, 503):
            retry_after = _parse_retry_after(
                response.headers.get("Retry-After"), datetime.now(UTC)
            )
        return ImageError(url, f"HTTP {status}", retry_after=retry_after)
    return ImageError(url, f"HTTP {status}", permanent=True)


async def _save(
    url: str, response: aiohttp.ClientResponse, max_bytes: int, cache_dir: Path
) -> _Downloaded:
    """Check the body's magic bytes and size as it streams in.

    A body up to ``BUFFER_BYTES`` (most images) is held in memory, for the caller
    to write in one go; a larger one is streamed to a ``.part`` file, renamed once
    complete.
    """
    length = response.content_length
    if length is not None and length > max_bytes:
        raise _too_large(url, max_bytes)
    # Most images are read in one go; not an encoded body, whose Content-Length counts
    # the bytes before aiohttp decodes them: 250 KB of gzip may make 250 MB.
    if length is not None and length <= BUFFER_BYTES and not _is_encoded(response):
        body = await response.read()
        mime, extension = _image_kind(url, response, body[:SNIFF_BYTES])
        image = CachedImage(url=url, name=cache_name(url, extension), size=len(body), mime=mime)
        return _Downloaded(image, (body,))
    head = b""
    while len(head) < SNIFF_BYTES:
        chunk = await response.content.read(SNIFF_BYTES - len(head))
        if not chunk:
            break
        head += chunk
    mime, extension = _image_kind(url, response, head)
    name = cache_name(url, extension)
    chunks, size = [head], len(head)
    body = response.content.iter_chunked(CHUNK_BYTES)
    async for chunk in body:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(url, max_bytes)
        chunks.append(chunk)
        if size > BUFFER_BYTES:
            size = await _stream_to_cache(url, body, chunks, size, max_bytes, cache_dir / name)
            return _Downloaded(CachedImage(url=url, name=name, size=size, mime=mime))
    return _Downloaded(CachedImage(url=url, name=name, size=size, mime=mime), tuple(chunks))


async def _stream_to_cache(url: str, body: AsyncIterator[bytes], chunks: list[bytes],
                           size: int, max_bytes: int, target: Path) -> int:
    """Write ``chunks``, then the rest of ``body``, to a ``.part`` file; rename it. Its size."""
    part = temp_path(target, ".part")
    try:
        async with aiofiles.open(part, "wb") as file:
            await file.write(b"".join(chunks))
            chunks.clear()
            async for chunk in body:
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(url, max_bytes)
                await file.write(chunk)
        await aiofiles.os.replace(part, target)
    except BaseException:
        # Synchronous on purpose: an await here could be cancelled and leave the file.
        part.unlink(missing_ok=True)
        raise
    return size


def _is_encoded(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() != "identity"


def _write_error(url: str, error: OSError) -> ImageError:
    return ImageError(url, f"cannot write to the cache: {error.strerror or error}")


def _too_large(url: str, max_bytes: int) -> ImageError:
    return ImageError(url, f"larger than {max_bytes} bytes", permanent=True)


def _image_kind(url: str, response: aiohttp.ClientResponse, head: bytes) -> tuple[str, str]:
    """The MIME type and extension of an image starting with ``head``; an error if none."""
    kind = sniff_image(head)
    if kind is None:
        raise ImageError(url, _not_an_image(response, head), permanent=True)
    return kind


def _not_an_image(response: aiohttp.ClientResponse, head: bytes) -> str:
    if not head:
        return "not an image (empty body)"
    start = head.lstrip().lower()
    if response.content_type == "image/svg+xml" or start.startswith((b"<svg", b"<?xml")):
        return "SVG refused (only raster images are cached)"
    return f"not an image ({response.content_type} body)"
