"""The one error tree of feeder: every error a user can cause is a FeederError."""

from __future__ import annotations


class FeederError(Exception):
    """Base of every error feeder raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: What went wrong, in one line.
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(FeederError):
    """The configuration is invalid; ``key`` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        #: The dotted config key, e.g. ``images.max_bytes``; empty for the file itself.
        self.key = key


class SourceError(FeederError):
    """A source file is not an article we can publish."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")
        #: The path relative to ``sources/``.
        self.path = path
        #: Why it was refused, without the path.
        self.reason = reason
        #: The 1-based line of the problem, when known.
        self.line = line


class ImageError(FeederError):
    """An image could not be fetched or cached."""

    def __init__(self, url: str, reason: str, *, permanent: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{url}: {reason}")
        #: The image's original URL.
        self.url = url
        #: Why it failed, without the URL.
        self.reason = reason
        #: True when retrying within this refresh is pointless (404, not an image...).
        self.permanent = permanent
        #: Seconds the server asked us to wait (``Retry-After``), if any.
        self.retry_after = retry_after


class StoreError(FeederError):
    """The state database failed."""


class LockedError(FeederError):
    """Another process holds the refresh lock."""


class DaemonRunningError(FeederError):
    """Another daemon holds the daemon lock of this ``paths.state``."""


class RefreshAbandoned(FeederError):
    """A refresh was stopped part-way (shutdown); what it had done is kept."""
