"""One refresh: scan → parse what changed → fetch missing images → rebuild changed feeds.

:class:`Refresher` is the core every trigger (CLI, timer, file watch, HTTP) calls.
Blocking work (file reads, parsing, SQLite, feed building) runs in a worker thread
so that a daemon's event loop keeps answering while a refresh runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import logging.handlers
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from feeder import __version__
from feeder.config import Config
from feeder.exceptions import (
    FeederError,
    LockedError,
    RefreshAbandoned,
    SourceError,
    failure_reason,
    printable_path,
)
from feeder.feeds import (
    ARTICLES_FOLDER,
    CATEGORIES_FOLDER,
    FEED_FILES,
    OUTPUT_VERSION,
    FeedInfo,
    article_page_path,
    build_article_page,
    build_feed,
    build_index,
    build_opml,
    category_folder,
    category_slugs,
    feed_infos,
    published_slugs,
)
from feeder.images import (
    CachedImage,
    ImageResult,
    cache_key,
    fetch_images,
    retry_delay,
)
from feeder.output import TEMP_SUFFIXES, OutputFolder, folder_names, remove_temp_files
from feeder.sources import (
    MISNAMED,
    PARSER_VERSION,
    SourceJob,
    SourceParser,
    SourceRead,
    article_id,
    read_and_parse_all,
    scan_sources,
    start_worker,
)
from feeder.store import Store
from feeder.types import CachedImageInfo, SourceFile, SourceStats

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Sources parsed per commit.
_PARSE_BATCH = 500
#: Fewer changed sources than this are parsed in the refresh's own thread: starting
#: worker processes costs about what parsing 1,000 sources does.
_POOL_MIN_SOURCES = 2000
#: Worker processes parsing at most (and no more than the CPUs this process may use):
#: the refresh thread stores what 2 or 3 parse, and each holds about 35 MB.
_MAX_PARSE_WORKERS = 2
#: Sources in one task sent to a worker process.
_POOL_BATCH = 100
#: Seconds a refresh whose workers ended waits for its own stop before it goes on alone.
_STOP_GRACE = 0.5
#: Meta key of what an unfinished refresh left to rebuild.
_PENDING = "pending_build"
#: Meta key set while a refresh runs: still set at the start of the next one, if killed.
_RUNNING = "refresh_running"
#: Meta key of when the last refresh failed and why, until one succeeds.
_FAILED = "last_failure"
#: Meta key of what, besides articles and images, the feeds were last built from.
_FINGERPRINT = "fingerprint"
#: Meta key of the settings the stored articles were parsed with.
_PARSE_SETTINGS = "parse_settings"
#: Meta key of the cache folder's identity and mtime when the last refresh ended.
_CACHE_STATE = "cache_state"
#: When the cache folder was last listed (ISO 8601): images cached since are checked whole.
_CACHE_CHECKED = "cache_checked"
#: Meta key of the device sources/ was on at the last refresh.
_SOURCES_DEVICE = "sources_device"
#: Meta key of the pages folder's identity and mtime when every page was last there.
_PAGES_STATE = "pages_state"
#: Meta key prefix (then a feed's folder) of the paths its last build showed, newest first.
_SHOWN = "shown:"
#: Meta key of each category's slug when feeds were last written.
_SLUGS = "slugs"
#: The content hash stored for a file refused for its name (it is never read).
_MISNAMED_HASH = f"error:{MISNAMED}"
#: The mtime stored for a file that could not be read: no scan matches it.
_UNREAD = -1
#: Files at the top of ``feeds/`` that list every feed.
_INDEX_FILES = ("index.opml", "index.html")


class Progress(Protocol):
    """Receives progress of long stages (a terminal bar, or nothing)."""

    def start(self, stage: str, total: int) -> None: ...

    def advance(self, stage: str, amount: int = 1) -> None: ...


class NoProgress:
    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, amount: int = 1) -> None:
        pass


@dataclass(frozen=True)
class RefreshSummary:
    """The figures of one refresh."""

    #: Source files found.
    scanned: int = 0
    #: Sources new, edited or removed since the last refresh.
    changed: int = 0
    #: Sources refused (not published), in all.
    failed: int = 0
    #: Articles published.
    articles: int = 0
    #: Feed, page and index files written (unchanged ones are not).
    written: int = 0
    #: Images fetched into the cache.
    images_fetched: int = 0
    #: Images that failed this time.
    images_failed: int = 0
    #: Images referenced but not cached yet.
    images_pending: int = 0
    #: Seconds the refresh took.
    seconds: float = 0.0
    #: Refused sources of this refresh, as ``path: reason``.
    errors: tuple[str, ...] = field(default=(), repr=False)

    def line(self) -> str:
        return (
            f"{self.scanned} files scanned, {self.changed} changed, {self.failed} failed, "
            f"{self.articles} articles, {self.written} files written; images: "
            f"{self.images_fetched} fetched, {self.images_failed} failed, "
            f"{self.images_pending} pending ({self.seconds:.2f}s)"
        )

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["errors"] = list(self.errors)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RefreshSummary:
        """The inverse of :meth:`to_dict`; keys it does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["errors"] = tuple(values.get("errors", ()))
        return cls(**values)


@dataclass
class _Changes:
    """What a refresh found changed, and so what it must rebuild."""

    categories: set[str] = field(default_factory=set)
    pages: set[str] = field(default_factory=set)
    removed_pages: set[str] = field(default_factory=set)
    count: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.categories or self.pages or self.removed_pages or self.count)

    def to_json(self) -> str:
        sets = {"categories": self.categories, "pages": self.pages,
                "removed_pages": self.removed_pages}
        return json.dumps({k: sorted(v) for k, v in sets.items()}, ensure_ascii=False)

    def merge_json(self, text: str | None) -> None:
        """Add what an earlier, unfinished refresh left to rebuild."""
        if text:
            data = json.loads(text)
            self.categories |= set(data["categories"])
            self.pages |= set(data["pages"])
            self.removed_pages |= set(data["removed_pages"])


@dataclass(frozen=True)
class _SourceScan:
    """The sources folder, against what the store knows of it."""

    #: ``(size, mtime_ns)`` of each source file found, and of each the store knows.
    found: SourceStats
    known: Mapping[str, tuple[int, int]]
    #: Files whose name is not UTF-8 (escaped), and those the store records as refused.
    misnamed: list[str]
    refused_misnamed: set[str]
    #: Files found whose stat is not the known one (new ones too), and files gone.
    changed: list[str]
    removed: set[str]

    @classmethod
    def of(cls, root: Path, store: Store) -> _SourceScan:
        misnamed: list[str] = []
        found = scan_sources(root, misnamed)
        known = store.source_stats()
        # A misnamed file's row is kept while it is there (not a real file's of that name).
        refused = {p for p in misnamed if store.source_hash(p) == _MISNAMED_HASH}
        return cls(found, known, misnamed, refused,
                   [path for path, stat in found.items() if known.get(path) != stat],
                   known.keys() - found.keys() - refused)


class Refresher:
    """Runs refreshes against one store and one output folder."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.parser = SourceParser(config)
        self.output = OutputFolder(config.paths.feeds)
        self._abandon = threading.Event()
        #: Downloads of the running refresh stop when this is set, and its loop.
        self._stop_images: tuple[asyncio.Event, asyncio.AbstractEventLoop] | None = None

    def abandon(self) -> None:
        """Ask the running refresh to stop at the next file or now, if downloading.

        (Worker processes parsing a cold start first finish the few batches of files
        they have begun, a fraction of a second.)

        Thread-safe. Sources parsed and images downloaded so far are kept (the rest
        wait for the next refresh); feeds already written stay valid, as every write
        is atomic.
        """
        self._abandon.set()
        stop_images = self._stop_images
        if stop_images is not None:
            event, loop = stop_images
            with contextlib.suppress(RuntimeError):  # the loop closed since: nothing to stop
                loop.call_soon_threadsafe(event.set)

    def _check_abandoned(self) -> None:
        if self._abandon.is_set():
            raise RefreshAbandoned("refresh abandoned")

    async def refresh(self, progress: Progress | None = None,
                      now: datetime | None = None) -> RefreshSummary:
        """One full refresh. Callers make sure only one runs at a time (see :func:`lock`).

        ``now`` decides which failed images are due for another attempt. A refresh
        that fails is raised, and remembered until one succeeds (:func:`last_failure`).
        """
        progress = progress or NoProgress()
        self._abandon.clear()
        started = time.perf_counter()
        now = now or datetime.now(UTC)
        try:
            # Each stage is one trip to a worker thread: a no-op refresh is a few ms in all.
            scanned, changes, due = await self._in_thread(self._update_sources, progress, now)
            fetched, failed = await self._update_images(due, changes, now, progress)
            return await self._in_thread(
                self._finish, scanned, changes, fetched, failed, progress, started, now
            )
        except RefreshAbandoned:
            raise
        except Exception as e:
            await self._in_thread(self._note_failure, e)
            raise

    def _note_failure(self, error: Exception) -> None:
        """Remember why this refresh failed, for ``feeder status``, until one succeeds."""
        failure = {"finished": datetime.now(UTC).isoformat(),
                   "error": failure_reason(error, self.config)}
        try:
            with self.store.transaction():
                self.store.set_meta(_FAILED, json.dumps(failure, ensure_ascii=False))
        except Exception:  # the store may be what failed: the error is raised all the same
            log.debug("cannot record the failed refresh", exc_info=True)

    async def _in_thread(self, stage: Callable[..., _T], *args: Any) -> _T:
        """Run a stage in a worker thread, to keep the event loop free.

        Cancelled (SIGTERM, Ctrl-C), the refresh is abandoned and the thread waited
        for, as it stops at its next file: the store must not be closed under it.
        """
        work = asyncio.ensure_future(asyncio.to_thread(stage, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self.abandon()
            try:
                await work
            except RefreshAbandoned:
                pass
            except Exception:
                log.exception("the cancelled refresh failed before it stopped")
            raise

    def _finish(self, scanned: int, changes: _Changes, fetched: int, failed: int,
                progress: Progress, started: float, now: datetime) -> RefreshSummary:
        """Write what changed, then sum up the refresh and log it."""
        written = self._write_outputs(changes, progress)
        counts = self._tally(changes.any or fetched > 0 or failed > 0)
        summary = RefreshSummary(
            scanned=scanned,
            changed=changes.count,
            failed=counts.failed,
            articles=counts.articles,
            written=written,
            images_fetched=fetched,
            images_failed=failed,
            images_pending=counts.images_pending,
            seconds=round(time.perf_counter() - started, 3),
            errors=tuple(changes.errors),
        )
        with self.store.transaction():
            self.store.log_refresh(now, datetime.now(UTC), summary.to_dict())
            self.store.delete_meta(_RUNNING)
            self.store.delete_meta(_FAILED)
        return summary

    def _tally(self, changed: bool) -> RefreshSummary:
        """The refused sources, articles and pending images, counted in the store.

        If this refresh changed nothing, the last refresh's figures still hold (whichever
        process made it), and counting 10,000 articles again is what a no-op must avoid.
        """
        last = self.store.last_refreshes(1)
        if last and not changed:
            return RefreshSummary.from_dict(last[0])
        return RefreshSummary(
            failed=self.store.count_refused_sources(),
            articles=self.store.count_articles(),
            images_pending=self.store.count_pending_images(),
        )

    # -- sources ----------------------------------------------------------------------

    def _update_sources(self, progress: Progress,
                        now: datetime) -> tuple[int, _Changes, list[str]]:
        """Scan, parse what changed; the number of files found, the changes, the images due."""
        if self.store.reopen_if_replaced():
            log.warning("%s was deleted or replaced: rebuilding it", self.config.database)
        self._start_running()
        root = self.config.paths.sources
        scan = _SourceScan.of(root, self.store)
        self._check_still_mounted(root, scan)
        found, known, removed = scan.found, scan.known, scan.removed
        parse_settings = self._parse_fingerprint()
        reparse = self.store.get_meta(_PARSE_SETTINGS) != parse_settings
        # Settings that change how a file parses: every source is parsed again.
        changed = [SourceFile(path, *found[path]) for path in (found if reparse else scan.changed)]
        changes = _Changes()
        progress.start("parse", len(changed))
        with self.store.transaction():
            if removed:
                self._remove_sources(removed, changes)
            # A new source has no stored hash to look up.
            jobs = [(file, self.store.source_hash(file.path) if file.path in known else None)
                    for file in changed]
            # Closed as the loop ends, even early: worker processes end with it.
            with contextlib.closing(self._read_and_parse(root, jobs, reparse)) as reads:
                for done, read in enumerate(reads, 1):
                    if self._abandon.is_set():
                        break  # commit what is parsed; the rest waits for the next refresh
                    self._update_source(read, changes, reparse)
                    progress.advance("parse")
                    if done % _PARSE_BATCH == 0:  # a crash or a kill loses one batch at most
                        self._save_pending(changes)
                        self.store.commit_so_far()
            self._check_cache(changes, now)
            for path in scan.misnamed:
                # Refused once, as any refused file is; a real file may have its escaped name.
                if path not in scan.refused_misnamed and path not in found:
                    self._refuse_misnamed(path, changes)
            self._save_pending(changes)
            if reparse and not self._abandon.is_set():
                self.store.set_meta(_PARSE_SETTINGS, parse_settings)
        self._check_abandoned()
        return len(found) + len(scan.misnamed), changes, self.store.images_to_fetch(now)

    def _check_still_mounted(self, root: Path, scan: _SourceScan) -> None:
        """Refuse a sources folder emptied by moving to another file system.

        That is what unmounting a share does: its mount point is left, empty, and
        every article would be unpublished. Emptied in place, it is taken as it is.
        """
        device = str(os.stat(root).st_dev)
        last = self.store.get_meta(_SOURCES_DEVICE)
        if scan.removed and not scan.found and not scan.misnamed and last not in (None, device):
            raise FeederError(
                f"{root}: no source files, and on another file system than at the last "
                "refresh (an unmounted share?): nothing is unpublished; mount it again, "
                "or put a file in it (paths.sources)")
        if device != last:
            self.store.set_meta(_SOURCES_DEVICE, device)

    def _remove_sources(self, removed: Collection[str], changes: _Changes) -> None:
        """Forget deleted sources; their feeds are rebuilt, their pages deleted."""
        changes.categories |= self.store.categories_of(removed)
        changes.removed_pages |= {p for p in removed if self.store.article(p)}
        self.store.delete_sources(removed)
        changes.count += len(removed)

    def _start_running(self) -> None:
        """Mark a refresh as running, since now; if the last one never finished (stopped,
        killed or failed), delete its temp files."""
        unfinished = self.store.get_meta(_RUNNING) is not None
        self.store.set_meta(_RUNNING, datetime.now(UTC).isoformat())
        if not unfinished:
            return
        paths = self.config.paths
        removed = remove_temp_files(paths.feeds) + remove_temp_files(paths.cache)
        if removed:
            log.info("removed %d temp files an unfinished refresh left", removed)

    def _read_and_parse(self, root: Path, jobs: list[SourceJob], reparse: bool
                        ) -> Iterator[SourceRead]:
        """What reading and parsing each ``(file, known hash)`` of ``jobs`` gave, in order.

        In this thread; or, for a cold start's thousands of sources, in worker
        processes, while this thread stores what they parsed. Should those fail
        (cannot start, killed), the rest is parsed here.
        """
        done = 0
        workers = min(_cpus(), _MAX_PARSE_WORKERS)
        if len(jobs) >= _POOL_MIN_SOURCES and workers >= 2:
            log.info("parsing %d sources in %d worker processes", len(jobs), workers)
            try:
                with contextlib.closing(self._read_and_parse_in_workers(
                        root, jobs, reparse, workers)) as reads:
                    for read in reads:
                        yield read
                        done += 1
            except (BrokenExecutor, OSError) as e:
                # A service manager stops every process of a service at once: the
                # workers' end may be the first sign of ours.
                if self._abandon.wait(_STOP_GRACE):
                    return
                log.warning("parsing in worker processes failed (%s); parsing the %d sources "
                            "left in the refresh's thread", str(e) or type(e).__name__,
                            len(jobs) - done, exc_info=True)
        for file, known_hash in jobs[done:]:
            yield self.parser.read_and_parse(root, file, known_hash, reparse)

    def _read_and_parse_in_workers(self, root: Path, jobs: list[SourceJob], reparse: bool,
                                   workers: int) -> Iterator[SourceRead]:
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        with contextlib.ExitStack() as stack:  # undone in reverse: pool, listener, queue
            log_queue = context.Queue()
            stack.callback(log_queue.close)
            listener = logging.handlers.QueueListener(log_queue, _AsLogged())
            listener.start()
            stack.callback(listener.stop)
            pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=start_worker,
                initargs=(os.getpid(), log_queue, logging.getLogger().getEffectiveLevel()))
            # Abandoned, the batches not started yet are dropped.
            stack.callback(pool.shutdown, cancel_futures=True)
            # A few batches ahead of this thread, not all: parsed articles wait in memory.
            tasks: deque[Future[list[SourceRead]]] = deque()
            for start in range(0, len(jobs), _POOL_BATCH):
                tasks.append(pool.submit(read_and_parse_all, self.config, root,
                                         jobs[start : start + _POOL_BATCH], reparse))
                if len(tasks) > 2 * workers:
                    yield from tasks.popleft().result()
            while tasks:
                yield from tasks.popleft().result()

    def _update_source(self, read: SourceRead, changes: _Changes, reparse: bool) -> None:
        """Store what reading a file whose stat changed gave.

        A published article whose file is refused now (a YAML typo, a file caught
        half-written) stays published as it last parsed, images and all, until the
        file parses again or is deleted: the error is reported meanwhile.
        """
        file, known_hash, digest, article = read.file, read.known_hash, read.digest, read.article
        error = read.error.located_reason if read.error is not None else None
        if read.deleted:  # since the scan
            if known_hash is not None:
                self._remove_sources([file.path], changes)
            return
        if read.unreadable:
            # Stored as never read, so the next scan tries again: a permission put
            # right leaves the mtime as it was.
            file = replace(file, mtime_ns=_UNREAD)
        if known_hash == digest and not reparse:  # the same bytes, or the same read error
            self.store.touch_source(file)
            return
        if read.error is not None and not (read.unreadable and known_hash == digest):  # once
            self._note_refused(read.error, changes)
        changes.count += 1
        if article is None and known_hash is not None and self.store.article(file.path):
            self.store.refuse_source(file, digest, error or "")  # the article stays
            return
        if known_hash is not None:  # a new source has no old categories or page
            changes.categories |= self.store.categories_of([file.path])
        if article is not None:
            changes.categories |= set(article.categories)
            changes.pages.add(file.path)
            for warning in article.warnings:
                log.warning("%s: warning: %s", printable_path(file.path), warning)
        self.store.put_source(file, digest, article, error, article.warnings if article else ())

    def _check_cache(self, changes: _Changes, now: datetime) -> None:
        """Forget cached images whose file is gone, if something changed the cache folder.

        A folder's mtime moves when a file in it is added or removed: one stat a
        refresh tells whether anything touched the cache since the last look (a hand
        clean-up, a restore, ``feeder gc``, or feeder's own downloads, which cost one
        listing in the next refresh). Images whose file is gone are fetched again, and
        the pages and feeds showing them rebuilt; so are those cached since the last
        look whose file is not whole: a crash of the machine (not of feeder) may leave
        a file renamed into place with no bytes in it.
        """
        cache = self.config.paths.cache
        state = _folder_state(cache)  # before the listing: a later change shows next time
        if state == self.store.get_meta(_CACHE_STATE):
            return
        checked = self.store.get_meta(_CACHE_CHECKED)
        self.store.set_meta(_CACHE_STATE, state)
        self.store.set_meta(_CACHE_CHECKED, now.isoformat())
        present = set(folder_names(cache))
        cached = self.store.cached_image_names()
        gone = [url for url, name in cached.items() if name not in present]
        if gone:
            log.warning("%d cached images are gone from %s: fetching them again", len(gone),
                        cache)
        since = _instant(checked) if checked is not None else None
        broken = [url for url, (name, size) in self.store.cached_since(since).items()
                  if name in present and _size(cache / name) != size]
        if broken:
            log.warning("%d cached images in %s are not whole (a crash?): fetching them again",
                        len(broken), cache)
        if gone or broken:
            gone += broken
            self.store.forget_cached_images(gone)
            showing = self.store.paths_showing(gone)
            changes.pages |= showing
            changes.categories |= self.store.categories_of(showing)

    def _refuse_misnamed(self, path: str, changes: _Changes) -> None:
        """Record a file whose name is not UTF-8 (it is never read) as refused."""
        self._note_refused(SourceError(path, MISNAMED), changes)
        changes.count += 1
        self.store.put_source(SourceFile(path, 0, 0), _MISNAMED_HASH, None, MISNAMED)

    @staticmethod
    def _note_refused(error: SourceError, changes: _Changes) -> None:
        changes.errors.append(str(error))
        log.warning("%s", error)

    # -- images -----------------------------------------------------------------------

    async def _update_images(self, urls: list[str], changes: _Changes, now: datetime,
                             progress: Progress) -> tuple[int, int]:
        """Fetch due images; feeds showing a newly cached image are marked for rebuild."""
        if not urls:
            return 0, 0
        progress.start("images", len(urls))
        stop = asyncio.Event()
        self._stop_images = stop, asyncio.get_running_loop()
        try:
            if self._abandon.is_set():
                stop.set()
            results = await fetch_images(
                urls, self.config.images, self.config.paths.cache, stop=stop,
                on_result=lambda _: progress.advance("images"),
            )
        finally:
            self._stop_images = None
        recorded = await self._in_thread(self._record_images, results, changes, now)
        self._check_abandoned()
        return recorded

    def _record_images(self, results: Sequence[ImageResult], changes: _Changes,
                       now: datetime) -> tuple[int, int]:
        """Store what fetching gave; the number of images downloaded (not those found in
        the cache already), and of those that failed."""
        cached: list[str] = []
        downloaded = failed = 0
        with self.store.transaction():
            for result in results:
                if isinstance(result, CachedImage):
                    info = CachedImageInfo(result.name, result.size, result.mime)
                    self.store.put_cached_image(result.url, info, now)
                    cached.append(result.url)
                    if not result.adopted:
                        downloaded += 1
                else:
                    failures = self.store.image_failures(result.url) + 1
                    delay = retry_delay(failures, result.retry_after)
                    self.store.put_failed_image(result.url, result.error, now + delay)
                    log.debug("image %s: %s", result.url, result.error)
                    failed += 1
            showing = self.store.paths_showing(cached)
            changes.pages |= showing
            changes.categories |= self.store.categories_of(showing)
            self._save_pending(changes)
        return downloaded, failed

    def _save_pending(self, changes: _Changes) -> None:
        """Remember what must be rebuilt, in the transaction that made it so.

        If this refresh is killed before writing, the next one still rebuilds it.
        """
        if changes.categories or changes.pages or changes.removed_pages:
            changes.merge_json(self.store.get_meta(_PENDING))
            self.store.set_meta(_PENDING, changes.to_json())

    # -- output -----------------------------------------------------------------------

    def _write_outputs(self, changes: _Changes, progress: Progress) -> int:
        """Rebuild what changed; write only files whose bytes differ. Returns files written."""
        changes.merge_json(self.store.get_meta(_PENDING))
        counts = self.store.categories()
        stored_slugs = self.store.get_meta(_SLUGS)
        if stored_slugs is not None:
            old_slugs = json.loads(stored_slugs)
        else:  # a new state database: the folders tell where categories were published
            old_slugs = published_slugs(counts, self.output.list_folder(CATEGORIES_FOLDER))
        slugs = category_slugs(counts, self.config.feeds.slugs, published=old_slugs)
        feeds = feed_infos(self.config, slugs)
        fingerprint = self._fingerprint()
        everything = self.store.get_meta(_FINGERPRINT) != fingerprint
        pages_seen = _folder_state(self.output.path(ARTICLES_FOLDER))
        pages_known = self.store.get_meta(_PAGES_STATE)
        if everything:
            changes.pages |= set(self.store.article_paths())
        else:
            if pages_seen != pages_known:  # touched since the last look
                changes.pages |= self._paths_without_page()
            # A new category can take another's slug: its pages must link the new one.
            moved = [c for c, slug in slugs.items() if old_slugs.get(c, slug) != slug]
            changes.pages |= self.store.paths_in_categories(moved)
        written = 0
        rebuild_index = everything or changes.any or not self.output.has_files("", _INDEX_FILES)
        if rebuild_index:
            # Before feeds are checked and written: on a file system blind to case, the
            # folder of a category "X" replaced by "x" is the new one's too.
            wanted = set(slugs.values())
            for slug in self.output.list_folder(CATEGORIES_FOLDER):
                if slug not in wanted:
                    written += self.output.remove(category_folder(slug))
                    self.store.delete_meta(_SHOWN + category_folder(slug))
        stale = [f for f in feeds if everything or self._feed_stale(f, changes)]
        if everything or stale or changes.any:
            self._plan_build(changes, stale, everything)
        progress.start("write", len(stale) + len(changes.pages | changes.removed_pages))
        shown: dict[str, list[str]] = {}
        for feed in stale:
            self._check_abandoned()
            written += self._write_feed(feed, shown)
            progress.advance("write")
        for path, article in self.store.articles(sorted(changes.pages | changes.removed_pages)):
            self._check_abandoned()
            if article is None:  # deleted, or refused, since a refresh marked it
                written += self.output.remove(article_page_path(article_id(path)))
            else:
                images = self.store.cached_images(article.images)
                page = build_article_page(article, images, slugs, self.config)
                written += self.output.write(article_page_path(article.id), page)
            progress.advance("write")
        if everything:
            written += self._remove_stray_pages()
        if rebuild_index:
            written += self.output.write("index.opml", build_opml(feeds, self.config))
            index = build_index(feeds, counts, self.store.count_articles(), self.config)
            written += self.output.write("index.html", index)
        if everything or stale or changes.any or slugs != old_slugs:
            with self.store.transaction():
                self.store.set_meta(_FINGERPRINT, fingerprint)
                self.store.delete_meta(_PENDING)
                self.store.set_meta(_SLUGS, json.dumps(slugs, ensure_ascii=False))
                for folder, paths in shown.items():
                    self.store.set_meta(_SHOWN + folder, json.dumps(paths, ensure_ascii=False))
        wrote_pages = bool(changes.pages or changes.removed_pages)
        self._note_pages_state(pages_seen, pages_known, wrote_pages)
        return written

    def _pages(self) -> tuple[dict[str, str], set[str]]:
        """The page of each stored article (to its source path), and the pages there are."""
        wanted = {article_page_path(article_id(path)): path
                  for path in self.store.article_paths()}
        present = {f"{ARTICLES_FOLDER}/{name}" for name in self.output.list_folder(ARTICLES_FOLDER)
                   if name.endswith(".html") and not name.startswith(".")}
        return wanted, present

    def _paths_without_page(self) -> set[str]:
        """Stored articles whose page is missing (deleted by hand, with its folder or not)."""
        wanted, present = self._pages()
        return {path for page, path in wanted.items() if page not in present}

    def _note_pages_state(self, seen: str, known: str | None, wrote: bool) -> None:
        """Remember the pages folder's state as seen before this build, if it can be trusted.

        A folder's mtime moves when a page is added or removed, so one stat tells the
        next refresh whether to look for missing pages. Not after this build wrote
        pages: the next refresh lists the folder once. By then the folder's mtime is
        that of the last write, older than any deletion to come by more than a tick
        of the file system's clock (Linux's: a few ms; FAT's: 2 s).
        """
        if wrote and known is not None:
            self.store.delete_meta(_PAGES_STATE)
        elif not wrote and seen != known:
            self.store.set_meta(_PAGES_STATE, seen)

    def _remove_stray_pages(self) -> int:
        """Delete the pages of no stored article: a state database rebuilt after their
        source was deleted knows nothing of them. The number deleted."""
        wanted, present = self._pages()
        return sum(self.output.remove(page) for page in sorted(present - wanted.keys()))

    def _plan_build(self, changes: _Changes, stale: list[FeedInfo], everything: bool) -> None:
        """Record, before the first file is written, what this build is about to rewrite.

        A build that does not finish (killed, abandoned, a full disk) leaves files of
        its own among older ones; the next refresh must rebuild them all, even if the
        change that caused them is undone meanwhile. So the feeds lose their record of
        what they show, the pages wait in the pending list, and a new fingerprint is
        saved only at the end.
        """
        with self.store.transaction():
            if everything:
                self.store.delete_meta(_FINGERPRINT)
            for feed in stale:
                self.store.delete_meta(_SHOWN + feed.folder)
            self._save_pending(changes)

    def _feed_stale(self, feed: FeedInfo, changes: _Changes) -> bool:
        """Does ``feed`` need building: a file of it is missing, or what it shows changed?

        An article that changed matters only if the feed shows it, or showed it before
        (then the articles shown are not the same): editing an old article rebuilds
        its page, not feeds it dropped out of long ago.
        """
        if not self.output.has_files(feed.folder, FEED_FILES):
            return True
        if not ((changes.any and feed.category is None) or feed.category in changes.categories):
            return False
        paths = self.store.newest_paths(feed.category, self.config.feeds.items)
        if not changes.pages.isdisjoint(paths):
            return True
        return json.dumps(paths, ensure_ascii=False) != self.store.get_meta(_SHOWN + feed.folder)

    def _write_feed(self, feed: FeedInfo, shown: dict[str, list[str]]) -> int:
        """Build ``feed`` and write its files; note the paths it shows in ``shown``."""
        articles = self.store.newest_articles(feed.category, self.config.feeds.items)
        images = self.store.cached_images(u for a in articles for u in a.images)
        documents = build_feed(feed, articles, images, self.config)
        shown[feed.folder] = [a.path for a in articles]
        return sum(self.output.write(f"{feed.folder}/{name}", data)
                   for name, data in documents.items())

    def _parse_fingerprint(self) -> str:
        """What, besides a file's bytes, its parsed article depends on."""
        c = self.config
        return _digest([__version__, PARSER_VERSION, c.site.timezone, c.feeds.default_category,
                        c.sources.max_bytes, sorted(c.images.allowed_hosts)])

    def _fingerprint(self) -> str:
        """What, besides articles and images, the output depends on."""
        c = self.config
        return _digest([__version__, OUTPUT_VERSION, c.site.base_url, c.site.title,
                        c.site.language, c.schedule.interval, c.feeds.items, c.feeds.slugs,
                        str(c.paths.feeds)])


class _AsLogged(logging.Handler):
    """Logs a record from a worker process as if it were this process's own."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _folder_state(folder: Path) -> str:
    """What changes when a file is added to or removed from ``folder`` (or it is replaced)."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return ""
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


def _digest(inputs: list[object]) -> str:
    return hashlib.sha1(json.dumps(inputs, ensure_ascii=False).encode()).hexdigest()


class FileLock:
    """An exclusive ``flock`` on a file: released by :meth:`release`, or by the process
    ending, however it ends."""

    def __init__(self, path: Path, busy: str) -> None:
        #: The lock file.
        self.path = path
        self._busy = busy
        self._fd: int | None = None

    def acquire(self, wait: bool = True) -> None:
        """Take the lock, waiting for it unless ``wait`` is false.

        Raises:
            LockedError: ``wait`` is false and another process holds the lock.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self._busy} ({self.path})") from None
        self._fd = fd

    def note(self, text: str) -> None:
        """Write ``text`` into the held lock file, for whoever finds it held."""
        assert self._fd is not None, "the lock is not held"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def refresh_lock(config: Config) -> FileLock:
    """The lock file in ``paths.state``: two processes never refresh at once."""
    return FileLock(config.lock_file, "another process is refreshing")


@contextmanager
def lock(config: Config, *, wait: bool = True,
         on_wait: Callable[[], object] | None = None) -> Iterator[None]:
    """Hold the refresh lock for the duration of a ``with`` block.

    ``on_wait`` is called first if another process holds it, and it must be waited for.
    """
    held = refresh_lock(config)
    if on_wait is None or not wait:
        held.acquire(wait)
    else:
        try:
            held.acquire(wait=False)
        except LockedError:
            on_wait()
            held.acquire()
    try:
        yield
    finally:
        held.release()


def collect_garbage(config: Config, store: Store) -> tuple[int, int, int]:
    """Delete cached images no article references: (files removed, bytes freed, kept).

    A file is kept if its name comes from the URL of an image some article
    references, whatever the state database says of it (it may be rebuilt). Temp
    files a killed download left go too; other dot-files stay. The caller holds
    the refresh lock, so no download is running.

    Raises:
        FeederError: the articles known may not be all of those in ``sources/`` (no
            refresh finished since the last began, or files changed since), and the
            others' images would go; or no article references an image at all (an
            unmounted share?), and every image would go.
    """
    started = store.get_meta(_RUNNING)
    if started is not None or not store.last_refreshes(1):
        if started is None:
            what = "no refresh has run yet"
        elif _failed_since(store, started):
            what = "the last refresh failed"
        else:
            what = "the last refresh did not finish"
        raise FeederError(f"{what}: run `feeder refresh` first, or the images of articles "
                          "it did not reach would be deleted")
    scan = _SourceScan.of(config.paths.sources, store)
    # A file no refresh could read looks changed to every scan (it is tried again each
    # refresh), and has no images to lose.
    unread = {path for path, (_size, mtime) in scan.known.items() if mtime == _UNREAD}
    if set(scan.changed) - unread or scan.removed:
        raise FeederError("sources/ changed since the last refresh: run `feeder refresh` "
                          "first, or the images of articles it has not seen would be deleted")
    keep = {cache_key(url) for url in store.referenced_image_urls()}
    if not keep and any(not name.startswith(".") for name in folder_names(config.paths.cache)):
        raise FeederError("no article references an image (is sources/ mounted?): refusing "
                          f"to delete every cached image; delete {config.paths.cache} instead")
    with store.transaction():
        store.forget_unreferenced_images()
    removed = freed = kept = 0
    cache = config.paths.cache
    for file in sorted(cache.iterdir()) if cache.is_dir() else ():
        if not file.is_file() or (file.name.startswith(".")
                                  and not file.name.endswith(TEMP_SUFFIXES)):
            continue
        if file.name.partition(".")[0] in keep:
            kept += 1
            continue
        freed += file.stat().st_size
        file.unlink()
        removed += 1
    return removed, freed, kept


def unfinished(config: Config, store: Store) -> bool:
    """Whether the last refresh begun neither finished nor failed (it was stopped or
    killed) and none is running now: the next one completes what it left."""
    started = store.get_meta(_RUNNING)
    if started is None or _failed_since(store, started):
        return False
    try:
        with lock(config, wait=False):
            return True
    except (LockedError, PermissionError):  # running now; or not ours to tell
        return False


def _failed_since(store: Store, started: str) -> bool:
    """Whether the refresh marked running since ``started`` failed (the failure
    remembered is as late as it)."""
    failure = last_failure(store)
    return failure is not None and _instant(failure[0]) >= _instant(started)


def _size(path: Path) -> int:
    """A file's size; -1 if it is gone."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _instant(text: str) -> datetime:
    """An ISO 8601 time stored in the meta table; the earliest for one that is not
    (an older feeder marked a running refresh "1")."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def last_failure(store: Store) -> tuple[str, str] | None:
    """When the last refresh failed (ISO 8601), and why, if none succeeded since."""
    text = store.get_meta(_FAILED)
    if text is None:
        return None
    failure = json.loads(text)
    return failure["finished"], failure["error"]


@contextmanager
def open_refresher(config: Config) -> Iterator[Refresher]:
    """Wire a Refresher to its store; closes what it opened, even if setup fails."""
    store = Store.open(config.database)
    try:
        yield Refresher(config, store)
    finally:
        store.close()
