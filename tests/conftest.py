"""Shared fixtures: a config whose every path is under ``tmp_path``, and source files.

Images never reach the network: ``https://img.cls.cn`` is mapped to port 9 on
loopback, where nothing listens, so every fetch fails at once and an image simply
stays pending (one attempt, no back-off sleep).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from feeder.config import Config, config_from_dict

_REPO = Path(__file__).resolve().parents[1]
#: The reference article (HTML body, Hexo front matter), as shipped with the project.
SEED_PATH = _REPO / "sources" / "cls-seed.md"
SEED_TEXT = SEED_PATH.read_text(encoding="utf-8")

#: Where ``https://img.cls.cn`` is fetched from in tests: a closed loopback port.
UNREACHABLE_MIRROR = "http://127.0.0.1:9"

#: The config every test starts from; paths are relative to ``tmp_path``.
BASE_CONFIG: dict[str, Any] = {
    "paths": {"sources": "sources", "feeds": "feeds", "cache": "cache", "state": "state"},
    "site": {"base_url": "http://feeds.example.test", "title": "Test feeds"},
    "images": {
        "origins": {"https://img.cls.cn": UNREACHABLE_MIRROR},
        "attempts": 1,
        "timeout": 2,
        "deadline": 5,
    },
}


def config_dict(**overrides: dict[str, Any]) -> dict[str, Any]:
    """:data:`BASE_CONFIG` with ``overrides`` merged in, section by section."""
    raw = copy.deepcopy(BASE_CONFIG)
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_config(tmp_path: Path, **overrides: dict[str, Any]) -> Config:
    """A validated Config with every folder under ``tmp_path``.

    ``make_config(tmp_path, feeds={"items": 3})`` changes ``feeds.items`` only.
    """
    return config_from_dict(config_dict(**overrides), tmp_path)


def write_config_file(tmp_path: Path, **overrides: dict[str, Any]) -> Path:
    """Write ``tmp_path/config.yaml`` (same content as :func:`make_config`); return its path."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(**overrides), allow_unicode=True),
                    encoding="utf-8")
    return path


def write_source(config: Config, relpath: str, content: str | bytes,
                 mtime: float | None = None) -> Path:
    """Write a file under ``paths.sources`` (creating folders); ``str`` is written as UTF-8."""
    path = config.paths.sources / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def article_text(title: str | None = "An article", body: str = "Body text.",
                 **front: Any) -> str:
    """A small source file: YAML front matter (``title`` plus ``front``) and a body."""
    meta = {"title": title, **front} if title is not None else dict(front)
    dumped = yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) if meta else ""
    return f"---\n{dumped}---\n{body}\n"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The default test config (sources/, feeds/, cache/, state/ under ``tmp_path``)."""
    return make_config(tmp_path)


@pytest.fixture
def seed_text() -> str:
    return SEED_TEXT


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    """``config_factory(feeds={...})``: :func:`make_config` bound to this test's ``tmp_path``."""
    return lambda **overrides: make_config(tmp_path, **overrides)


def make_unlistable_folder(root: Path) -> Path:
    """A folder under ``root`` that cannot be listed, even by root: its path is too long.

    Made one level at a time from the folder above, as no path to it may be used.
    """
    name, depth = "d" * 255, os.pathconf(root, "PC_PATH_MAX") // 256 + 1
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return root.joinpath(*[name] * depth)


def spawned_children(pid: int) -> set[int]:
    """The processes ``pid`` started with multiprocessing's spawn (its parsing workers)."""
    children: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            children |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text()
                         .split()}
    found = set()
    for child in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
    return found


def wait_for_workers(pid: int, count: int, ended: Callable[[], object]) -> set[int]:
    """Wait (30 s at most) until ``pid`` runs ``count`` spawned workers; fail if ``ended()``."""
    for _ in range(3000):
        workers = spawned_children(pid)
        if len(workers) >= count:
            return workers
        if ended() is not None:
            break
        time.sleep(0.01)
    pytest.fail(f"process {pid} never ran {count} worker processes")


def running(pid: int) -> bool:
    """Is ``pid`` a process still running (not ended, nor a zombie waiting to be reaped)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
