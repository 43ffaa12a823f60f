"""Sources: find article files under ``sources/`` and parse them into Articles.

Scanning only stats files; parsing is a pure function of a file's bytes (plus the
file's mtime, for an article with no date). Anything that makes a file unpublishable
raises :class:`SourceError` with the reason; anything odd but recoverable becomes a
warning on the Article.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import html
import logging
import logging.handlers
import os
import re
import reprlib
import signal
import stat
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import urlsplit

import nh3
import yaml
from frontmatter.default_handlers import YAMLHandler
from markdown_it import MarkdownIt
from markdown_it.common.html_blocks import block_names

from feeder.config import Config, iri_to_uri, nfc
from feeder.exceptions import FeederError, SourceError, printable_path, type_and_message
from feeder.imagehtml import (
    ImageCollector,
    absolute_url,
    allowed_urls,
    references,
    show_lazy_images,
)
from feeder.types import Article, SourceFile, SourceStats

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

log = logging.getLogger(__name__)

#: File name suffixes read as articles; ``.html`` bodies are not Markdown.
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SOURCE_SUFFIXES = MARKDOWN_SUFFIXES | HTML_SUFFIXES
_SOURCE_ENDINGS = tuple(SOURCE_SUFFIXES)

#: Characters XML 1.0 forbids (C0 controls but tab/LF/CR, surrogates, U+FFFE/U+FFFF).
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
#: What YAML refuses besides: DEL and the C1 controls but NEL.
_YAML_REFUSED = re.compile("[\x7f-\x84\x86-\x9f]")
#: What leaves a body once cleaned, in one pass: what XML forbids, which character
#: references can make again (&#1;); and DEL and the C1 controls, which XML takes but
#: readers show as boxes and the W3C validator flags (cp1252's quotes read as Latin-1).
_REMOVED_FROM_BODY = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
#: An escaped backslash; or a surrogate escape, a pair's (high, low) or a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\\\|\\u((?i:d[89ab][0-9a-f]{2}))\\u((?i:d[c-f][0-9a-f]{2}))"
                               r"|\\u(?i:d[89a-f][0-9a-f]{2})")
#: Namespace of article guids: ``urn:uuid:`` from the source path, never the site URL.
_ID_NAMESPACE = uuid.UUID("6f1d3c52-5d0e-4c1b-9a43-0a6f3e1f2b7e")
#: Plain scalars YAML 1.1 reads as other than text; :class:`_Loader` reads only
#: ``true`` and ``false`` of them so.
_YAML_1_1_ONLY = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float")}
_LINK_KEYS = ("link", "url", "permalink")
_IMAGE_KEYS = ("headimg", "thumbnail")
#: Why a file whose path is not UTF-8 is left out.
MISNAMED = "skipped: the file name is not UTF-8 (rename it)"
_MAX_INT64 = 2**63 - 1
#: Categories (or tags) read from one file at most.
MAX_NAMES = 100
_END = object()
#: Dates before this year, or after the max one, are read as no date: feeds cannot
#: carry them (and 9999-12-31 in UTC is year 10000 east of it).
MIN_YEAR = 1900
MAX_YEAR = 9998
#: Characters of body text kept as an item's summary.
SUMMARY_CHARS = 280
#: Characters of HTML a summary is first looked for in; four times more until it holds enough.
_SUMMARY_WINDOW = 4 * SUMMARY_CHARS
#: Text this far before a window's cut is whole: a reference the cut splits (in nh3's
#: output, ``&nbsp;`` at most) reads as raw characters.
_CUT_MARGIN = 64
#: A tag as nh3 writes it: attribute values in double quotes, which hold no ``"`` (it
#: escapes them; ``<`` and ``>`` too, but this does not count on it). Its text holds
#: no ``<`` either.
_WRITTEN_TAG = re.compile(r'<[^>"]*(?:"[^"]*"[^>"]*)*>')
#: Elements a browser shows on lines of their own (or as cells, or a line break): their
#: words are apart even where no white space separates the tags (minified HTML).
SEPARATING_ELEMENTS = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "div",
    "dl", "dt", "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table",
    "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
})
#: A start or end tag, as nh3 writes it (see :data:`_WRITTEN_TAG`), of those elements.
_SEPARATING_TAG = re.compile(
    rf'</?(?:{"|".join(sorted(SEPARATING_ELEMENTS))})(?=[\s/>])[^>"]*(?:"[^"]*"[^>"]*)*>')
#: The end of an RFC 822 date whose zone is an offset with a colon, or that has no zone.
_COLON_OFFSET = re.compile(r"\s([+-])(\d\d):(\d\d)$")
#: An offset from GMT or UTC, as JavaScript's ``Date.toString()`` writes it.
_GMT_OFFSET = re.compile(r"\s(?:GMT|UTC?)([+-])(\d\d?):?(\d\d)?(?:\s+\([^()]*\))?$",
                         re.IGNORECASE)
#: What follows a date's time, less a comment: ``CEST (Paris)``.
_AFTER_TIME = re.compile(r"\d:\d\d\s+(.+?)(?:\s*\([^()]*\))?$")
_ENDS_WITH_TIME = re.compile(r"\s\d\d?:\d\d(?::\d\d)?$")
#: The year of an RFC 822 (or RFC 850) date, after its day and month, in 4 digits.
_FOUR_DIGIT_YEAR = re.compile(r"^(?:[A-Za-z]+,?\s*)?\d{1,2}[\s-]+[A-Za-z]+[\s-]+(\d{4})\s")
#: Bodies nested deeper are refused: nh3's time grows with the square of the depth
#: (100,000 nested <div>s: minutes), and articles nest a few dozen deep.
MAX_DEPTH = 1000
#: Markdown of more lines is refused: markdown-it's time and memory grow with its
#: blocks (a table of 170,000 rows: 8 s and 650 MB); articles have a few hundred.
MAX_MARKDOWN_LINES = 20_000
#: Bodies holding more ``&`` are refused: nh3's time grows with the square of the
#: character references in one text (a million: minutes); articles hold dozens.
MAX_AMPERSANDS = 100_000
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")
#: Void elements, and those a parser closes without their end tag.
_NOT_NESTING = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
    "source", "track", "wbr", "p", "li", "dt", "dd", "option", "optgroup", "tr", "td",
    "th", "thead", "tbody", "tfoot", "colgroup", "rb", "rt", "rp", "rtc",
    "html", "head", "body",
})
#: What may come before the opening ``---``: white space, and byte order marks
#: besides the one decoding removed (a file joined from two, or saved twice).
_LEADING_SPACE = re.compile("\\A[\\s\ufeff]+")
#: Blank lines opening a body.
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
#: A line opening a CommonMark HTML block that runs to the next blank line (type 6).
_HTML_BLOCK_START = re.compile(rf"</?(?:{'|'.join(block_names)})(?:[ \t>]|/>|$)", re.IGNORECASE)


def scan_sources(root: Path, misnamed: list[str] | None = None) -> SourceStats:
    """``(size, mtime_ns)`` of every article file under ``root`` (recursively), by path.

    Dot-files, dot-folders and what is not a regular file (a FIFO would block its
    reader) are skipped. Paths are relative to ``root``, with ``/``.
    A path that is not UTF-8 cannot be stored, nor given an id: it is left out, and
    added to ``misnamed`` (if given) with its odd bytes escaped.

    Raises:
        FeederError: ``root`` does not exist, or a folder could not be listed. Its
            files are not known, so no scan is returned: a refresh would take them for
            deleted (an unmounted share would unpublish everything).
    """
    # Plain strings and tuples: this runs for every file on every refresh.
    found: SourceStats = {}
    stack = [""]
    while stack:
        prefix = stack.pop()
        folder = os.path.join(root, prefix)
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            if not prefix:
                raise FeederError(f"{root}: the sources folder does not exist") from None
            continue  # deleted while scanning
        except OSError as e:
            raise FeederError(f"{folder}: cannot list the folder: {e.strerror}") from e
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(f"{prefix}{name}/")
            elif name.lower().endswith(_SOURCE_ENDINGS):  # is_source_name, as it runs per file
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted between listing and stat, or a dangling link
                    continue
                except OSError:  # a symlink loop, a folder not ours to search: reading says why
                    st = None
                else:
                    if not stat.S_ISREG(st.st_mode):
                        continue
                path = prefix + name
                if not path.isascii() and not _is_utf8(path):
                    if misnamed is not None:
                        misnamed.append(printable_path(path))
                    continue
                if st is None:
                    found[path] = UNKNOWN_STAT
                    continue
                # SQLite integers are 64-bit; `touch -d 2300-01-01` goes past them.
                mtime = st.st_mtime_ns
                found[path] = (st.st_size, mtime if mtime < _MAX_INT64 else _MAX_INT64)
    return found


#: The stats of a file the scan could not stat: it is read, and refused with the reason.
UNKNOWN_STAT: Final = (0, 0)


def is_source_name(name: str) -> bool:
    """Is a file of this name a source (by its suffix; dot-files never are)?"""
    return not name.startswith(".") and name.lower().endswith(_SOURCE_ENDINGS)


def _is_utf8(path: str) -> bool:
    """False for a name os.scandir decoded with surrogate escapes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_source(path: Path, max_bytes: int, name: str) -> bytes:
    """A source file's bytes, at most ``max_bytes + 1``: enough for the parser to refuse it."""
    try:
        # Non-blocking: a FIFO put in place of the file since the scan must not hang us.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SourceError(name, "not a regular file")
            # read(n) allocates n bytes first: ask for the size the file has, plus one
            # byte that shows whether it grew since, and only then for the rest.
            wanted = min(info.st_size, max_bytes) + 1
            data = f.read(wanted)
            if len(data) == wanted <= max_bytes:
                data += f.read(max_bytes + 1 - wanted)
            return data
    except OSError as e:
        raise SourceError(name, f"cannot read: {e.strerror}") from e


def content_hash(data: bytes) -> str:
    """Hash deciding whether a changed file needs parsing again."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def article_id(path: str) -> str:
    """Stable id of the article at ``path``; depends on the path only."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


def article_guid(path: str) -> str:
    """Globally unique, site-independent id for feeds (``urn:uuid:``)."""
    return uuid.uuid5(_ID_NAMESPACE, path).urn


def _count(number: int, thing: str) -> str:
    """``1 thing``, ``2 things``."""
    return f"{number} {thing}" if number == 1 else f"{number} {thing}s"


def strip_xml_forbidden(text: str) -> str:
    """Remove characters XML 1.0 cannot carry (YAML refuses them too)."""
    return _XML_FORBIDDEN.sub("", text)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's, when available), kinder to dates and text.

    Its booleans are YAML 1.2's, as Hexo's js-yaml reads them: ``on``, ``no`` and
    ``yes`` are words, only ``true`` and ``false`` are booleans. And what looks like
    a number stays the text it was written as (a choice of ours): no field of an
    article is a number, and YAML 1.1 would make the category ``1:30`` 90, the
    title ``010`` 8.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_1_1_ONLY]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_timestamp(self, node: yaml.Node) -> Any:
        """A timestamp YAML cannot build (``2022-02-30``) stays the text it was written as.

        The date parser then warns about it, and a ``title: 2022-02-30`` is just text.
        """
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError, AttributeError):  # `!!timestamp x`: AttributeError
            return self.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile("^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class _CYAMLHandler(YAMLHandler):
    """python-frontmatter's YAML handler, with :class:`_Loader`."""

    def load(self, fm: str, **kwargs: object) -> Any:
        return yaml.load(fm, Loader=_Loader)


@dataclass(frozen=True)
class SourceRead:
    """A changed source file, read, and parsed unless its bytes are the known ones."""

    file: SourceFile
    #: The file's :attr:`digest` when it was last read, if it was.
    known_hash: str | None
    #: Hash of the bytes read; ``error:`` and the reason if the file could not be read.
    digest: str = ""
    #: The article, if the file was parsed into one.
    article: Article | None = None
    #: Why the file was refused, if it was.
    error: SourceError | None = None
    #: The file could not be read (``error`` says why).
    unreadable: bool = False
    #: The file was deleted since the scan.
    deleted: bool = False


#: A changed source to read and parse, with the hash of its bytes when it last parsed.
SourceJob = tuple[SourceFile, str | None]


def read_and_parse_all(config: Config, root: Path, batch: list[SourceJob],
                       reparse: bool) -> list[SourceRead]:
    """:meth:`SourceParser.read_and_parse` for each ``(file, known hash)``: a worker's task."""
    parser = SourceParser(config)  # a fraction of a millisecond: nothing to keep between tasks
    return [parser.read_and_parse(root, file, known, reparse) for file, known in batch]


def start_worker(parent: int, log_queue: Queue[logging.LogRecord], level: int) -> None:
    """Start of a parsing worker process, whose parent is the process ``parent``.

    Its log records go to ``log_queue``, for the parent to log as its own. Ctrl-C
    on a terminal reaches the worker too, but its parent decides: it stops handing
    out work. (SIGTERM still ends it: that is how a pool ends a worker that another's
    death left working.) The worker ends with its parent, even one killed (kill -9
    tells no one).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(level)
    threading.Thread(target=_end_with, args=(parent,), name="end-with-parent",
                     daemon=True).start()


def _end_with(parent: int) -> None:
    sleep = threading.Event().wait  # (``time`` is datetime's here)
    while os.getppid() == parent:  # an orphan is adopted by another process
        sleep(1)
    os._exit(1)


class SourceParser:
    """Turns a source file's bytes into an :class:`Article`.

    Reusable from any thread, but by one at a time (its cleaner notes image URLs).
    """

    def __init__(self, config: Config) -> None:
        self._max_bytes = config.sources.max_bytes
        self._tz: tzinfo = config.site.tz
        self._default_category = config.feeds.default_category
        self._image_config = config.images
        self._handler = _CYAMLHandler()
        self._markdown = markdown_renderer()
        self._images = ImageCollector()
        self._cleaner = nh3.Cleaner(
            attributes={
                **nh3.ALLOWED_ATTRIBUTES,
                "img": {
                    *nh3.ALLOWED_ATTRIBUTES["img"],
                    "srcset", "sizes", "data-src", "data-original", "data-srcset",
                },
                "source": {"srcset", "sizes", "media", "type"},
                # A Markdown table's column alignment (markdown-it writes it as a style).
                "th": {*nh3.ALLOWED_ATTRIBUTES["th"], "style"},
                "td": {*nh3.ALLOWED_ATTRIBUTES["td"], "style"},
            },
            filter_style_properties={"text-align"},
            tags=nh3.ALLOWED_TAGS | {"picture", "source"},
            # img.cls.cn refuses hotlinks with a Referer; images not cached yet still load.
            set_tag_attribute_values={"img": {"referrerpolicy": "no-referrer"}},
            attribute_filter=self._images,
            # Dropped with their content: a whole page's <title> is not its body, and
            # nh3 reads what <noscript> holds as text, markup and all.
            clean_content_tags={"script", "style", "title", "noscript"},
        )

    def read_and_parse(self, root: Path, file: SourceFile, known_hash: str | None,
                       reparse: bool) -> SourceRead:
        """Read a file the scan found changed; parse it, unless its bytes hash to ``known_hash``.

        ``reparse`` parses it anyway (the settings that shape an article changed).
        """
        try:
            data = read_source(root / file.path, self._max_bytes, file.path)
        except SourceError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return SourceRead(file, known_hash, deleted=True)
            return SourceRead(file, known_hash, f"error:{e.located_reason}", error=e,
                              unreadable=True)
        digest = content_hash(data)
        if digest == known_hash and not reparse:
            return SourceRead(file, known_hash, digest)
        try:
            mtime = datetime.fromtimestamp(file.mtime_ns / 1e9, UTC)
            return SourceRead(file, known_hash, digest,
                              article=self.parse(file.path, data, mtime))
        except SourceError as e:
            return SourceRead(file, known_hash, digest, error=e)

    def parse(self, path: str, data: bytes, mtime: datetime) -> Article:
        """Parse one file; ``mtime`` dates an article that has no date.

        Raises:
            SourceError: the file is not a publishable article. An error no one
                foresaw is one too (and logged with its traceback): it refuses this
                file, never the others.
        """
        try:
            return self._parse(path, data, mtime)
        except SourceError:
            raise
        except Exception as e:
            log.exception("%s: unexpected error while parsing", path)
            raise SourceError(path, f"unexpected error: {type_and_message(e)}") from e

    def _parse(self, path: str, data: bytes, mtime: datetime) -> Article:
        self._images.take()  # nothing left from a parse that failed midway
        if not data.strip():
            raise SourceError(path, "empty file")
        if len(data) > self._max_bytes:
            raise SourceError(path, f"larger than sources.max_bytes ({self._max_bytes} bytes)")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise SourceError(path, f"not UTF-8 (byte {data[e.start]:#04x})", line) from e
        text = strip_xml_forbidden(text.replace("\r\n", "\n").replace("\r", "\n"))
        stripped = _LEADING_SPACE.sub("", text, count=1)
        lines_before = text[: len(text) - len(stripped)].count("\n")
        if not self._handler.detect(stripped):
            raise SourceError(path, "no front matter (a file must start with ---)", 1)
        try:
            fm, body = self._handler.split(stripped)
        except ValueError:
            raise SourceError(path, "front matter is not closed by ---", 1) from None
        # XML takes C1 controls, YAML does not: they are mojibake (cp1252's quotes).
        yaml_text, controls = _YAML_REFUSED.subn("", fm)
        warnings = [f"front matter: {_count(controls, 'control character')} removed"
                    ] if controls else []
        try:
            meta = self._load_yaml(yaml_text, warnings)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = None
            if mark:
                # fm starts on the opening "---" line, or below it when the boundary's
                # trailing whitespace took line ends with it (a blank line after "---").
                opening = stripped[: stripped.index(fm)].count("\n")
                line = lines_before + opening + mark.line + 1
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SourceError(path, f"invalid YAML front matter: {problem}", line) from e
        except Exception as e:  # a value its tag cannot build: `!!int abc` is a ValueError
            raise SourceError(path, f"invalid YAML front matter: {e}") from e
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise SourceError(path, f"front matter is a {type(meta).__name__}, not a mapping", 2)
        # Blank lines go, but not the first line's indent: in Markdown it makes code.
        body = _LEADING_BLANK_LINES.sub("", body).rstrip()
        return self._article(path, meta, body, mtime, warnings)

    def _load_yaml(self, text: str, warnings: list[str]) -> Any:
        """The front matter's YAML, surrogates escaped as JSON escapes them included.

        JSON writes an emoji as ``"\\ud83d\\ude80"``, and YAML is a superset of JSON,
        but libyaml refuses such escapes. Once it has, a pair is read as the character
        it makes, a lone one is removed, with a warning (as XML forbids it). (PyYAML's
        own loader, used where libyaml is missing, takes them as two lone surrogates,
        which are then removed as any character XML forbids.)
        """
        try:
            return self._handler.load(text)
        except yaml.YAMLError:
            joined, lone = _join_surrogate_escapes(text)
            if joined == text:
                raise
        meta = self._handler.load(joined)
        if lone:
            warnings.append(f"front matter: {_count(lone, 'lone surrogate escape')} removed")
        return meta

    def _article(self, path: str, meta: dict[Any, Any], body: str, mtime: datetime,
                 warnings: list[str]) -> Article:
        _warn_of_wrong_types(meta, warnings)
        title = _text(meta.get("title")) or _title_from_path(path)
        published = self._date(meta.get("date"), "date", warnings)
        if published is None:
            warnings.append("no date: using the file's modification time")
            published = mtime
        updated = self._date(meta.get("updated"), "updated", warnings)
        categories = _names(meta.get("categories", meta.get("category")), "category", warnings)
        if not categories:
            categories = (self._default_category,)
        tags = _names(meta.get("tags"), "tag", warnings)
        link = _link(meta, warnings)
        headimg = _url(meta.get("headimg"))
        thumbnail = _url(meta.get("thumbnail"))
        if PurePosixPath(path).suffix.lower() in HTML_SUFFIXES:
            html = body
        else:
            html = html_blocks_as_rendered(body)
            if html is None:
                if body.count("\n") >= MAX_MARKDOWN_LINES:
                    raise SourceError(path, f"Markdown of over {MAX_MARKDOWN_LINES:,} lines")
                html = self._markdown.render(body)
        if nested_deeper_than(html, MAX_DEPTH):
            raise SourceError(path, f"HTML nested deeper than {MAX_DEPTH} elements")
        if html.count("&") > MAX_AMPERSANDS:
            raise SourceError(path, f"over {MAX_AMPERSANDS:,} '&' (character references)")
        self._images.base = link  # relative URLs are the original page's
        cleaned, controls = _REMOVED_FROM_BODY.subn("", self._cleaner.clean(html))
        if controls:
            warnings.append(f"body: {_count(controls, 'control character')} removed")
        content = show_lazy_images(cleaned)
        found = list(map(strip_xml_forbidden, self._images.take()))
        if content is not cleaned:  # placeholders gone: an image is one the content shows
            found = [url for url in found if references(content, url)]
        # Images elsewhere are left as they are: not fetched, not tracked.
        found += [headimg, thumbnail]
        images = allowed_urls(dict.fromkeys(url for url in found if url), self._image_config)
        return Article(
            path=path,
            id=article_id(path),
            title=title,
            content=content,
            summary=self._summary(content),
            published=published,
            updated=updated,
            categories=categories,
            tags=tags,
            author=_text(meta.get("author")),
            link=link,
            headimg=headimg,
            thumbnail=thumbnail,
            images=tuple(images),
            warnings=tuple(warnings),
        )

    @staticmethod
    def _summary(content: str) -> str:
        """The opening of the body's text, at most :data:`SUMMARY_CHARS` characters.

        Only a window at the start of the body is read, grown until it holds enough
        text: most bodies are many times longer than their summary.
        """
        window = _SUMMARY_WINDOW
        while True:
            text = text_of_cleaned(content[:window])
            if window >= len(content):
                break
            if len(text) > SUMMARY_CHARS + _CUT_MARGIN:
                text = text[: SUMMARY_CHARS + 1]  # still longer than a summary: cut below
                break
            window *= 4
        return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"

    def _date(self, value: Any, key: str, warnings: list[str]) -> datetime | None:
        """A front matter date in any accepted form, as an aware datetime."""
        if value is None or value == "":
            return None
        parsed, unread_zone = read_date(value, self._tz)
        shown = _shown(value.isoformat() if isinstance(value, date) else value)
        if unread_zone is not None:
            warnings.append(f"{key}: {shown}: time zone {unread_zone!r} not understood: "
                            "read as UTC")
        if parsed is None:
            warnings.append(f"{key}: cannot read {shown} as a date")
        elif parsed.year < MIN_YEAR:  # RSS dates (RFC 822) have years of 4 digits
            warnings.append(f"{key}: {shown} is before {MIN_YEAR}")
            return None
        elif parsed.year > MAX_YEAR:
            warnings.append(f"{key}: {shown} is after {MAX_YEAR}")
            return None
        return parsed


#: Bump when the same file and settings give another article (rendering, sanitizing):
#: the next refresh parses every source again.
PARSER_VERSION = 8


def markdown_renderer() -> MarkdownIt:
    """CommonMark, plus the tables and ~~strikethrough~~ of GitHub's Markdown (Hexo's)."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


def text_of_cleaned(cleaned: str) -> str:
    """The text of HTML as nh3 writes it, white space collapsed.

    Its tags are regular enough to drop by pattern, in a third of the time parsing
    it again takes; those of :data:`SEPARATING_ELEMENTS` leave a space, so that
    ``<p>One.</p><p>Two.</p>`` reads "One. Two.". A tag cut short at the end (by a
    window's cut) is dropped too.
    """
    text = _WRITTEN_TAG.sub("", _SEPARATING_TAG.sub(" ", cleaned)).partition("<")[0]
    return " ".join(html.unescape(text).split())


def html_blocks_as_rendered(body: str) -> str | None:
    """What CommonMark renders of a body made only of HTML blocks; None for any other body.

    Most sources are HTML in a ``.md`` file (the seed is). When every run of lines
    between blank lines opens with a block-level tag, each run is an HTML block that
    CommonMark passes through untouched, and only the blank lines are dropped. This
    spares the Markdown parser; a test holds it to markdown-it's output. (A run
    whose first line holds a ``|`` may be a table's head instead: not spared.)
    """
    kept: list[str] = []
    at_block_start = True
    for line in body.split("\n"):
        if not line.strip(" \t"):
            at_block_start = True
            continue
        if at_block_start and (not _HTML_BLOCK_START.match(line) or "|" in line):
            return None
        at_block_start = False
        kept.append(line)
    return "\n".join(kept)


def nested_deeper_than(html: str, limit: int) -> bool:
    """Are elements nested deeper than ``limit`` in ``html``? An upper bound, from tags.

    Void elements and those whose end tag may be left out (``<p>``, ``<li>``) are
    not counted: a parser closes them. Runs only where there are more tags than
    ``limit``: a count of ``<`` is all most bodies cost.
    """
    if html.count("<") <= limit:
        return False
    depth = 0
    for closing, name in _TAG.findall(html):
        if name.lower() in _NOT_NESTING:
            continue
        depth = max(depth - 1, 0) if closing else depth + 1
        if depth > limit:
            return True
    return False


def read_date(value: Any, tz: tzinfo) -> tuple[datetime | None, str | None]:
    """RFC 822, ISO 8601, Hexo's ``2022-03-30 11:17:49`` or a YAML timestamp.

    A date with no offset is in ``tz``. The date is None when ``value`` is not a
    date. It is in UTC, unless it lies at the very edge of what Python's dates hold
    (year 1, or 9999), where its own zone is kept. With it comes what followed its
    time, if it was read as UTC for want of understanding that (``CEST``: RFC 5322
    reads a zone it does not know so), else None.
    """
    unread_zone = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime.combine(value, time())
    elif isinstance(value, str):
        text = value.strip()
        try:
            # RFC 3339 allows a lowercase "t" and "z".
            parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, OverflowError):
                return None, None
            if parsed.tzinfo is None:  # a zone the email module did not take, or none
                zone, unread_zone = _rfc822_zone(text, tz)
                parsed = parsed.replace(tzinfo=zone)
            # It reads years below 100 as 19xx or 20xx, as RFC 5322 asks of 2 digits.
            year = _FOUR_DIGIT_YEAR.match(text)
            if year and int(year[1]) < 100:
                try:
                    parsed = parsed.replace(year=int(year[1]))
                except ValueError:  # year 0
                    return None, None
    else:
        return None, None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    try:
        return parsed.astimezone(UTC), unread_zone
    except OverflowError:  # year 1 east of UTC, or 9999 west of it: refused by its year
        return parsed, unread_zone


def _rfc822_zone(text: str, tz: tzinfo) -> tuple[tzinfo, str | None]:
    """The zone of an RFC 822 date the email module left naive; and what it did not understand.

    An offset written ``+08:00``, or as JavaScript's dates write it (``GMT+0800
    (China Standard Time)``); ``tz`` if there is none (the date ends with its time);
    else UTC, as RFC 5322 reads ``-0000`` and the zone names it does not know
    (``CEST``), which are returned.
    """
    if offset := _COLON_OFFSET.search(text) or _GMT_OFFSET.search(text):
        sign, hours, minutes = offset.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes or 0))
        if delta < timedelta(hours=24):  # else no offset: +25:00 is not understood
            return timezone(-delta if sign == "-" else delta), None
    if _ENDS_WITH_TIME.search(text):
        return tz, None
    after = _AFTER_TIME.search(text)
    return UTC, after[1] if after is not None and after[1] != "-0000" else None


def _names(value: Any, what: str, warnings: list[str]) -> tuple[str, ...]:
    """Categories or tags: a list, one string, or Hexo's nested list, cleaned and deduped.

    At most :data:`MAX_NAMES` entries (lists included) are read: YAML aliases can
    nest a list of 10 into ten levels of itself in a few hundred bytes.
    """
    names: list[str] = []
    stack = [iter(value if isinstance(value, list) else [] if value is None else [value])]
    read = 0
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        read += 1
        if read > MAX_NAMES:
            warnings.append(f"more than {MAX_NAMES} {what} entries: the rest dropped")
            break
        if isinstance(item, list):  # Hexo: [[parent, child]] is a hierarchy
            stack.append(iter(item))
        elif isinstance(item, dict):  # `- 科创板: 新股`; each of its entries is read as one
            stack.append(iter(item.items()))
        elif isinstance(item, tuple):  # an entry of a mapping (YAML makes no tuples)
            key, val = item
            name = _text(f"{_text(key) or ''}: {_text(val) or ''}".rstrip(": ")) or ""
            warnings.append(f"{what} {_shown({key: val})} is a mapping: read as {name!r}")
            if name:
                names.append(name)
        elif (name := _text(item)) is None:
            warnings.append(f"empty {what} dropped")
        else:
            names.append(name)
    return tuple(dict.fromkeys(names))


def _text(value: Any) -> str | None:
    """A scalar as one line of text; None for nothing, or a list or mapping."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, bytes):  # !!binary
        value = value.decode("utf-8", "replace")
    elif isinstance(value, bool):  # as written, not as Python spells it ("True")
        value = "true" if value else "false"
    # One spelling of each character: "Café" typed either way is one category.
    text = nfc(" ".join(strip_xml_forbidden(str(value)).split()))
    return text or None


def _join_surrogate_escapes(text: str) -> tuple[str, int]:
    """``text`` with surrogate escapes joined; and how many were lone.

    A pair becomes the character it makes, a lone one is removed. An escaped
    backslash (``\\\\ud800``) is left as it is, and so is the text after it.
    """
    lone = 0

    def join(match: re.Match[str]) -> str:
        nonlocal lone
        if match[0] == "\\\\":
            return match[0]
        if match[2] is None:
            lone += 1
            return ""
        high, low = int(match[1], 16), int(match[2], 16)
        return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))

    return _SURROGATE_ESCAPE.sub(join, text), lone


class _ShortRepr(reprlib.Repr):
    """:mod:`reprlib`'s, two levels and four items deep: a YAML alias bomb (a list of
    seven lists of seven ...) is one short line in a warning, not hundreds of KB."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict = 2, 4, 4
        self.maxstring = 80  # a whole date, its zone included


_shown = _ShortRepr().repr


def _warn_of_wrong_types(meta: dict[Any, Any], warnings: list[str]) -> None:
    """Say what is left out: a list or mapping as text, an image that is no URL."""
    for key in ("title", "author"):
        if isinstance(value := meta.get(key), list | dict):
            warnings.append(f"{key}: {_shown(value)} is not text: left out")
    for key in _IMAGE_KEYS:
        value = meta.get(key)
        if value in (None, "") or (isinstance(value, str) and value.startswith("/")):
            continue  # a site path, as Hexo's: no site to resolve it against
        if _url(value) is None:
            warnings.append(f"{key}: {_shown(value)} is not an absolute http(s) URL: left out")


def _url(value: Any) -> str | None:
    url = absolute_url(strip_xml_forbidden(value).strip()) if isinstance(value, str) else ""
    return url if url.startswith(("http://", "https://")) else None


def _link(meta: dict[Any, Any], warnings: list[str]) -> str | None:
    """The item's own link: the first of ``link``, ``url``, ``permalink`` that is an
    absolute http(s) URL, as a URI (RSS forbids raw non-ASCII URLs). None (the item
    links to its page) if none is; a value that is not a URL or a path is warned of."""
    for key in _LINK_KEYS:
        value = meta.get(key)
        if value is None or value == "":
            continue
        url = _url(value)
        if url is not None:
            with contextlib.suppress(ValueError):  # a port out of range, a bad host name
                if urlsplit(url).port != 0:
                    return iri_to_uri(url)
        elif isinstance(value, str) and value.startswith("/"):
            continue  # a site path, as Hexo's permalink: no site to resolve it against
        warnings.append(f"{key}: {_shown(value)} is not an absolute http(s) URL: "
                        "the item links to its page")
    return None


def _title_from_path(path: str) -> str:
    stem = strip_xml_forbidden(PurePosixPath(path).stem)
    return " ".join(re.split(r"[-_\s]+", stem)).strip() or stem

