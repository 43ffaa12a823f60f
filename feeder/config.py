"""Configuration: ``config.yaml`` read into frozen dataclasses, validated at start.

Every key is optional. A wrong key or value raises :class:`ConfigError` naming the
dotted key, so the user knows exactly what to fix. Paths are relative to the
folder of the config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import reprlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit
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
    #: Language of the articles (a BCP 47 tag): readers pick fonts by it, Han glyphs too.
    language: str = "zh-CN"

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
#: Folders feeder deletes files in (``gc``, a refresh): neither may hold the config file.
_EMPTIED_PATHS = ("feeds", "cache")

#: Largest value of a number setting not named in :data:`_MAXIMUM`: what SQLite holds.
_LARGEST = 2**63 - 1
#: Largest sensible value of number settings; every number must also be above 0.
_MAXIMUM: dict[str, int] = {
    "server.port": 65535,
    "schedule.interval": 365 * 24 * 3600,  # a year
    "images.deadline": 24 * 3600,
    "images.timeout": 24 * 3600,
}
#: Longest slug from ``feeds.slugs``, in characters and in UTF-8 bytes: a file name has at
#: most 255, and a slug two categories share gets a suffix of up to 41 characters.
_SLUG_MAX_CHARS = 100
SLUG_MAX_BYTES = 200
#: Characters a slug may not hold: path separators, and what DESIGN.md keeps out of URLs.
_SLUG_FORBIDDEN = "/\\%#?"


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
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError("", f"{where}: invalid YAML: {problem}") from e
    except ValueError as e:  # a date like 2022-02-30
        raise ConfigError("", f"{file}: invalid YAML: {e}") from e
    try:  # an empty file is all defaults; `[]` or `false` is no config
        return config_from_dict({} if raw is None else raw, file.resolve().parent)
    except ConfigError as e:
        raise ConfigError(e.key, e.problem, file=str(file)) from e.__cause__


def config_from_dict(raw: Any, root: Path) -> Config:
    """Build a :class:`Config` from parsed YAML; relative paths resolve against ``root``."""
    _expect(raw, dict, "", "a mapping of sections")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(str(key), f"unknown section (known: {', '.join(_SECTIONS)})")
    sections = {}
    for name, cls in _SECTIONS.items():
        value = raw.get(name)
        if value is None:  # `server:` with nothing under it: the defaults
            value = {}
        _expect(value, dict, name, "a mapping")
        sections[name] = _build_section(name, cls, value, root)
    site, feeds = sections["site"], sections["feeds"]
    base_url = site.base_url
    if (raw.get("site") or {}).get("base_url") is None:  # where `feeder run` serves
        base_url = served_url(sections["server"])
    sections["site"] = dataclasses.replace(
        site, base_url=base_url.rstrip("/"), title=_name("site.title", site.title)
    )
    sections["feeds"] = dataclasses.replace(
        feeds, default_category=_name("feeds.default_category", feeds.default_category)
    )
    config = Config(**sections)
    _check(config, root.resolve())
    # Every link is built on it: as a URI, since RSS forbids raw non-ASCII URLs.
    try:
        site = dataclasses.replace(config.site, base_url=iri_to_uri(config.site.base_url))
    except ValueError as e:
        raise ConfigError("site.base_url", f"{config.site.base_url!r}: {e}") from e
    feeds = dataclasses.replace(config.feeds, slugs=_named_slugs(config.feeds.slugs))
    return dataclasses.replace(config, site=site, feeds=feeds)


def served_url(server: ServerConfig) -> str:
    """The URL `feeder run` serves at, as this machine reaches it: ``site.base_url``'s
    default. (A server listening on every address is reached at 127.0.0.1.)"""
    host = server.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{server.port}"


def _build_section(name: str, cls: type, raw: dict[str, Any], root: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(_dotted(name, key), f"unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    if cls is PathsConfig:
        for key, default in _DEFAULT_PATHS.items():
            value = raw.get(key, default)
            _expect(value, str, f"paths.{key}", "a path")
            if "\0" in value:
                raise ConfigError(f"paths.{key}", f"{value!r} holds a NUL character")
            # sources/ is followed through a symlink at each scan (a deploy may swap
            # it); the folders feeder writes and serves are resolved once.
            path = root / value
            values[key] = Path(os.path.abspath(path)) if key == "sources" else path.resolve()
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
            largest = _MAXIMUM.get(dotted, _LARGEST)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= largest:
                raise ConfigError(dotted, f"must be a whole number from 1 to {_shown(largest)}, "
                                          f"not {reprlib.repr(value)}")
        elif isinstance(default, float):
            largest = _MAXIMUM.get(dotted, _LARGEST)
            # Compared before float(): a huge YAML int overflows it. NaN fails any comparison.
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 < value <= largest):
                raise ConfigError(dotted, f"must be a finite number above 0 and at most "
                                          f"{_shown(largest)}, not {reprlib.repr(value)}")
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
                _expect(v, str, _dotted(dotted, k), "a string")
            value = {str(k): v for k, v in value.items()}
        values[key] = value
    return cls(**values)


def _check(config: Config, root: Path) -> None:
    """Cross-field checks that a type alone cannot express; ``root``: the config's folder."""
    _check_paths(config.paths, root)
    try:
        ZoneInfo(config.site.timezone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError("site.timezone", f"unknown time zone {config.site.timezone!r}") from e
    _check_url("site.base_url", config.site.base_url)
    if not _LANGUAGE_TAG.fullmatch(config.site.language):
        raise ConfigError("site.language", f"{config.site.language!r} is not a language tag "
                                           "such as zh-CN or en")
    for i, host in enumerate(config.images.allowed_hosts):
        if not _is_host(host):
            raise ConfigError(f"images.allowed_hosts[{i}]", f"{host!r} is not a host name "
                              "such as img.cls.cn (no scheme, port, path or wildcard)")
    for origin, mirror in config.images.origins.items():
        _check_url(_dotted("images.origins", origin), origin)
        _check_url(_dotted("images.origins", origin), mirror)
    taken: dict[str, str] = {}  # by casefolded slug: a folder on a file system blind to case
    for name, slug in config.feeds.slugs.items():
        if problem := _slug_problem(slug):
            raise ConfigError(_dotted("feeds.slugs", name), f"{slug!r} is not a safe slug: "
                                                            f"{problem}")
        if (other := taken.setdefault(slug.casefold(), name)) != name:
            raise ConfigError(_dotted("feeds.slugs", name),
                              f"{slug!r} is also the slug of {other!r}: each feed needs its own")


def _check_paths(paths: PathsConfig, root: Path) -> None:
    """Refuse folders that overlap, as ``gc`` would delete sources kept in the cache.

    Paths are compared as resolved (symlinks followed), part by part.
    """
    folders = [(f"paths.{key}", getattr(paths, key).resolve()) for key in _DEFAULT_PATHS]
    for i, (key, folder) in enumerate(folders):
        for other_key, other in folders[:i]:
            if folder.is_relative_to(other) or other.is_relative_to(folder):
                raise ConfigError(key, f"must not be {other_key} or inside/around it "
                                       f"({folder} and {other})")
    for key in _EMPTIED_PATHS:
        folder = getattr(paths, key)
        if root.is_relative_to(folder):
            raise ConfigError(f"paths.{key}", f"must not be the config file's folder or "
                                              f"around it ({folder})")


#: A BCP 47 language tag, as far as its form goes: zh-CN, zh-Hans-CN, en, x-klingon.
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
#: Characters no host name holds, besides spaces and control characters.
_NOT_IN_HOST = frozenset("/\\:@?#*[]%,;")


def _is_host(host: str) -> bool:
    """Is ``host`` a host name (any script), or an IPv4 or IPv6 address, as a URL's
    host gives it (no brackets)? Not a URL, a port, a wildcard or a list."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return (host.strip(".") != "" and host.isprintable()
            and not any(c.isspace() or c in _NOT_IN_HOST for c in host))


#: What :func:`iri_to_uri` leaves as it is besides letters, digits and ``_.-~``: URI
#: delimiters, and ``%`` (a URL's escapes are kept as they are).
_URI_SAFE = "!#$%&'()*+,/:;=?@[]"
#: ASCII characters a URI may not hold (RFC 3986).
_NOT_IN_URI = re.compile(r'[\x00-\x20\x7f"<>\\^`{|}]')
#: A URI's host (a name, an IPv4 or a bracketed IPv6 address) and optional port.
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]*)?")


def iri_to_uri(url: str) -> str:
    """An absolute URL as a URI: a non-ASCII host in IDNA, other characters that a URI
    may not hold (non-ASCII, spaces, ``"<>``...) percent-encoded. Nothing else is changed.

    Raises:
        ValueError: the host is not a valid domain name.
    """
    if url.isascii() and not _NOT_IN_URI.search(url):
        return url
    parts = urlsplit(url)
    userinfo, at, host_port = parts.netloc.rpartition("@")
    if not host_port.isascii():
        host, colon, port = host_port.partition(":")  # a non-ASCII host is no IPv6 address
        try:
            host_port = host.encode("idna").decode("ascii") + colon + port
        except UnicodeError as e:
            raise ValueError(f"{host!r} is not a valid host name") from e
    if not _HOST_PORT.fullmatch(host_port):  # a space, a quote: no encoding makes it a host
        raise ValueError(f"{host_port!r} is not a valid host")
    netloc = quote(f"{userinfo}{at}", safe=_URI_SAFE) + host_port
    rest = urlunsplit(("", "", parts.path, parts.query, parts.fragment))
    return f"{parts.scheme}://{netloc}{quote(rest, safe=_URI_SAFE)}"


def _check_url(key: str, url: str) -> None:
    """Refuse anything but an absolute http(s) URL with a host and a usable port."""
    if any(c.isspace() or _is_control(c) for c in url):
        raise ConfigError(key, f"{url!r} is not an absolute http(s) URL: "
                               "it holds whitespace or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise ConfigError(key, f"{url!r} is not an absolute http(s) URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{url!r} is not an absolute http(s) URL")
    if port == 0:
        raise ConfigError(key, f"{url!r} is not an absolute http(s) URL: port 0")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(key, f"{url!r} is not an absolute http(s) URL: "
                               "it has a query or fragment, which would end every link")


def _name(key: str, name: str) -> str:
    """A title or category name, as sources' category names are: one line, spaces collapsed.

    Feeds show it: a character XML forbids would fail every refresh, not just load.
    """
    if any(_is_control(c) or c in "\ufffe\uffff" for c in name):
        raise ConfigError(key, f"{name!r} holds a control character or one XML forbids")
    collapsed = nfc(" ".join(name.split()))
    if not collapsed:
        raise ConfigError(key, "must not be empty")
    return collapsed


def _named_slugs(slugs: dict[str, str]) -> dict[str, str]:
    """``feeds.slugs`` by category names as sources give them (spaces, composed form)."""
    named: dict[str, str] = {}
    for name, slug in slugs.items():
        key = nfc(" ".join(name.split()))
        if key in named:
            raise ConfigError(_dotted("feeds.slugs", name),
                              f"the same category as {key!r}, written otherwise")
        named[key] = slug
    return named


def nfc(text: str) -> str:
    """``text`` in Unicode's composed form (NFC): "é" typed either way is one "é"."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _slug_problem(slug: str) -> str | None:
    """Why ``slug`` cannot be one folder name in a feed's URL; None if it can.

    :func:`feeder.feeds.slugify` makes only letters, digits, marks and ``-``; a
    slug given in config may hold more (spaces, ``.`` inside), never a second
    path segment, a hidden folder or a character a URL or file name chokes on.
    """
    if not slug.strip(" "):
        return "empty"
    if slug.startswith("."):
        return "starts with a dot"
    if slug != slug.strip(" "):
        return "starts or ends with a space"
    if any(c in _SLUG_FORBIDDEN for c in slug):
        return f"holds one of {' '.join(_SLUG_FORBIDDEN)}"
    if any(_is_control(c) or (c.isspace() and c != " ") for c in slug):
        return "holds a control character or whitespace other than a space"
    if len(slug) > _SLUG_MAX_CHARS or len(slug.encode("utf-8")) > SLUG_MAX_BYTES:
        return f"longer than {_SLUG_MAX_CHARS} characters or {SLUG_MAX_BYTES} bytes"
    return None


def _shown(largest: int) -> str:
    return "2**63 - 1" if largest == _LARGEST else str(largest)


def _is_control(char: str) -> bool:
    """C0, DEL, C1 (NUL, tab and newline included), or a lone surrogate."""
    return unicodedata.category(char) in ("Cc", "Cs")


def _dotted(section: str, key: Any) -> str:
    """``section.key``; an odd key (newline, control character) in its quoted form."""
    text = str(key)
    if any(_is_control(c) or (c.isspace() and c != " ") for c in text):
        text = repr(text)
    return f"{section}.{text}"


def _expect(value: Any, kind: type, key: str, what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(key, f"must be {what}, not {type(value).__name__} {value!r}")
