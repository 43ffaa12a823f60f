"""The daemon: refresh on a schedule, on file changes and on request; serve everything.

Every trigger goes through :meth:`Daemon.request_refresh`, which coalesces: requests
that arrive while no refresh has started yet share the next one, so there are never
two refreshes at once and never a queue of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from feeder.config import Config, served_url
from feeder.exceptions import (
    DaemonRunningError,
    FeederError,
    LockedError,
    RefreshAbandoned,
    failure_reason,
    known_error,
)
from feeder.refresh import FileLock, Refresher, RefreshSummary, open_refresher, refresh_lock
from feeder.sources import is_source_name
from feeder.web import ServerLog, make_app

log = logging.getLogger(__name__)

#: Seconds requests wait for each other before a refresh starts (they coalesce).
_COALESCE_SECONDS = 0.1
#: Seconds the file watch waits for changes to settle (it also caps at ~1 s).
_WATCH_STEP_MS = 200
_WATCH_DEBOUNCE_MS = 1000
#: Seconds between checks that the watched sources folder is still the one configured.
_WATCH_RECHECK_SECONDS = 2.0
#: Seconds a shutdown waits for an abandoned refresh to stop.
_STOP_TIMEOUT = 3.0
#: Seconds a shutdown gives requests in flight (a slow reader downloading a feed).
_SHUTDOWN_TIMEOUT = 5.0
#: Seconds between two tries of a lock another process holds.
_LOCK_POLL_SECONDS = 0.2
#: The lock file in paths.state a daemon holds for its whole life (not the refresh lock).
DAEMON_LOCK_NAME = "daemon.lock"
#: Bytes a Unix socket's path may have (Linux's; macOS's is 103): the control socket's.
MAX_SOCKET_PATH = 107
_DAEMON_KEY = web.AppKey("daemon", "Daemon")


@dataclass(frozen=True)
class RefreshRecord:
    """One refresh of this daemon, as health and status report it."""

    #: When it finished.
    finished: datetime
    #: Its figures; None when it failed.
    summary: RefreshSummary | None
    #: Why it failed, when it did.
    error: str | None = None


class Monitor:
    """Counters and the last refreshes of a daemon: health, metrics, status."""

    def __init__(self) -> None:
        self.started = datetime.now(UTC)
        self.refreshing = False
        self.history: list[RefreshRecord] = []
        self.counters = {"refreshes": 0, "refresh_failures": 0, "files_written": 0,
                         "images_fetched": 0, "images_failed": 0}
        self.last_seconds = 0.0
        self.articles = 0

    def record(self, record: RefreshRecord) -> None:
        self.history = [*self.history[-9:], record]
        self.counters["refreshes"] += 1
        if record.summary is None:
            self.counters["refresh_failures"] += 1
            return
        summary = record.summary
        self.counters["files_written"] += summary.written
        self.counters["images_fetched"] += summary.images_fetched
        self.counters["images_failed"] += summary.images_failed
        self.last_seconds = summary.seconds
        self.articles = summary.articles

    def health(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else None
        return {
            "ok": last is None or last.error is None,
            "refreshing": self.refreshing,
            "started": self.started.isoformat(),
            "last_refresh": last.finished.isoformat() if last else None,
            "last_result": _result(last) if last else None,
            "articles": self.articles,
        }

    def metrics_text(self) -> str:
        lines = []
        for name, help_text, kind, value in [
            ("refreshes_total", "Refreshes run.", "counter", self.counters["refreshes"]),
            ("refresh_failures_total", "Refreshes that failed.", "counter",
             self.counters["refresh_failures"]),
            ("refresh_duration_seconds", "Duration of the last refresh.", "gauge",
             self.last_seconds),
            ("refresh_in_progress", "1 while a refresh runs.", "gauge", int(self.refreshing)),
            ("articles", "Articles published.", "gauge", self.articles),
            ("feed_writes_total", "Feed, page and index files written.", "counter",
             self.counters["files_written"]),
            ("image_fetches_total", "Images fetched into the cache.", "counter",
             self.counters["images_fetched"]),
            ("image_failures_total", "Image fetches that failed.", "counter",
             self.counters["images_failed"]),
        ]:
            lines += [f"# HELP feeder_{name} {help_text}", f"# TYPE feeder_{name} {kind}",
                      f"feeder_{name} {value}"]
        return "\n".join(lines) + "\n"


def _result(record: RefreshRecord) -> str:
    return record.error or (record.summary.line() if record.summary else "")


class Daemon:
    """Runs refreshes one at a time for every trigger, and records them."""

    def __init__(self, config: Config, refresher: Refresher) -> None:
        self.config = config
        self.refresher = refresher
        self.monitor = Monitor()
        # What is published already, until the first refresh of this daemon tells.
        self.monitor.articles = refresher.store.count_articles()
        self._lock = refresh_lock(config)
        self._next: asyncio.Future[RefreshSummary] | None = None
        self._running: asyncio.Task[None] | None = None
        self._stopping = False

    async def request_refresh(self) -> RefreshSummary:
        """Refresh soon and return that refresh's summary.

        A refresh already running does not count (it may have scanned before the
        caller's change): the caller gets the next one, shared with every request
        made before it starts.
        """
        return await asyncio.shield(self.trigger_refresh())

    def trigger_refresh(self) -> asyncio.Future[RefreshSummary]:
        """Ask for a refresh without waiting; the future resolves when it has run."""
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            # Its failure is logged and recorded already; nobody may be waiting for it.
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
            loop.call_later(_COALESCE_SECONDS, self._start_next)
        return self._next

    def _start_next(self) -> None:
        if self._running is not None and not self._running.done():
            self._running.add_done_callback(lambda _: self._start_next())
            return
        future, self._next = self._next, None
        if future is None or future.done():
            return
        if self._stopping:  # asked for before the stop: it will not run
            future.set_exception(RefreshAbandoned("daemon stopped"))
            return
        self._running = asyncio.create_task(self._run_refresh(future))

    async def _run_refresh(self, future: asyncio.Future[RefreshSummary]) -> None:
        self.monitor.refreshing = True
        try:
            await self._acquire_lock()
            try:
                if self._stopping:  # it waited for the lock while the daemon was told to stop
                    raise RefreshAbandoned("daemon stopped")
                summary = await self.refresher.refresh()
            except asyncio.CancelledError:
                # Its worker thread may write until it sees the abandon: the lock is kept,
                # and goes with the process.
                raise
            except BaseException:
                self._lock.release()
                raise
            self._lock.release()
        except RefreshAbandoned as e:
            log.info("%s: the next refresh completes it", e)
            future.set_exception(e)
            return
        except Exception as e:  # a failed refresh never stops the daemon
            reason = self._log_failure(e)
            self.monitor.record(RefreshRecord(datetime.now(UTC), None, reason))
            future.set_exception(FeederError(f"refresh failed: {reason}"))
            return
        except asyncio.CancelledError:  # a shutdown: waiting clients still get an answer
            future.set_exception(RefreshAbandoned("daemon stopped"))
            raise
        finally:
            self.monitor.refreshing = False
        log.info("refresh: %s", summary.line())
        self.monitor.record(RefreshRecord(datetime.now(UTC), summary))
        future.set_result(summary)

    def _log_failure(self, error: Exception) -> str:
        """Log a failed refresh; why it failed, in one line.

        What a user can act on (see :func:`known_error`: no sources folder, feeds/ is a
        file, a damaged state database) is one line naming it; anything else is a
        bug, logged with its traceback.
        """
        reason = failure_reason(error, self.config)
        if known_error(error, self.config) is None:
            log.error("refresh failed", exc_info=error)
        else:
            log.error("refresh failed: %s", reason)
        return reason

    async def _acquire_lock(self) -> None:
        """Wait for the refresh lock without parking a thread in flock(): cancellable."""
        while True:
            try:
                self._lock.acquire(wait=False)
                return
            except LockedError:
                await asyncio.sleep(_LOCK_POLL_SECONDS)

    async def _scheduled_refresh(self) -> None:
        """The scheduler's job: ask for a refresh, and return without waiting for it.

        A job that waited would still run at the next tick if a refresh took longer
        than the interval, and the scheduler would log a warning for each tick it
        skipped; refreshes run one at a time anyway (see :meth:`trigger_refresh`).
        """
        self.trigger_refresh()

    async def watch_sources(self) -> None:
        """Refresh when source files under sources/ change (debounced).

        The watch follows the folder, not its first inode: a folder replaced (a share
        mounted again, a deploy that swaps it) or created late is watched anew, and
        refreshed at once. Changes to dot-files and other non-source files are ignored.
        """
        from watchfiles import Change, awatch

        sources = self.config.paths.sources

        def worth_a_refresh(change: Change, path: str) -> bool:
            return _is_watched_source(sources, change is Change.deleted, path)

        watched = _identity(sources)
        last_error = ""
        while True:
            current = _identity(sources)
            if current != watched:
                log.info("sources folder replaced: refreshing")
                self.trigger_refresh()
                watched = current
            if current is None:  # not there (yet): the refreshes say so
                await asyncio.sleep(_WATCH_RECHECK_SECONDS)
                continue
            try:
                async for changes in awatch(
                    sources, watch_filter=worth_a_refresh, step=_WATCH_STEP_MS,
                    debounce=_WATCH_DEBOUNCE_MS, yield_on_timeout=True,
                    rust_timeout=int(_WATCH_RECHECK_SECONDS * 1000),
                ):
                    if _identity(sources) != watched:
                        break
                    last_error = ""
                    if changes:
                        log.info("sources changed: refreshing")
                        self.trigger_refresh()
            except Exception as e:  # the scheduled refreshes go on; the watch tries again
                cause = _first_leaf(e)
                if str(cause) != last_error:  # once, not every few seconds
                    log.warning("cannot watch %s: %s", sources, cause)
                    last_error = str(cause)
                await asyncio.sleep(_WATCH_RECHECK_SECONDS)
                # Not a system limit but a change it could not report (a file name that
                # is not UTF-8): a refresh publishes that batch, and what came meanwhile.
                if not isinstance(cause, OSError):
                    self.trigger_refresh()

    async def stop(self) -> None:
        """Abandon the running refresh (what it did is kept) and wait for it briefly.

        A refresh asked for but not started yet never starts.
        """
        self._stopping = True
        self.refresher.abandon()
        if self._running is not None and not self._running.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._running), _STOP_TIMEOUT)
            if not self._running.done():
                self._running.cancel()
                # Let it resolve its future, so waiting jobs end before the scheduler stops.
                await asyncio.gather(self._running, return_exceptions=True)
        if self._next is not None and not self._next.done():
            self._next.set_exception(RefreshAbandoned("daemon stopped"))


def _first_leaf(error: BaseException) -> BaseException:
    """The first error an exception group holds (the watch's task group), or ``error``."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder; None if there is none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _is_watched_source(sources: Path, deleted: bool, path: str) -> bool:
    """Is a change to ``path`` (under ``sources``) worth a refresh?

    Source files and folders are; dot-files and whatever is under a dot-folder are
    not, nor other files (an editor's ``a.md~``). A deleted path may have been a folder.
    """
    try:
        parts = Path(path).relative_to(sources).parts
    except ValueError:  # elsewhere (through a link, resolved): not a path to judge
        return False
    if any(part.startswith(".") for part in parts):
        return False
    name = parts[-1] if parts else ""
    return is_source_name(name) or deleted or "." not in name or os.path.isdir(path)


# -- control socket ---------------------------------------------------------------------


def make_control_app(daemon: Daemon) -> web.Application:
    """The app on the Unix socket: only local users with access to paths.state reach it."""
    app = web.Application()
    app[_DAEMON_KEY] = daemon
    app.router.add_post("/refresh", _control_refresh)
    app.router.add_get("/status", _control_status)
    return app


async def _control_refresh(request: web.Request) -> web.Response:
    log.info("refresh requested on the control socket")
    try:
        summary = await request.app[_DAEMON_KEY].request_refresh()
    except FeederError as e:
        return web.json_response({"error": str(e)}, status=500)
    return web.json_response({"summary": summary.to_dict()})


async def _control_status(request: web.Request) -> web.Response:
    monitor = request.app[_DAEMON_KEY].monitor
    history = [{"finished": r.finished.isoformat(), "result": _result(r)}
               for r in monitor.history]
    return web.json_response({**monitor.health(), "history": history, "pid": os.getpid()})


async def ask_daemon(config: Config, method: str, path: str) -> dict[str, Any] | None:
    """Call the running daemon's control socket; None when no daemon answers."""
    if not config.control_socket.exists():
        return None
    connector = aiohttp.UnixConnector(path=str(config.control_socket))
    try:
        async with aiohttp.ClientSession(connector=connector) as session, session.request(
            method, f"http://feeder{path}", timeout=aiohttp.ClientTimeout(total=None)
        ) as response:
            data: dict[str, Any] = await response.json()
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, PermissionError):  # a daemon run by another user
            raise FeederError(f"cannot ask the daemon at {config.control_socket} "
                              f"(paths.state): permission denied") from e
        return None
    except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError):
        return None
    if "error" in data:
        raise FeederError(data["error"])
    return data


# -- running --------------------------------------------------------------------------


@contextlib.contextmanager
def hold_daemon_lock(config: Config) -> Iterator[None]:
    """Hold ``paths.state/daemon.lock`` for a ``with`` block: one daemon per state folder.

    Taken at once or not at all, before the control socket is touched: only its
    holder may replace a stale socket, so two daemons started at the same instant
    never both run. The lock goes with the process, however it ends.

    Raises:
        DaemonRunningError: another daemon holds it.
    """
    held = FileLock(config.paths.state / DAEMON_LOCK_NAME, "a daemon is already running")
    try:
        held.acquire(wait=False)
    except LockedError:
        holder = held.path.read_bytes()[:32].decode("ascii", "replace").strip()
        pid = f"pid {holder}, " if holder.isdigit() else ""
        raise DaemonRunningError(
            f"a daemon is already running ({pid}lock {held.path} is held)") from None
    try:
        held.note(f"{os.getpid()}\n")  # for the message above, in the daemon started next
        yield
    finally:
        held.release()


async def run_daemon(config: Config) -> None:
    """Serve and refresh until SIGTERM, SIGINT or SIGHUP; then stop cleanly.

    Raises:
        DaemonRunningError: another daemon runs on the same ``paths.state``.
    """
    with hold_daemon_lock(config):
        await _serve_and_refresh(config)


async def _serve_and_refresh(config: Config) -> None:
    """The daemon's life, once it holds the daemon lock."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop_on(sig: signal.Signals) -> None:
        log.info("%s: stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # SIGHUP (a closed terminal) would end it on the spot, unless ignored: `nohup`
        # asks to outlive the terminal.
        if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
            loop.add_signal_handler(sig, stop_on, sig)
    with open_refresher(config) as refresher:
        daemon = Daemon(config, refresher)
        async with _serving(config, daemon):
            scheduler = AsyncIOScheduler(timezone=UTC)
            scheduler.add_job(daemon._scheduled_refresh, "interval",
                              seconds=config.schedule.interval, max_instances=1,
                              coalesce=True, next_run_time=datetime.now(UTC))
            scheduler.start()
            watch = asyncio.create_task(daemon.watch_sources()) if config.schedule.watch else None
            log.info("serving %s on %s/ (feeds at %s/feeds/all/rss.xml)", config.paths.feeds,
                     served_url(config.server), config.site.base_url)
            await stop.wait()
            await daemon.stop()
            scheduler.shutdown(wait=False)
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch


@contextlib.asynccontextmanager
async def _serving(config: Config, daemon: Daemon) -> AsyncIterator[None]:
    """Serve the web app on TCP and the control app on the Unix socket."""
    web_runner = web.AppRunner(make_app(config, daemon.monitor), access_log=None,
                               logger=ServerLog(), shutdown_timeout=_SHUTDOWN_TIMEOUT)
    control_runner = web.AppRunner(make_control_app(daemon), access_log=None,
                                   logger=ServerLog(), shutdown_timeout=_SHUTDOWN_TIMEOUT)
    host, port, sock = config.server.host, config.server.port, config.control_socket
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(sock.unlink, missing_ok=True)  # last
        for runner in (web_runner, control_runner):
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(web_runner, host, port).start()
        except OSError as e:
            keys = "server.host" if isinstance(e, socket.gaierror) else "server.host/server.port"
            raise FeederError(f"cannot listen on {host}:{port} ({keys}): {_os_reason(e)}") from e
        config.paths.state.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is born 0600: file permissions guard it
        try:
            await web.UnixSite(control_runner, str(sock)).start()
        except OSError as e:
            reason = _os_reason(e)
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                reason += (f": {len(os.fsencode(sock))} bytes, where a socket's path may have "
                           f"{MAX_SOCKET_PATH}; choose a shorter one")
            raise FeederError(
                f"cannot make the control socket {sock} (paths.state): {reason}") from e
        finally:
            os.umask(old_umask)
        yield


def _os_reason(error: OSError) -> str:
    """What the system said (``address already in use``), without what asyncio adds."""
    if error.errno is None:  # AF_UNIX path too long
        return str(error)
    text = error.strerror if isinstance(error, socket.gaierror) else os.strerror(error.errno)
    return (text or str(error)).lower()
