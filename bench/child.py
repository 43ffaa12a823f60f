"""Measurements that run in a child process of their own: ``python -m bench.child CMD JSON``.

Each prints one JSON object on its last stdout line. A child's peak RSS (``VmHWM``)
is its own, so memory figures are not blurred by the runner or by other figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

#: No-op refreshes (and stat floors) per run; the run's figure is their median.
NOOP_REPEATS = 5
#: Folder in a work folder where outputs go instead of being deleted (see set_aside).
TRASH = "trash"


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _status_kb(pid: int, key: str) -> int:
    """A ``kB`` figure of ``/proc/PID/status``; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and the ones they started, and so on."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
                    children = [int(child) for child in f.read().split()]
                found += children
                stack += children
    return found


class DescendantsRss:
    """Peak of the summed RSS of this process's descendants (the parsing workers and
    multiprocessing's resource tracker), sampled every 50 ms while in a ``with``."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            total = sum(_status_kb(pid, "VmRSS:") for pid in _descendants(os.getpid()))
            self.peak_mb = max(self.peak_mb, total / 1024)

    def __enter__(self) -> DescendantsRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def walk(root: str) -> list[os.DirEntry[str]]:
    """Every file under ``root``: os.scandir, recursively."""
    files, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    files.append(entry)
    return files


def floor_stat(root: str) -> float:
    """Seconds to list the tree and stat every file: the least a rescan can do."""
    started = time.perf_counter()
    total = sum(entry.stat().st_size for entry in walk(root))
    assert total > 0
    return time.perf_counter() - started


def floor_parse(root: str) -> float:
    """Seconds to read every file and load its front matter with PyYAML's C loader."""
    started = time.perf_counter()
    for entry in walk(root):
        with open(entry.path, "rb") as f:
            text = f.read().decode("utf-8")
        front = text.split("---", 2)[1]
        meta = yaml.load(front, Loader=yaml.CSafeLoader)
        assert isinstance(meta, dict)
    return time.perf_counter() - started


def set_aside(path: Path, work: Path) -> None:
    """Move ``path`` (if any) into ``work``'s trash folder, which the runner deletes last.

    Deleting thousands of files makes the next files this VM creates several times
    slower, for a while and even after ``sync`` (10,000 pages: 4.1 s after the last
    run's were deleted, 0.66 s after they were moved aside). No figure should pay
    for the previous one's clean-up.
    """
    if path.exists():
        trash = work / TRASH
        trash.mkdir(exist_ok=True)
        path.rename(trash / f"{path.name}-{time.monotonic_ns()}")


def floor_create(sizes: list[int], work: Path) -> float:
    """Seconds to create one new file per size (temp file, then rename), as pages are."""
    from feeder.output import write_atomically

    folder = work / "create-floor"
    folder.mkdir(parents=True)
    os.sync()  # start from a quiet disk, as the cold refresh does
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        write_atomically(folder / f"{i:08d}.html", (b"x" * size,))
    seconds = time.perf_counter() - started
    set_aside(folder, work)
    return seconds


def refresh_config(work: Path, **images: Any) -> Any:
    from feeder.config import config_from_dict

    raw = {
        "paths": {"sources": "sources", "feeds": "feeds", "cache": "cache", "state": "state"},
        "site": {"base_url": "http://127.0.0.1:8080", "title": "bench"},
        "schedule": {"interval": 3600},
        "images": images or {"allowed_hosts": ["none.invalid"]},
    }
    return config_from_dict(raw, work)


async def refresh_suite(args: dict[str, Any]) -> dict[str, Any]:
    """Cold refresh (empty state), no-op refresh, one-change refresh, and their floors."""
    from bench.corpus import article_path, edit
    from feeder.refresh import open_refresher

    work = Path(args["work"])
    for name in ("state", "feeds", "cache"):
        set_aside(work / name, work)
    os.sync()  # the last run's disk work is not charged to the cold refresh
    config = refresh_config(work)
    sources = str(config.paths.sources)
    out: dict[str, Any] = {"rss_before_mb": peak_rss_mb()}
    out["floor_parse"] = floor_parse(sources)
    with open_refresher(config) as refresher:
        with DescendantsRss() as workers:
            started = time.perf_counter()
            cold = await refresher.refresh()
            out["cold"] = time.perf_counter() - started
        out["cold_rss_mb"] = peak_rss_mb()
        out["cold_workers_rss_mb"] = workers.peak_mb
        out["articles"] = cold.articles
        out["failed"] = cold.failed
        pages = [e.stat().st_size for e in walk(str(config.paths.feeds / "articles"))]
        out["floor_create"] = floor_create(pages, work)
        # A no-op refresh is the steady state: long after the last writes, so the disk is
        # quiet; it and its floor alternate, and each is the median of a few.
        os.sync()
        floors, noops = [], []
        for _ in range(NOOP_REPEATS):
            floors.append(floor_stat(sources))
            started = time.perf_counter()
            noop = await refresher.refresh()
            noops.append(time.perf_counter() - started)
            if noop.changed:
                raise RuntimeError(f"a no-op refresh changed {noop.changed} sources")
        out["floor_stat"] = statistics.median(floors)
        out["noop"] = statistics.median(noops)
        edit(article_path(config.paths.sources, args["n"] // 2))
        started = time.perf_counter()
        one = await refresher.refresh()
        out["one_change"] = time.perf_counter() - started
        out["one_change_changed"] = one.changed
        out["one_change_written"] = one.written
    return out


async def images(args: dict[str, Any]) -> dict[str, Any]:
    """feeder.images.fetch_images of ``count`` URLs from the mirror, into an empty cache."""
    from feeder.images import CachedImage, fetch_images

    work = Path(args["work"])
    cache = work / "cache"
    set_aside(cache, work)
    os.sync()
    config = refresh_config(
        work, origins={"https://img.cls.cn": args["mirror"]},
        concurrency=args["concurrency"], per_host=args["concurrency"],
        max_bytes=16 * 1024 * 1024, deadline=600, timeout=120, attempts=1,
    ).images
    urls = [f"https://img.cls.cn/images/b/{i:06d}.png" for i in range(args["count"])]
    before = peak_rss_mb()
    started = time.perf_counter()
    results = await fetch_images(urls, config, cache)
    seconds = time.perf_counter() - started
    ok = sum(isinstance(r, CachedImage) for r in results)
    errors = sorted({r.error for r in results if not isinstance(r, CachedImage)})[:3]
    set_aside(cache, work)
    return {"seconds": seconds, "fetched": ok, "errors": errors,
            "rss_before_mb": before, "rss_mb": peak_rss_mb()}


async def bare_images(args: dict[str, Any]) -> dict[str, Any]:
    """The same requests with a plain aiohttp session, bodies read and dropped: no disk.

    With ``write``, each body is written to a new file instead, once its connection
    is free, with feeder's own atomic write (temp file, then rename) and none of its
    checks, in a hand-off to a thread of its own: the simple way (feeder batches them).
    """
    import aiohttp

    from feeder.output import write_atomically

    sem = asyncio.Semaphore(args["concurrency"])
    connector = aiohttp.TCPConnector(limit=args["concurrency"])
    work = Path(args["work"])
    folder = work / "bare-cache"
    set_aside(folder, work)
    folder.mkdir(parents=True)
    os.sync()

    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with sem, session.get(f"{args['mirror']}/images/b/{i:06d}.png") as r:
                body = await r.read()
            if args.get("write"):  # its connection free, as feeder does
                await asyncio.to_thread(write_atomically, folder / f"{i:06d}.png", (body,))
            return len(body)

        started = time.perf_counter()
        sizes = await asyncio.gather(*(one(i) for i in range(args["count"])))
        seconds = time.perf_counter() - started
    set_aside(folder, work)
    return {"seconds": seconds, "fetched": sum(1 for s in sizes if s)}


COMMANDS = {"refresh": refresh_suite, "images": images, "bare-images": bare_images}


def main() -> None:
    command, raw = sys.argv[1], sys.argv[2]
    result = asyncio.run(COMMANDS[command](json.loads(raw)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
