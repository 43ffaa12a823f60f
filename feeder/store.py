"""State in SQLite: sources seen, parsed articles, cached and failing images, refreshes.

The database is local and rebuildable from ``sources/``: deleting it costs one cold
refresh. Feeds are built from it, so a refresh never re-reads unchanged files.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feeder.exceptions import StoreError
from feeder.types import Article, CachedImageInfo, SourceFile, SourceStats

#: Bump with any change to _SCHEMA (a database of this version is not written on open),
#: and bring an older one up to date in _prepare.
_SCHEMA_VERSION = 3
#: ``next_attempt`` of an image never tried: due at once.
_DUE_NOW = "1970-01-01T00:00:00+00:00"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS articles (
    path TEXT PRIMARY KEY REFERENCES sources(path) ON DELETE CASCADE,
    published TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS article_categories (
    category TEXT NOT NULL,
    published TEXT NOT NULL,
    path TEXT NOT NULL REFERENCES articles(path) ON DELETE CASCADE,
    PRIMARY KEY (category, path)
);
CREATE INDEX IF NOT EXISTS article_categories_by_date
    ON article_categories (category, published DESC);
-- Deleting an article deletes its rows here (ON DELETE CASCADE): without this index,
-- by a scan of the table each, so storing every article again took quadratic time.
CREATE INDEX IF NOT EXISTS article_categories_by_path ON article_categories (path);
CREATE INDEX IF NOT EXISTS articles_by_date ON articles (published DESC);
CREATE TABLE IF NOT EXISTS article_images (
    url TEXT NOT NULL,
    path TEXT NOT NULL REFERENCES articles(path) ON DELETE CASCADE,
    PRIMARY KEY (url, path)
);
CREATE INDEX IF NOT EXISTS article_images_by_path ON article_images (path);
CREATE TABLE IF NOT EXISTS images (
    url TEXT PRIMARY KEY,
    name TEXT,
    size INTEGER,
    mime TEXT,
    fetched_at TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    next_attempt TEXT
);
CREATE INDEX IF NOT EXISTS images_due ON images (next_attempt) WHERE name IS NULL;
CREATE TABLE IF NOT EXISTS refreshes (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT NOT NULL,
    summary TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: Keys looked up per ``IN (...)`` query: far below SQLite's limit of parameters.
_KEYS_PER_QUERY = 500
#: An image some article still references.
_REFERENCED = "EXISTS (SELECT 1 FROM article_images r WHERE r.url = images.url)"
#: A row in ``images`` for each referenced URL that has none: due for its first attempt.
_NEW_IMAGES = (
    "INSERT OR IGNORE INTO images (url, next_attempt) SELECT DISTINCT url, ? FROM article_images"
)


@dataclass(frozen=True)
class FailingImage:
    """An image that could not be fetched yet."""

    #: Original URL.
    url: str
    #: The last error, one line.
    error: str
    #: Consecutive failures.
    failures: int
    #: When a refresh will try it again.
    next_attempt: datetime


class Store:
    """The state database. One connection; used by one thread at a time."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        #: The database file opened, to notice it deleted or replaced.
        self._identity = _file_identity(path)
        #: :meth:`source_stats` as last read, and the ``data_version`` it was read at;
        #: None once this connection wrote to ``sources``.
        self._source_stats: tuple[SourceStats, int] | None = None

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating if needed) the database at ``path``."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                _prepare(db, path)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as e:
            reason = str(e)
            code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
            if code == sqlite3.SQLITE_READONLY and not os.access(path.parent, os.W_OK):
                # Its write-ahead log's files go beside it, even to read (`feeder status`).
                reason += f" ({path.parent} must be writable)"
            elif code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                reason += " (once deleted, the next refresh rebuilds it)"
            raise StoreError(f"{path}: cannot open the state database: {reason}") from e
        return cls(db, path)

    def close(self) -> None:
        self._db.close()

    def reopen_if_replaced(self) -> bool:
        """Open the database anew if its file was deleted or replaced since; True if so.

        Otherwise a database deleted by hand while a daemon runs would go on living
        in a file no one else sees. The old connection closes first: it removes its
        write-ahead log, which the new database must not take for its own.
        """
        if _file_identity(self._path) == self._identity:
            return False
        self._db.close()
        fresh = Store.open(self._path)
        self._db, self._identity, self._source_stats = fresh._db, fresh._identity, None
        return True

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: all or nothing, and much faster than one commit each."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # not if commit_so_far failed to begin anew
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"state database: {e}") from e

    # -- sources and articles ---------------------------------------------------------

    def source_stats(self) -> Mapping[str, tuple[int, int]]:
        """``(size, mtime_ns)`` of every known source: all a rescan compares.

        Kept between calls while no connection wrote to ``sources``: a no-op refresh
        then reads one number instead of every source's row (``data_version`` moves
        when another connection commits; this one's writes forget the copy).
        """
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._source_stats is None or self._source_stats[1] != version:
            rows = self._db.execute("SELECT path, size, mtime_ns FROM sources")
            self._source_stats = {path: (size, mtime) for path, size, mtime in rows}, version
        return self._source_stats[0]

    def source_hash(self, path: str) -> str | None:
        """The content hash of a known source when it was last read; None if unknown."""
        row = self._db.execute("SELECT hash FROM sources WHERE path = ?", (path,)).fetchone()
        return row[0] if row else None

    def commit_so_far(self) -> None:
        """Inside :meth:`transaction`: commit what it wrote so far, and go on in a new one."""
        try:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"state database: {e}") from e

    def touch_source(self, file: SourceFile) -> None:
        """Remember new stat figures of a file whose content did not change."""
        self._source_stats = None
        self._db.execute(
            "UPDATE sources SET size = ?, mtime_ns = ? WHERE path = ?",
            (file.size, file.mtime_ns, file.path),
        )

    def put_source(self, file: SourceFile, digest: str, article: Article | None,
                   error: str | None, warnings: Sequence[str] = ()) -> None:
        """Record a scanned source and its content hash: its article, or why it was refused."""
        self._source_stats = None
        path = file.path
        self._db.execute("DELETE FROM articles WHERE path = ?", (path,))
        self._db.execute(
            "INSERT OR REPLACE INTO sources (path, size, mtime_ns, hash, error, warnings) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (path, file.size, file.mtime_ns, digest, error,
             json.dumps(list(warnings), ensure_ascii=False)),
        )
        if article is None:
            return
        published = _iso(article.published)
        self._db.execute(
            "INSERT INTO articles (path, published, data) VALUES (?, ?, ?)",
            (path, published, _dump_article(article)),
        )
        self._db.executemany(
            "INSERT INTO article_categories (category, published, path) VALUES (?, ?, ?)",
            [(c, published, path) for c in article.categories],
        )
        self._db.executemany(
            "INSERT INTO article_images (url, path) VALUES (?, ?)",
            [(url, path) for url in article.images],
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO images (url, next_attempt) VALUES (?, ?)",
            [(url, _DUE_NOW) for url in article.images],
        )

    def refuse_source(self, file: SourceFile, digest: str, error: str) -> None:
        """Record why a source is refused now, keeping the article it last gave."""
        self._source_stats = None
        self._db.execute(
            "UPDATE sources SET size = ?, mtime_ns = ?, hash = ?, error = ?, warnings = '[]' "
            "WHERE path = ?",
            (file.size, file.mtime_ns, digest, error, file.path),
        )

    def delete_sources(self, paths: Iterable[str]) -> None:
        self._source_stats = None
        self._db.executemany("DELETE FROM sources WHERE path = ?", [(p,) for p in paths])

    def article(self, path: str) -> Article | None:
        row = self._db.execute("SELECT data FROM articles WHERE path = ?", (path,)).fetchone()
        return _load_article(row[0]) if row else None

    def articles(self, paths: Sequence[str]) -> Iterator[tuple[str, Article | None]]:
        """Each of ``paths`` with its article (None if it has none), in order.

        Hundreds a query: loading 10,000 takes half the time one by one does.
        """
        for start in range(0, len(paths), _KEYS_PER_QUERY):
            chunk = paths[start : start + _KEYS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            rows = dict(self._db.execute(
                f"SELECT path, data FROM articles WHERE path IN ({marks})", chunk))
            for path in chunk:
                data = rows.get(path)
                yield path, None if data is None else _load_article(data)

    def newest_articles(self, category: str | None, limit: int) -> list[Article]:
        """The newest ``limit`` articles of ``category`` (None: of every category)."""
        return [_load_article(data) for (data,) in self._newest("data", category, limit)]

    def newest_paths(self, category: str | None, limit: int) -> list[str]:
        """The paths of :meth:`newest_articles`, in the same order."""
        return [path for (path,) in self._newest("path", category, limit)]

    def _newest(self, column: str, category: str | None, limit: int) -> sqlite3.Cursor:
        if category is None:
            return self._db.execute(
                f"SELECT a.{column} FROM articles a ORDER BY published DESC, path LIMIT ?",
                (limit,),
            )
        return self._db.execute(
            f"SELECT a.{column} FROM article_categories c JOIN articles a USING (path) "
            "WHERE c.category = ? ORDER BY c.published DESC, c.path LIMIT ?",
            (category, limit),
        )

    def categories(self) -> dict[str, int]:
        """Every category with its number of articles."""
        rows = self._db.execute(
            "SELECT category, count(*) FROM article_categories GROUP BY category ORDER BY category"
        )
        return dict(rows.fetchall())

    def paths_in_categories(self, categories: Iterable[str]) -> set[str]:
        """Paths of the articles in any of ``categories``."""
        return self._gather("SELECT path FROM article_categories WHERE category = ?",
                            categories)

    def categories_of(self, paths: Iterable[str]) -> set[str]:
        return self._gather("SELECT category FROM article_categories WHERE path = ?", paths)

    def article_paths(self) -> list[str]:
        return [p for (p,) in self._db.execute("SELECT path FROM articles ORDER BY path")]

    def count_articles(self) -> int:
        return self._db.execute("SELECT count(*) FROM articles").fetchone()[0]

    def count_refused_sources(self) -> int:
        return self._db.execute(
            "SELECT count(*) FROM sources WHERE error IS NOT NULL"
        ).fetchone()[0]

    def source_problems(self) -> list[tuple[str, str | None, list[str]]]:
        """``(path, error, warnings)`` of every source refused or warned about."""
        rows = self._db.execute(
            "SELECT path, error, warnings FROM sources "
            "WHERE error IS NOT NULL OR warnings != '[]' ORDER BY path"
        )
        return [(p, e, json.loads(w)) for p, e, w in rows]

    # -- images -----------------------------------------------------------------------

    def cached_images(self, urls: Iterable[str]) -> dict[str, CachedImageInfo]:
        """The cache entries of those of ``urls`` that are cached."""
        found = {}
        for url in set(urls):
            row = self._db.execute(
                "SELECT name, size, mime FROM images WHERE url = ? AND name IS NOT NULL", (url,)
            ).fetchone()
            if row:
                found[url] = CachedImageInfo(*row)
        return found

    def images_to_fetch(self, now: datetime) -> list[str]:
        """Referenced images not cached whose next attempt is due, sorted.

        An index of the uncached images by due time makes this cheap when none is due.
        """
        rows = self._db.execute(
            f"SELECT url FROM images WHERE name IS NULL AND next_attempt <= ? AND {_REFERENCED}",
            (_iso(now),),
        )
        return sorted(url for (url,) in rows)

    def count_pending_images(self) -> int:
        """Referenced images not cached yet (due or waiting for their next attempt)."""
        return self._db.execute(
            f"SELECT count(*) FROM images WHERE name IS NULL AND {_REFERENCED}"
        ).fetchone()[0]

    def put_cached_image(self, url: str, image: CachedImageInfo, now: datetime) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO images (url, name, size, mime, fetched_at, failures) "
            "VALUES (?, ?, ?, ?, ?, 0)",
            (url, image.name, image.size, image.mime, _iso(now)),
        )

    def image_failures(self, url: str) -> int:
        row = self._db.execute("SELECT failures FROM images WHERE url = ?", (url,)).fetchone()
        return row[0] if row else 0

    def put_failed_image(self, url: str, error: str, next_attempt: datetime) -> None:
        self._db.execute(
            "INSERT INTO images (url, failures, error, next_attempt) VALUES (?, 1, ?, ?) "
            "ON CONFLICT (url) DO UPDATE SET failures = failures + 1, error = excluded.error, "
            "next_attempt = excluded.next_attempt, name = NULL",
            (url, error, _iso(next_attempt)),
        )

    def failing_images(self) -> list[FailingImage]:
        rows = self._db.execute(
            "SELECT url, error, failures, next_attempt FROM images "
            f"WHERE name IS NULL AND failures > 0 AND {_REFERENCED} ORDER BY url"
        )
        return [FailingImage(u, e, f, datetime.fromisoformat(n)) for u, e, f, n in rows]

    def paths_showing(self, urls: Iterable[str]) -> set[str]:
        """Paths of the articles that reference any of ``urls``."""
        return self._gather("SELECT path FROM article_images WHERE url = ?", urls)

    def _gather(self, query: str, keys: Iterable[str]) -> set[str]:
        """The values ``query`` (one column, one ``?``) gives for any of ``keys``.

        One indexed lookup per key: no ``IN (...)`` list to outgrow SQLite's limits.
        """
        found: set[str] = set()
        for key in keys:
            found.update(value for (value,) in self._db.execute(query, (key,)))
        return found

    def cached_image_names(self) -> dict[str, str]:
        """The cache file name of every cached image, by URL."""
        rows = self._db.execute("SELECT url, name FROM images WHERE name IS NOT NULL")
        return dict(rows.fetchall())

    def cached_since(self, since: datetime | None) -> dict[str, tuple[str, int]]:
        """The cache file name and size of each image cached at ``since`` or later (every
        cached image if None), by URL."""
        rows = self._db.execute(
            "SELECT url, name, size FROM images WHERE name IS NOT NULL AND fetched_at >= ?",
            (_iso(since) if since is not None else "",))
        return {url: (name, size) for url, name, size in rows}

    def forget_cached_images(self, urls: Iterable[str]) -> None:
        """Mark images as not cached (their file is gone): due for a first attempt again."""
        self._db.executemany(
            "UPDATE images SET name = NULL, size = NULL, mime = NULL, fetched_at = NULL, "
            "failures = 0, error = NULL, next_attempt = ? WHERE url = ?",
            [(_DUE_NOW, url) for url in urls],
        )

    def referenced_image_urls(self) -> set[str]:
        """The URL of every image some article references."""
        return {url for (url,) in self._db.execute("SELECT DISTINCT url FROM article_images")}

    def forget_unreferenced_images(self) -> None:
        self._db.execute("DELETE FROM images WHERE url NOT IN (SELECT url FROM article_images)")

    # -- meta and refresh log ---------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        self._db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def log_refresh(self, started: datetime, finished: datetime, summary: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO refreshes (started, finished, summary) VALUES (?, ?, ?)",
            (_iso(started), _iso(finished), json.dumps(summary, ensure_ascii=False)),
        )
        self._db.execute(
            "DELETE FROM refreshes WHERE id <= (SELECT max(id) - 100 FROM refreshes)"
        )

    def last_refreshes(self, limit: int = 5) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT started, finished, summary FROM refreshes ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [{"started": s, "finished": f, **json.loads(d)} for s, f, d in rows]


def _iso(value: datetime) -> str:
    """A sortable UTC timestamp string (every datetime in feeder is aware)."""
    return value.astimezone(UTC).isoformat()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Set up a new connection; create the tables of a new database, or update an older one.

    Only the latter writes: opening the store to read (`feeder status`) while a refresh
    holds the write lock must not wait for it.
    """
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == _SCHEMA_VERSION:
        return
    if version not in (0, 1, 2):
        raise StoreError(f"{path}: schema version {version} is not supported")
    db.execute("PRAGMA journal_mode = WAL")  # kept by the database file
    db.executescript(_SCHEMA)
    if version == 1:  # version 2: every referenced image has a row in images
        db.execute(_NEW_IMAGES, (_DUE_NOW,))
    # Version 3 (article_categories_by_path) is all in _SCHEMA.
    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _dump_article(article: Article) -> str:
    data = dict(vars(article))  # its fields: shallow, unlike asdict, and 10× faster
    for key in ("published", "updated"):
        if data[key] is not None:
            data[key] = data[key].isoformat()
    return json.dumps(data, ensure_ascii=False)


def _load_article(text: str) -> Article:
    data = json.loads(text)
    for key in ("published", "updated"):
        if data[key] is not None:
            data[key] = datetime.fromisoformat(data[key])
    for key in ("categories", "tags", "images", "warnings"):
        data[key] = tuple(data[key])
    return Article(**data)

