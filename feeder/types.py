"""Domain records: frozen dataclasses passed between the stages of a refresh."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Article:
    """One published article, as parsed from a source file."""

    #: Path relative to ``sources/``, with ``/`` separators; the article's identity.
    path: str
    #: Stable id derived from ``path`` (never from content): file names and guids use it.
    id: str
    #: Title, from front matter or the file name.
    title: str
    #: Body as sanitized HTML, with original image URLs.
    content: str
    #: Plain-text opening of the body, for RSS ``description``.
    summary: str
    #: When it was published (timezone-aware).
    published: datetime
    #: When it was last updated (timezone-aware), if the source says.
    updated: datetime | None = None
    #: Categories, in the source's order, deduplicated.
    categories: tuple[str, ...] = ()
    #: Tags, in the source's order, deduplicated.
    tags: tuple[str, ...] = ()
    #: Author's name.
    author: str | None = None
    #: The source's own link (``link``/``url``/``permalink``), if any.
    link: str | None = None
    #: Header image URL (``headimg``): the item's enclosure.
    headimg: str | None = None
    #: Thumbnail image URL.
    thumbnail: str | None = None
    #: Every image URL the article references (body, headimg, thumbnail), deduplicated.
    images: tuple[str, ...] = ()
    #: Problems that did not stop publishing, one line each.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def last_change(self) -> datetime:
        """The date feeds are dated by: ``updated`` (if not before ``published``), else
        ``published``."""
        return max(self.updated, self.published) if self.updated else self.published


@dataclass(frozen=True)
class SourceFile:
    """A file under ``sources/`` as seen by a scan (no content read)."""

    #: Path relative to ``sources/``, with ``/`` separators.
    path: str
    #: Size in bytes.
    size: int
    #: Modification time in nanoseconds.
    mtime_ns: int


#: ``(size, mtime_ns)`` of source files by path: what a rescan compares.
SourceStats = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class CachedImageInfo:
    """A cached image as the feed builder needs it."""

    #: File name in the cache folder.
    name: str
    #: Size in bytes.
    size: int
    #: MIME type, from the image's magic bytes.
    mime: str
