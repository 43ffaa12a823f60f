"""The command line: thin commands over the core, known errors as one line and exit 1."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar

from feeder import __version__
from feeder.config import Config, load_config
from feeder.exceptions import FeederError, SourceError, known_error, one_line, printable_path
from feeder.sources import (
    MISNAMED,
    SourceParser,
    read_source,
    scan_sources,
)
from feeder.store import Store

if TYPE_CHECKING:
    from feeder.refresh import RefreshSummary

# feeder.daemon and feeder.refresh (aiohttp, the network stack) are imported by the
# commands that use them: a worker process parsing sources runs the main script's
# imports, which is this module's when feeder runs as its console script.

_STAGES = {"parse": "Parsing sources", "images": "Fetching images", "write": "Writing feeds"}


class TerminalProgress:
    """Shows each stage of a refresh as a rich progress bar."""

    def __init__(self, bar: RichBar) -> None:
        self._bar = bar
        self._tasks: dict[str, TaskID] = {}

    def start(self, stage: str, total: int) -> None:
        if total:
            self._tasks[stage] = self._bar.add_task(_STAGES.get(stage, stage), total=total)

    def advance(self, stage: str, amount: int = 1) -> None:
        if stage in self._tasks:
            self._bar.advance(self._tasks[stage], amount)


@click.group()
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              envvar="FEEDER_CONFIG", help="Config file (default: ./config.yaml).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens, not only problems.")
@click.version_option(__version__, prog_name="feeder")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, verbose: bool) -> None:
    """feeder: republish a folder of article files as RSS, Atom and JSON feeds."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    ctx.obj = _ConfigLoader(config_file)


class _ConfigLoader:
    """Loads the config when a command first needs it, so --help never fails."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def load(self) -> Config:
        try:
            return load_config(self.path)
        except FeederError as e:
            raise click.ClickException(f"config: {e}") from e


#: Lines of each list (failing sources, warnings, failing images) ``status`` prints.
STATUS_LINES = 20


@contextmanager
def _known_errors(config: Config) -> Iterator[None]:
    """Turn feeder's errors into one clear line and exit status 1.

    So too a system error about a file the user controls (paths.feeds is a file, no
    permission), and a damaged state database: the line names the file and its config
    key. Other errors keep their traceback: they are bugs.
    """
    try:
        yield
    except Exception as e:
        known = known_error(e, config)
        if known is None:
            raise
        raise click.ClickException(str(known)) from e


@cli.command()
@click.pass_obj
def run(loader: _ConfigLoader) -> None:
    """Run the daemon: refresh now and every schedule.interval, and serve over HTTP."""
    config = loader.load()
    level = logging.getLogger().getEffectiveLevel()
    logging.basicConfig(force=True, level=min(level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    for chatty in ("apscheduler", "watchfiles"):  # a line per job run or change seen
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    from feeder.daemon import run_daemon

    with _known_errors(config):
        asyncio.run(run_daemon(config))


@cli.command()
@click.pass_obj
def refresh(loader: _ConfigLoader) -> None:
    """Publish the feeds now: scan, parse, fetch images, write what changed.

    A running daemon is asked to do it; with none, it runs here.
    """
    from feeder.daemon import ask_daemon
    from feeder.refresh import RefreshSummary

    config = loader.load()
    with _known_errors(config):
        answer = asyncio.run(ask_daemon(config, "POST", "/refresh"))
        if answer is not None:
            summary = RefreshSummary.from_dict(answer["summary"])
            for error in summary.errors:  # as a refresh here logs them, on stderr
                click.echo(error, err=True)
            click.echo(f"daemon: {summary.line()}")
            return
        summary = _refresh_here(config)
    click.echo(summary.line())


def _refresh_lock(config: Config) -> AbstractContextManager[None]:
    """The refresh lock; waiting for another refresh to end, if one runs, says so."""
    from feeder.refresh import lock

    return lock(config, on_wait=lambda: click.echo(
        "another refresh is running: waiting for it to end", err=True))


def _refresh_here(config: Config) -> RefreshSummary:
    from feeder.refresh import open_refresher

    with _refresh_lock(config), open_refresher(config) as refresher:
        if not sys.stderr.isatty():
            return asyncio.run(_until_stopped(refresher.refresh()))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with RichBar(*columns, transient=True) as bar:
            return asyncio.run(_until_stopped(refresher.refresh(TerminalProgress(bar))))


async def _until_stopped(refresh: Coroutine[Any, Any, RefreshSummary]) -> RefreshSummary:
    """``refresh``, abandoned on SIGTERM or SIGHUP (a closed terminal) as on Ctrl-C.

    Killed instead, it would leave its worker processes to notice, and their
    semaphores to multiprocessing's complaints. (SIGHUP is left ignored under nohup.)

    Raises:
        RefreshAbandoned: a signal stopped it; what it wrote is whole.
    """
    from feeder.exceptions import RefreshAbandoned

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if not received:  # once: a second cancel would stop its wait for the thread
            task.cancel()
        received.append(sig)

    signals = [sig for sig in (signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(sig) != signal.SIG_IGN]
    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await refresh
    except asyncio.CancelledError:
        if not received:
            raise
        raise RefreshAbandoned(f"refresh stopped by {received[0].name}: every file it wrote "
                               "is whole, and the next refresh completes it") from None
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def check(loader: _ConfigLoader, paths: tuple[Path, ...]) -> None:
    """Report bad sources (all of sources/ by default); exit 1 if any is refused."""
    config = loader.load()
    parser = SourceParser(config)
    if not paths and not config.paths.sources.is_dir():
        raise click.ClickException(f"{config.paths.sources}: no such folder (paths.sources)")
    misnamed: list[str] = []
    with _known_errors(config):  # a folder that cannot be listed
        files = list(_source_files(paths or (config.paths.sources,), misnamed))
    for path in misnamed:
        click.echo(f"{path}: {MISNAMED}")
    refused = len(misnamed)
    for file in files:
        name = _display_path(file, config.paths.sources)
        try:
            data = read_source(file, config.sources.max_bytes, name)
            mtime = datetime.fromtimestamp(file.stat().st_mtime, UTC)
            article = parser.parse(name, data, mtime)
        except OSError as e:
            click.echo(f"{name}: cannot read: {e.strerror}")
            refused += 1
            continue
        except SourceError as e:
            click.echo(str(e))
            refused += 1
            continue
        for warning in article.warnings:
            click.echo(f"{name}: warning: {warning}")
    if refused:
        sys.exit(1)


def _source_files(paths: tuple[Path, ...], misnamed: list[str]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():  # the files a refresh would read
            yield from (path / name for name in sorted(scan_sources(path, misnamed)))
        else:
            yield path


def _display_path(file: Path, sources: Path) -> str:
    """A file's path relative to sources/ when it is inside, else as given.

    A link is named, not the file it points to: as a refresh names it.
    """
    try:
        shown = (file.parent.resolve() / file.name).relative_to(sources.resolve()).as_posix()
    except ValueError:
        shown = str(file)
    return printable_path(shown)


@cli.command()
@click.pass_obj
def status(loader: _ConfigLoader) -> None:
    """Show the last refreshes, failing sources and failing images."""
    from feeder.daemon import ask_daemon
    from feeder.refresh import unfinished

    config = loader.load()
    with _known_errors(config):
        daemon = asyncio.run(ask_daemon(config, "GET", "/status"))
        if daemon is None:
            click.echo("daemon: not running")
        else:
            state = "refreshing" if daemon["refreshing"] else "idle"
            click.echo(f"daemon: running (pid {daemon['pid']}, since {daemon['started']}), "
                       f"{state}")
            if not daemon["ok"]:  # whether or not the store could record it
                click.echo(f"last refresh {daemon['last_refresh']}: failed: "
                           f"{daemon['last_result']}")
        if _no_database_yet(config):  # looking creates nothing
            click.echo("never refreshed")
            return
        store = Store.open(config.database)
        try:
            _print_status(store, failure_shown=daemon is not None and not daemon["ok"],
                          unfinished=unfinished(config, store))
        finally:
            store.close()


def _no_database_yet(config: Config) -> bool:
    """Whether no refresh has made the state database yet.

    A state path that is not a folder is left for :meth:`Store.open` to name.
    """
    state = config.paths.state
    return not state.exists() or (state.is_dir() and not config.database.exists())


def _print_status(store: Store, failure_shown: bool, unfinished: bool) -> None:
    from feeder.refresh import RefreshSummary, last_failure

    failure = last_failure(store)
    if failure is not None and not failure_shown:
        click.echo(f"last refresh {failure[0]}: failed: {failure[1]}")
    if unfinished:
        click.echo("last refresh did not finish (stopped or killed): the next one completes it")
    refreshes = store.last_refreshes()
    if not refreshes:
        click.echo("never refreshed")
    for r in refreshes:
        click.echo(f"refresh {r['finished']}: {RefreshSummary.from_dict(r).line()}")
    click.echo(f"{store.count_articles()} articles in {len(store.categories())} categories")
    failing, warned = [], []
    for path, error, warnings in store.source_problems():
        shown = printable_path(path)
        if error:
            failing.append(f"failing source {shown}: {error}")
        warned += [f"source {shown}: warning: {warning}" for warning in warnings]
    images = [f"failing image {printable_path(image.url)}: "
              f"{printable_path(one_line(image.error))} "
              f"({image.failures} failures, "
              f"next attempt {image.next_attempt:%Y-%m-%d %H:%M:%S}Z)"
              for image in store.failing_images()]
    _echo_some(failing, "failing sources (feeder check lists them all)")
    _echo_some(warned, "warnings (feeder check lists them all)")
    _echo_some(images, "failing images")


def _echo_some(lines: list[str], what: str) -> None:
    """The first :data:`STATUS_LINES` of ``lines``, then how many more there are."""
    for line in lines[:STATUS_LINES]:
        click.echo(line)
    if len(lines) > STATUS_LINES:
        click.echo(f"... and {len(lines) - STATUS_LINES} more {what}")


@cli.command()
@click.pass_obj
def gc(loader: _ConfigLoader) -> None:
    """Delete cached images that no article references any more."""
    from feeder.refresh import collect_garbage

    config = loader.load()
    with _known_errors(config), _refresh_lock(config):
        store = Store.open(config.database)
        try:
            removed, freed, kept = collect_garbage(config, store)
        finally:
            store.close()
    click.echo(f"{removed} cached images removed, {freed} bytes freed, {kept} kept")
