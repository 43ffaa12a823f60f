"""Configuration: ``config.yaml`` read into frozen dataclasses, validated at start.

Every key is optional. A wrong key or value raises :class:`ConfigError` naming the
dotted key, so the user knows exactly what to fix. Paths are relative to the
folder of the config file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from feeder.exceptions import ConfigError

#: Environment variable naming the config file when ``--config`` is not given.
CONFIG_ENV = "FEEDER_CONFIG"
DEFAULT_CONFIG = "config.yaml"


@dataclass(frozen=True)
class PathsConfig:
    #: Folder of article files.
    sources: Path
    #: Folder the feeds are written to.
    feeds: Path
    #: Folder of cached images.
    cache: Path
    #: Folder of the state database, lock and control socket.
    state: Path


@dataclass(frozen=True)
class SiteConfig:
    #: Absolute URL the published files are reached at, without trailing slash.
    base_url: str = "http://127.0.0.1:8080"
    #: Title of the site; feed titles are built from it.
    title: str = "feeder"
    #: Zone of dates written without an offset.
    timezone: str = "Asia/Shanghai"
    #: Domain used in ``tag:`` ids; never derived from ``base_url`` so moving
    #: the site does not change any id.
    id_authority: str = "feeder.invalid,2022"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class ServerConfig:
    #: Address the daemon listens on.
    host: str = "127.0.0.1"
    #: Port the daemon listens on.
    port: int = 8080


@dataclass(frozen=True)
class ScheduleConfig:
    #: Seconds between two scheduled refreshes.
    interval: int = 900
    #: Also refresh when a file under ``sources/`` changes.
    watch: bool = False


@dataclass(frozen=True)
class FeedsConfig:
    #: How many items each feed holds, newest first.
    items: int = 50
    #: Category name to slug, overriding the derived slug.
    slugs: dict[str, str] = field(default_factory=dict)
    #: Category of an article that names none.
    default_category: str = "Uncategorized"


@dataclass(frozen=True)
class SourcesConfig:
    #: Largest source file read, in bytes.
    max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class ImagesConfig:
    #: Hosts images are fetched from; others keep their URL.
    allowed_hosts: tuple[str, ...] = ("img.cls.cn",)
    #: Origin (``https://img.cls.cn``) to mirror base URL (``http://127.0.0.1:9000``).
    origins: dict[str, str] = field(default_factory=dict)
    #: Downloads in flight at once, overall.
    concurrency: int = 16
    #: Downloads in flight at once, per host.
    per_host: int = 8
    #: Largest image accepted, in bytes.
    max_bytes: int = 10 * 1024 * 1024
    #: Seconds a refresh waits for images before it publishes anyway.
    deadline: float = 60.0
    #: Seconds one download may take, connecting included.
    timeout: float = 30.0
    #: Attempts per image within one refresh (connection errors, 5xx, 429).
    attempts: int = 3


@dataclass(frozen=True)
class Config:
    paths: PathsConfig
    site: SiteConfig = SiteConfig()
    server: ServerConfig = ServerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    feeds: FeedsConfig = FeedsConfig()
    sources: SourcesConfig = SourcesConfig()
    images: ImagesConfig = ImagesConfig()

    @property
    def database(self) -> Path:
        return self.paths.state / "feeder.sqlite"

    @property
    def lock_file(self) -> Path:
        return self.paths.state / "refresh.lock"

    @property
    def control_socket(self) -> Path:
        return self.paths.state / "control.sock"


_SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "site": SiteConfig,
    "server": ServerConfig,
    "schedule": ScheduleConfig,
    "feeds": FeedsConfig,
    "sources": SourcesConfig,
    "images": ImagesConfig,
}
_DEFAULT_PATHS = {"sources": "sources", "feeds": "feeds", "cache": "cache", "state": "state"}


def config_path(given: str | os.PathLike[str] | None) -> Path:
    """The config file to read: ``--config``, else ``$FEEDER_CONFIG``, else ./config.yaml."""
    return Path(given or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; a missing default file means all defaults."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path is not None or os.environ.get(CONFIG_ENV):
            raise ConfigError("", f"{file}: no such config file") from None
        text = ""
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("", f"{file}: cannot read: {e}") from e
    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError("", f"{file}: invalid YAML: {e}") from e
    return config_from_dict(raw or {}, file.resolve().parent)


def config_from_dict(raw: Any, root: Path) -> Config:
    """Build a :class:`Config` from parsed YAML; relative paths resolve against ``root``."""
    _expect(raw, dict, "", "a mapping of sections")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(str(key), f"unknown section (known: {', '.join(_SECTIONS)})")
    sections = {}
    for name, cls in _SECTIONS.items():
        value = raw.get(name) or {}
        _expect(value, dict, name, "a mapping")
        sections[name] = _build_section(name, cls, value, root)
    sections["site"] = dataclasses.replace(
        sections["site"], base_url=sections["site"].base_url.rstrip("/")
    )
    config = Config(**sections)
    _check(config)
    return config


def _build_section(name: str, cls: type, raw: dict[str, Any], root: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    if cls is PathsConfig:
        for key, default in _DEFAULT_PATHS.items():
            value = raw.get(key, default)
            _expect(value, str, f"paths.{key}", "a path")
            values[key] = (root / value).resolve()
        return cls(**values)
    defaults = cls()
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        default = getattr(defaults, key)
        if value is None:
            continue
        if isinstance(default, bool):
            _expect(value, bool, dotted, "true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(dotted, f"must be a positive whole number, not {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(dotted, f"must be a positive number, not {value!r}")
            value = float(value)
        elif isinstance(default, str):
            _expect(value, str, dotted, "a string")
        elif isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            _expect(value, list, dotted, "a list of strings")
            for item in value:
                _expect(item, str, dotted, "a list of strings")
            value = tuple(value)
        elif isinstance(default, dict):
            _expect(value, dict, dotted, "a mapping of strings to strings")
            for k, v in value.items():
                _expect(v, str, f"{dotted}.{k}", "a string")
            value = {str(k): v for k, v in value.items()}
        values[key] = value
    return cls(**values)


def _check(config: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    try:
        ZoneInfo(config.site.timezone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError("site.timezone", f"unknown time zone {config.site.timezone!r}") from e
    base = urlsplit(config.site.base_url)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise ConfigError("site.base_url", "must be an absolute http(s) URL")
    if not 0 < config.server.port < 65536:
        raise ConfigError("server.port", "must be between 1 and 65535")
    for origin, mirror in config.images.origins.items():
        for key, url in ((origin, origin), (origin, mirror)):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"images.origins.{key}", f"{url!r} is not an absolute URL")
    for name, slug in config.feeds.slugs.items():
        if not slug or "/" in slug or slug.startswith(".") or any(c in slug for c in "%#?\\"):
            raise ConfigError(f"feeds.slugs.{name}", f"{slug!r} is not a safe slug")


def _expect(value: Any, kind: type, key: str, what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(key, f"must be {what}, not {type(value).__name__} {value!r}")
