"""The one error tree of feeder: every error a user can cause is a FeederError."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feeder.config import Config


#: Longest reason an image failed for that is kept, in characters.
_MAX_REASON = 300
#: Control characters: escaped in a path shown.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable_path(path: str) -> str:
    """A path as text that can be printed and stored: bytes that are not UTF-8, and
    control characters (a newline would forge a line of output), as ``\\xNN``."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROLS.sub(lambda char: f"\\x{ord(char[0]):02x}", text)


def one_line(text: str, limit: int = _MAX_REASON) -> str:
    """``text`` with each run of whitespace (line ends too) one space, cut to ``limit``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FeederError(Exception):
    """Base of every error feeder raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: What went wrong, in one line.
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(FeederError):
    """The configuration is invalid; ``key`` names the offending key, ``file`` its file."""

    def __init__(self, key: str, message: str, file: str = "") -> None:
        super().__init__(": ".join(part for part in (file, key, message) if part))
        #: The dotted config key, e.g. ``images.max_bytes``; empty for the file itself.
        self.key = key
        #: What is wrong with it.
        self.problem = message


class SourceError(FeederError):
    """A source file is not an article we can publish."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        shown = printable_path(path)
        where = f"{shown}:{line}" if line else shown
        super().__init__(f"{where}: {reason}")
        #: The path relative to ``sources/``.
        self.path = path
        #: Why it was refused, without the path.
        self.reason = reason
        #: The 1-based line of the problem, when known.
        self.line = line

    @property
    def located_reason(self) -> str:
        """The reason with its line when known (``line 3: ...``), as the store keeps it."""
        return self.reason if self.line is None else f"line {self.line}: {self.reason}"

    def __reduce__(self) -> tuple[type[SourceError], tuple[str, str, int | None]]:
        # From a parsing worker process: pickled by its arguments, not by its message.
        return type(self), (self.path, self.reason, self.line)


class ImageError(FeederError):
    """An image could not be fetched or cached."""

    def __init__(self, url: str, reason: str, *, permanent: bool = False,
                 retry_after: float | None = None) -> None:
        # aiohttp's messages may quote the server's answer, over several lines.
        reason = one_line(reason)
        super().__init__(f"{url}: {reason}")
        #: The image's original URL.
        self.url = url
        #: Why it failed, without the URL: one line.
        self.reason = reason
        #: True when retrying within this refresh is pointless (404, not an image...).
        self.permanent = permanent
        #: Seconds the server asked us to wait (``Retry-After``), if any.
        self.retry_after = retry_after


class PathError(FeederError):
    """A file or folder the user controls is unusable: a file for a folder, no permission..."""

    def __init__(self, path: str, reason: str, key: str = "") -> None:
        super().__init__(f"{path}: {reason} ({key})" if key else f"{path}: {reason}")
        #: The file or folder at fault.
        self.path = path
        #: What is wrong with it, as the system says (``Not a directory``).
        self.reason = reason
        #: The config key of the folder it is in (``paths.feeds``), if it is in one.
        self.key = key


def known_error(error: Exception, config: Config) -> FeederError | None:
    """``error`` as one line a user can act on, or None for a bug (it keeps its traceback).

    That is feeder's own errors, a system error about a file the user controls
    (:func:`path_error`), and a state database that is damaged or cannot be written.
    """
    if isinstance(error, FeederError):
        return error
    if isinstance(error, OSError):
        return path_error(error, config)
    # Not the errors of a wrong query (ProgrammingError, IntegrityError): those are bugs.
    if isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError:
        return StoreError(f"{config.database}: {error} (paths.state; once deleted, the "
                          "next refresh rebuilds it)")
    return None


def failure_reason(error: Exception, config: Config) -> str:
    """Why ``error`` failed a refresh, in one line.

    :func:`known_error`'s line; or for a bug (logged with its traceback by whoever
    caught it) its type and message, as a traceback ends: ``KeyError: 'title'``.
    """
    known = known_error(error, config)
    if known is not None:
        return str(known)
    return type_and_message(error)


def type_and_message(error: Exception) -> str:
    """An error's type and message, as a traceback ends: ``KeyError: 'title'``."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def path_error(error: OSError, config: Config) -> PathError | None:
    """``error`` as a :class:`PathError` if it is about a file the user controls, else None.

    Those are files in the configured folders, or folders above one of them (making
    it failed). An error about another file, or about none, is not the user's to fix
    in the config: a bug or a system problem, which keeps its traceback.
    """
    if not isinstance(error.filename, str | bytes | os.PathLike) or not error.strerror:
        return None
    named = Path(os.path.abspath(os.fsdecode(error.filename)))
    key = ""  # of the folder it is in: config keeps them from nesting, so there is one
    above = False
    for field in dataclasses.fields(config.paths):
        folder = getattr(config.paths, field.name)
        # As configured, and with symlinks resolved (the output folder resolves them).
        for file, root in ((named, Path(os.path.abspath(folder))),
                           (Path(os.path.realpath(named)), Path(os.path.realpath(folder)))):
            if file.is_relative_to(root):
                key = f"paths.{field.name}"
            above = above or root.is_relative_to(file)
    if not key and not above:
        return None
    path, reason = named, error.strerror
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        # A folder that is a file, or a path through a file: name that file.
        for step in (*reversed(named.parents), named):
            if step.exists() and not step.is_dir():
                path, reason = step, os.strerror(errno.ENOTDIR)
                break
    return PathError(str(path), reason, key)


class StoreError(FeederError):
    """The state database failed."""


class LockedError(FeederError):
    """Another process holds the refresh lock."""


class DaemonRunningError(FeederError):
    """Another daemon holds the daemon lock of this ``paths.state``."""


class RefreshAbandoned(FeederError):
    """A refresh was stopped part-way (shutdown); what it had done is kept."""
