"""``python -m bench [--n 10000] [--runs 3] [--quick]``: measure feeder, print one table.

Every figure is the median of ``--runs`` runs, set against a baseline measured in the
same invocation. Heavy work runs in child processes (``bench.child``, the daemon, the
bare handler, wrk), so peak RSS figures are each process's own. Results are also
written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.corpus import generate
from bench.imageserver import ImageServer

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
PYTHON = sys.executable
#: Image fetch: 64 connections, 10 ms + 0–20 ms per image.
IMAGE_CONCURRENCY = 64
IMAGE_LATENCY = 0.010
IMAGE_JITTER = 0.020
#: Row names, in order; ``{n}`` is the corpus size. The smoke test checks each is printed.
ROW_NAMES = (
    "cold refresh",
    "no-op refresh",
    "one-change refresh",
    "peak RSS, cold refresh",
    "image fetch",
    "image peak RSS, 20 KB",
    "image peak RSS, 2 MB",
    "/healthz during cold refresh",
    "/feeds/all/rss.xml during cold refresh",
    "serve feed, 200",
    "serve feed, 304",
)


@dataclass
class Row:
    name: str
    value: str
    baseline: str
    ratio: str
    target: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return "—" if self.met is None else ("met" if self.met else "MISSED")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_child(command: str, **args: Any) -> dict[str, Any]:
    """``python -m bench.child command args``; its last stdout line, as JSON."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.child", command, json.dumps(args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.child {command} failed:\n{err.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- refresh ----------------------------------------------------------------------------


async def bench_refresh(work: Path, n: int, runs: int) -> dict[str, Any]:
    log(f"corpus of {n} articles")
    shutil.rmtree(work, ignore_errors=True)
    await asyncio.to_thread(generate, work / "sources", n)
    results = []
    for run in range(runs):
        log(f"refresh suite N={n}, run {run + 1}/{runs}")
        results.append(await run_child("refresh", work=str(work), n=n))
        if results[-1]["articles"] != n:
            raise RuntimeError(f"refresh published {results[-1]['articles']} of {n} articles")
    keys = ("floor_parse", "floor_create", "cold", "floor_stat", "noop", "one_change",
            "cold_rss_mb", "cold_workers_rss_mb", "rss_before_mb")
    summary = {k: median([r[k] for r in results]) for k in keys}
    summary["one_change_ratio"] = median([r["one_change"] / r["cold"] for r in results])
    summary["cold_ratio"] = median([r["cold"] / r["floor_parse"] for r in results])
    summary["noop_ratio"] = median([r["noop"] / r["floor_stat"] for r in results])
    return {"n": n, "runs": results, "median": summary}


def refresh_rows(result: dict[str, Any]) -> list[Row]:
    m, n = result["median"], result["n"]
    rss = m["cold_rss_mb"] + m["cold_workers_rss_mb"]  # a bound: their peaks may not meet
    return [
        Row(f"cold refresh (N={n})", f"{m['cold']:.2f} s",
            f"parse floor {m['floor_parse']:.3f} s (creating {n} pages alone: "
            f"{m['floor_create']:.2f} s)",
            f"{m['cold_ratio']:.1f}×", "≤ 3×", m["cold_ratio"] <= 3),
        Row(f"no-op refresh (N={n})", f"{m['noop'] * 1000:.1f} ms",
            f"stat floor {m['floor_stat'] * 1000:.1f} ms", f"{m['noop_ratio']:.1f}×", "≤ 2×",
            m["noop_ratio"] <= 2),
        Row(f"one-change refresh (N={n})", f"{m['one_change'] * 1000:.0f} ms",
            f"cold {m['cold']:.2f} s", f"{m['one_change_ratio'] * 100:.1f}%", "≤ 5%",
            m["one_change_ratio"] <= 0.05),
        Row(f"peak RSS, cold refresh (N={n})", f"{rss:.0f} MB",
            f"interpreter+imports {m['rss_before_mb']:.0f} MB; the refresh "
            f"{m['cold_rss_mb']:.0f} MB, its workers {m['cold_workers_rss_mb']:.0f} MB", "—",
            "≤ 200 MB", rss <= 200),
    ]


# -- images -----------------------------------------------------------------------------


async def bench_images(work: Path, count: int, big_count: int, runs: int) -> dict[str, Any]:
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    out: dict[str, Any] = {"count": count, "big_count": big_count, "runs": []}
    for run in range(runs):
        log(f"images, run {run + 1}/{runs}")
        entry: dict[str, Any] = {}
        async with ImageServer(IMAGE_LATENCY, IMAGE_JITTER, 20_000, seed=run) as server:
            for key, write in (("bare", False), ("bare_write", True)):
                entry[key] = await run_child("bare-images", work=str(work), mirror=server.url,
                                             count=count, concurrency=IMAGE_CONCURRENCY,
                                             write=write)
            server.requests, server.waited = 0, 0.0
            entry["small"] = await run_child("images", work=str(work), mirror=server.url,
                                             count=count, concurrency=IMAGE_CONCURRENCY)
            entry["mean_latency"] = server.mean_latency
        async with ImageServer(IMAGE_LATENCY, IMAGE_JITTER, 2_000_000, seed=run) as server:
            entry["big"] = await run_child("images", work=str(work), mirror=server.url,
                                           count=big_count, concurrency=IMAGE_CONCURRENCY)
        for key, wanted in (("small", count), ("big", big_count)):
            if entry[key]["fetched"] != wanted:
                raise RuntimeError(f"images {key}: {entry[key]['fetched']} of {wanted} "
                                   f"fetched: {entry[key]['errors']}")
        out["runs"].append(entry)
    runs_ = out["runs"]
    bound = IMAGE_CONCURRENCY / median([r["mean_latency"] for r in runs_])
    out["median"] = {
        "rate": median([count / r["small"]["seconds"] for r in runs_]),
        "bare_rate": median([count / r["bare"]["seconds"] for r in runs_]),
        "bare_write_rate": median([count / r["bare_write"]["seconds"] for r in runs_]),
        "bound": bound,
        "small_rss_mb": median([r["small"]["rss_mb"] for r in runs_]),
        "big_rss_mb": median([r["big"]["rss_mb"] for r in runs_]),
        "rss_before_mb": median([r["small"]["rss_before_mb"] for r in runs_]),
    }
    return out


def image_rows(result: dict[str, Any]) -> list[Row]:
    m = result["median"]
    share = m["rate"] / m["bound"]
    delta = m["big_rss_mb"] - m["small_rss_mb"]
    return [
        Row(f"image fetch ({result['count']} × 20 KB, 64 conns)", f"{m['rate']:.0f} img/s",
            f"bound {m['bound']:.0f}/s (bare client {m['bare_rate']:.0f}/s; "
            f"writing each in a thread of its own {m['bare_write_rate']:.0f}/s)",
            f"{share * 100:.0f}%", "≥ 90%", share >= 0.9),
        Row(f"image peak RSS, 20 KB ({result['count']})", f"{m['small_rss_mb']:.0f} MB",
            f"interpreter+imports {m['rss_before_mb']:.0f} MB", "—", "—", None),
        Row(f"image peak RSS, 2 MB ({result['big_count']})", f"{m['big_rss_mb']:.0f} MB",
            f"20 KB: {m['small_rss_mb']:.0f} MB", f"{delta:+.0f} MB", "within 30 MB",
            abs(delta) <= 30),
    ]


# -- daemon -----------------------------------------------------------------------------


class DaemonProcess:
    """``python -m feeder -c cfg run`` on a free port, with a small prior corpus."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = work / "config.yaml"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        raw = {
            "paths": {"sources": "sources", "feeds": "feeds", "cache": "cache",
                      "state": "state"},
            "site": {"base_url": self.url, "title": "bench"},
            "server": {"host": "127.0.0.1", "port": self.port},
            "schedule": {"interval": 86400, "watch": False},
            "images": {"allowed_hosts": ["none.invalid"]},
        }
        self.config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        self.log = await asyncio.to_thread(open, self.work / "daemon.log", "wb")
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "feeder", "-c", str(self.config), "run",
            stdout=self.log, stderr=self.log,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"daemon exited: see {self.work / 'daemon.log'}")
            try:
                async with session.get(f"{self.url}/healthz") as r:
                    if r.status == 200 and (await r.json()).get("last_refresh"):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("daemon did not finish its first refresh within 120 s")

    async def refresh(self) -> float:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "feeder", "-c", str(self.config), "refresh",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0 or not out.startswith(b"daemon:"):
            raise RuntimeError(f"feeder refresh: {out.decode()} {err.decode()[-2000:]}")
        return time.perf_counter() - started

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


async def poll(session: aiohttp.ClientSession, url: str, stop: asyncio.Event,
               hz: float = 20) -> list[float]:
    """Latencies (s) of GETs of ``url``, ~``hz`` a second, until ``stop`` is set."""
    times: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}: HTTP {r.status}")
        elapsed = time.perf_counter() - started
        times.append(elapsed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, 1 / hz - elapsed))
    return times


async def poll_while(session: aiohttp.ClientSession, base: str,
                     until: Callable[[], Any]) -> tuple[dict[str, list[float]], Any]:
    stop = asyncio.Event()
    paths = ("/healthz", "/feeds/all/rss.xml")
    pollers = [asyncio.create_task(poll(session, base + p, stop)) for p in paths]
    try:
        result = await until()
    finally:
        stop.set()
    lists = await asyncio.gather(*pollers)
    return dict(zip(paths, lists, strict=True)), result


async def bench_daemon(work: Path, n: int, prior: int, runs: int, wrk_seconds: float
                       ) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    log(f"daemon: corpus of {prior} + staged {n}")
    await asyncio.to_thread(generate, work / "sources" / "prior", prior, 7, n)
    await asyncio.to_thread(generate, work / "staging", n, 7, 0)
    daemon = DaemonProcess(work)
    out: dict[str, Any] = {"n": n, "prior": prior}
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            await daemon.start(session)
            idle, _ = await poll_while(session, daemon.url, lambda: asyncio.sleep(2))
            for folder in sorted((work / "staging").iterdir()):
                folder.rename(work / "sources" / folder.name)
            log(f"daemon: cold refresh of {n} articles while polling")
            busy, seconds = await poll_while(session, daemon.url, daemon.refresh)
            out["refresh_seconds"] = seconds
            out["idle"] = idle
            out["busy"] = busy
            out["serving"] = await bench_serving(session, daemon, runs, wrk_seconds)
        finally:
            await daemon.stop()
    return out


def latency_rows(result: dict[str, Any]) -> list[Row]:
    rows = []
    for path in ("/healthz", "/feeds/all/rss.xml"):
        busy, idle = result["busy"][path], result["idle"][path]
        p50, p99 = percentile(busy, 50) * 1000, percentile(busy, 99) * 1000
        rows.append(Row(
            f"{path} during cold refresh (N={result['n']}, {len(busy)} GETs)",
            f"p50 {p50:.1f} ms, p99 {p99:.0f} ms",
            f"idle p50 {percentile(idle, 50) * 1000:.1f} ms, "
            f"p99 {percentile(idle, 99) * 1000:.1f} ms",
            f"max {max(busy) * 1000:.0f} ms", "p99 ≤ 250 ms", p99 <= 250))
    return rows


# -- serving ----------------------------------------------------------------------------


async def load(url: str, seconds: float, etag: str | None) -> float:
    """Requests/s over 64 keep-alive connections: wrk when installed, else bench.loadgen."""
    if shutil.which("wrk"):
        command = ["wrk", "-t2", "-c64", f"-d{seconds:g}s", "--latency"]
        if etag:
            command += ["-H", f'If-None-Match: "{etag}"']
        proc = await asyncio.create_subprocess_exec(
            *command, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        text = out.decode()
        match = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if proc.returncode != 0 or match is None or "Non-2xx" in text:
            raise RuntimeError(f"wrk: {text} {err.decode()}")
        if etag and _bytes_per_request(text) > 1024:  # wrk counts a 200 as it does a 304
            raise RuntimeError(f"wrk: {url} answered with bodies, not 304s: {text}")
        return float(match.group(1))
    args = [url, str(seconds), "64"] + ([etag] if etag else [])
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.loadgen", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    result = json.loads(out.decode().splitlines()[-1])
    if set(result["statuses"]) != {"304" if etag else "200"}:  # JSON keys are text
        raise RuntimeError(f"bench.loadgen: {url} answered {result['statuses']}")
    return float(result["rps"])


def _bytes_per_request(wrk_output: str) -> float:
    """From wrk's "12345 requests in 20.00s, 1.50GB read"."""
    match = re.search(r"(\d+) requests in \S+, ([\d.]+)([KMGT]?)B read", wrk_output)
    if match is None:
        raise RuntimeError(f"wrk: no request count in {wrk_output}")
    scale = 1024 ** " KMGT".index(match[3] or " ")
    return float(match[2]) * scale / int(match[1])


async def bench_serving(session: aiohttp.ClientSession, daemon: DaemonProcess, runs: int,
                        seconds: float) -> dict[str, Any]:
    feed_url = f"{daemon.url}/feeds/all/rss.xml"
    # As wrk asks: not gzipped, so the tag is the plain copy's, which alone it revalidates.
    identity = {"Accept-Encoding": "identity"}
    async with session.get(feed_url, headers=identity) as r:
        body = await r.read()
        etag = r.headers["ETag"].strip('"')
        content_type = r.headers["Content-Type"]
    feed_file = daemon.work / "feeds" / "all" / "rss.xml"
    if feed_file.read_bytes() != body:
        raise RuntimeError("the feed served differs from the file")
    bare = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.bareapp", str(feed_file), etag, content_type,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert bare.stdout is not None
        bare_url = f"http://127.0.0.1:{int(await bare.stdout.readline())}/feeds/all/rss.xml"
        for url in (feed_url, bare_url):
            async with session.get(url, headers={**identity, "If-None-Match": f'"{etag}"'}) as r:
                if r.status != 304:
                    raise RuntimeError(f"{url}: If-None-Match gave {r.status}, not 304")
        samples: dict[str, list[float]] = {k: [] for k in
                                           ("feeder_200", "bare_200", "feeder_304", "bare_304")}
        tool = "wrk" if shutil.which("wrk") else "bench.loadgen"
        for run in range(runs):
            log(f"serving ({tool}), run {run + 1}/{runs}")
            for kind, tag in (("200", None), ("304", etag)):
                samples[f"feeder_{kind}"].append(await load(feed_url, seconds, tag))
                samples[f"bare_{kind}"].append(await load(bare_url, seconds, tag))
    finally:
        bare.send_signal(signal.SIGTERM)
        await bare.wait()
    return {"tool": tool, "bytes": len(body), "seconds": seconds, "samples": samples,
            "median": {k: median(v) for k, v in samples.items()}}


def serving_rows(result: dict[str, Any]) -> list[Row]:
    m, rows = result["median"], []
    for kind in ("200", "304"):
        share = m[f"feeder_{kind}"] / m[f"bare_{kind}"]
        size = f", {result['bytes'] // 1024} KB" if kind == "200" else ""
        rows.append(Row(f"serve feed, {kind} ({result['tool']}, 64 conns{size})",
                        f"{m[f'feeder_{kind}']:.0f} req/s",
                        f"bare aiohttp {m[f'bare_{kind}']:.0f} req/s", f"{share * 100:.0f}%",
                        "≥ 50%", share >= 0.5))
    return rows


# -- table ------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = ("figure", "feeder", "baseline", "ratio", "target", "verdict")
    cells = [head] + [(r.name, r.value, r.baseline, r.ratio, r.target, r.verdict) for r in rows]
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    lines.insert(1, "|" + "|".join(["---"] * len(head)) + "|")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="feeder-bench-"))
    started = time.perf_counter()
    n = args.n
    sizes = [n] if args.quick or n <= 1000 else [1000, n]
    results: dict[str, Any] = {}
    rows: list[Row] = []
    try:
        for size in sizes:
            results[f"refresh_{size}"] = r = await bench_refresh(root / f"r{size}", size,
                                                                 args.runs)
            rows += refresh_rows(r)
        count, big = (100, 20) if args.quick else (args.images, args.big_images)
        results["images"] = r = await bench_images(root / "images", count, big, args.runs)
        rows += image_rows(r)
        prior = 20 if args.quick else 200
        seconds = 1.0 if args.quick else args.seconds
        results["daemon"] = r = await bench_daemon(root / "daemon", n, prior, args.runs,
                                                   seconds)
        rows += latency_rows(r)
        rows += serving_rows(r["serving"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = table(rows)
    print(text)
    header = (f"N={n}, runs={args.runs}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, {time.perf_counter() - started:.0f} s")
    print(f"\n{header}")
    save(Path(args.out), {"args": vars(args), "header": header, "table": text,
                          "rows": [asdict(r) | {"verdict": r.verdict} for r in rows],
                          "results": results})
    return 0


def save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="articles (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny corpus, one run: checks the runner works, not speed")
    parser.add_argument("--images", type=int, default=10_000, help="20 KB images fetched")
    parser.add_argument("--big-images", type=int, default=200,
                        help="2 MB images fetched (default 200: more than the 64 in flight)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per load test")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.runs = 40, 1
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
