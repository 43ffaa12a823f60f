"""Feeds: build documents (RSS, Atom, JSON Feed, article pages, OPML, index) as bytes.

Everything here is pure: the same articles and images give the same bytes, never
depending on the clock, so an unchanged feed keeps its ETag. Writing is elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote
from xml.etree import ElementTree

from feedgen.ext.base import BaseEntryExtension, BaseExtension
from feedgen.feed import FeedEntry, FeedGenerator
from lxml import etree

from feeder import __version__
from feeder.config import SLUG_MAX_BYTES, Config, ImagesConfig, iri_to_uri
from feeder.imagehtml import is_allowed, rewrite_image_urls
from feeder.sources import article_guid
from feeder.types import Article, CachedImageInfo

#: Date of a feed with no items: feeds must carry one, and it must not be the clock's.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FEED_FILES = ("rss.xml", "atom.xml", "feed.json")
#: Bump when the same articles and settings give other files (slugs, templates, formats):
#: the next refresh rebuilds everything, so no page keeps a link to a moved feed.
OUTPUT_VERSION = 6
CATEGORIES_FOLDER = "categories"
ARTICLES_FOLDER = "articles"
#: Longest slug made from a name, in characters (a URL of 1,000 helps no one); in bytes,
#: it is held to what ``feeds.slugs`` may be, so that a suffix still fits a folder name.
MAX_SLUG_CHARS = 64
#: Hex digits of a name's hash that tell slugs apart, tried in turn (then all 40).
_SUFFIX_DIGITS = (6, 12)
#: The Atom id of the feed of every article: a UUID of its own.
_ALL_FEED_ID = "urn:uuid:14a12ca7-585b-4d89-9c35-edcf5c665f1e"


@dataclass(frozen=True)
class FeedInfo:
    """One feed: all articles, or one category's."""

    #: The category, or None for the feed of every article.
    category: str | None
    #: Folder under ``feeds/``, e.g. ``categories/金融`` or ``all``.
    folder: str
    #: Feed title shown by readers.
    title: str


@dataclass(frozen=True)
class Links:
    """Absolute URLs of what feeder publishes, from ``site.base_url``."""

    #: ``site.base_url`` without trailing slash.
    base_url: str

    def file(self, path: str) -> str:
        """URL of a file under ``feeds/``, percent-encoded: RSS forbids raw non-ASCII URLs."""
        return f"{self.base_url}/feeds/{quote(path)}"

    def feed(self, folder: str, file: str) -> str:
        return self.file(f"{folder}/{file}")

    def page(self, article: Article) -> str:
        return self.file(article_page_path(article.id))

    def item_link(self, article: Article) -> str:
        """The item's link: the source's own, else its page on this site."""
        return article.link or self.page(article)

    def image(self, name: str) -> str:
        return f"{self.base_url}/images/{quote(name)}"

    def home(self) -> str:
        return f"{self.base_url}/"


def category_folder(slug: str) -> str:
    """Where a category's feeds land under ``feeds/``."""
    return f"{CATEGORIES_FOLDER}/{slug}"


def article_page_path(article_id: str) -> str:
    """Where an article's page lands under ``feeds/``."""
    return f"{ARTICLES_FOLDER}/{article_id}.html"


def slugify(name: str) -> str:
    """A path-safe slug: letters and digits kept (case too), other runs become ``-``.

    The name is NFC-normalized first, and combining marks are kept (``हिन्दी`` keeps
    its vowel signs) unless they start the slug or follow a separator. A slug longer
    than :data:`MAX_SLUG_CHARS` characters or ``SLUG_MAX_BYTES`` bytes is cut, and
    ends with a hash of the whole name.
    """
    kept: list[str] = []
    for char in unicodedata.normalize("NFC", name):
        if char.isalnum() or (kept and kept[-1] != "-" and unicodedata.category(char)[0] == "M"):
            kept.append(char)
        elif kept and kept[-1] != "-":
            kept.append("-")
    slug = "".join(kept).strip("-")
    if len(slug) > MAX_SLUG_CHARS or len(slug.encode("utf-8")) > SLUG_MAX_BYTES:
        suffix = "-" + _short_hash(name)
        cut = slug[: MAX_SLUG_CHARS - len(suffix)].encode("utf-8")[: SLUG_MAX_BYTES - len(suffix)]
        return cut.decode("utf-8", "ignore").rstrip("-") + suffix
    return slug or "c-" + _short_hash(name)


def category_slugs(categories: Iterable[str], overrides: Mapping[str, str],
                   published: Mapping[str, str] | None = None) -> dict[str, str]:
    """Slug of each category, each its own folder on any file system.

    A slug from ``overrides`` (``feeds.slugs``) is kept as it is. Then a category
    keeps the slug it was last ``published`` under, so that a reader subscribed to
    its feed keeps it when another category comes to want the same folder. The
    others get their own slug (:func:`slugify`). A category that would share its
    folder with one before it, or with another of its kind, even differing only in
    case, gets a suffix: a hash of its name, long enough to be no other's slug.
    """
    published = published or {}
    names = list(categories)
    slugs: dict[str, str] = {}
    taken: set[str] = set()
    for wanted in ({name: overrides.get(name) for name in names},
                   {name: published.get(name) for name in names},
                   {name: slugify(name) for name in names}):
        free = {name: slug for name, slug in wanted.items() if slug and name not in slugs}
        count = Counter(slug.casefold() for slug in free.values())
        for name, slug in free.items():
            if count[slug.casefold()] == 1 and slug.casefold() not in taken:
                slugs[name] = slug
        taken |= {slug.casefold() for slug in slugs.values()}
    for name in sorted(set(names) - slugs.keys()):
        candidates = _suffixed_slugs(name)
        slug = next((c for c in candidates if c.casefold() not in taken), candidates[-1])
        slugs[name] = slug
        taken.add(slug.casefold())
    return slugs


def published_slugs(categories: Iterable[str], folders: Iterable[str]) -> dict[str, str]:
    """The slug each category was published under, as the category ``folders`` on disk
    tell (when the state database that remembers them was deleted).

    A folder with a category's own hash suffix is that category's; one with its plain
    slug is, unless another category's plain slug is the same.
    """
    present = set(folders)
    found: dict[str, str] = {}
    plain: dict[str, list[str]] = {}
    for name in categories:
        own = [slug for slug in _suffixed_slugs(name) if slug in present]
        if own:
            found[name] = own[0]
        elif (slug := slugify(name)) in present:
            plain.setdefault(slug, []).append(name)
    return found | {names[0]: slug for slug, names in plain.items() if len(names) == 1}


def _suffixed_slugs(name: str) -> list[str]:
    """A category's slug with a suffix from its name's hash, shortest first."""
    digest = _name_hash(name)
    return [f"{slugify(name)}-{digest[:n]}" for n in (*_SUFFIX_DIGITS, len(digest))]


def feed_infos(config: Config, slugs: Mapping[str, str]) -> list[FeedInfo]:
    """The feed of every article, then one per category, by category name."""
    site = config.site.title
    feeds = [FeedInfo(None, "all", site)]
    feeds += [FeedInfo(c, category_folder(slugs[c]), f"{site}: {c}") for c in sorted(slugs)]
    return feeds


def image_urls(images: Mapping[str, CachedImageInfo], links: Links) -> dict[str, str]:
    """Original URL to cached URL, for every cached image."""
    return {url: links.image(image.name) for url, image in images.items()}


def build_feed(feed: FeedInfo, articles: Sequence[Article],
               images: Mapping[str, CachedImageInfo], config: Config) -> dict[str, bytes]:
    """The feed's three documents: ``{"rss.xml": ..., "atom.xml": ..., "feed.json": ...}``."""
    links = Links(config.site.base_url)
    cached = image_urls(images, links)
    updated = max((a.last_change for a in articles), default=_EPOCH)
    gen = FeedGenerator()
    gen.register_extension("enclosure", _EnclosureExtension, _EnclosureEntryExtension)
    gen.load_extension("dc")
    gen.id(_feed_guid(feed))
    gen.title(feed.title)
    gen.subtitle(f"{feed.title}, republished by feeder")
    gen.author({"name": config.site.title})
    gen.generator("feeder", __version__)
    gen.language(config.site.language)  # RSS's <language>, Atom's xml:lang
    gen.updated(updated)
    gen.ttl(math.ceil(config.schedule.interval / 60))
    documents: dict[str, bytes] = {}
    # Image URLs point at the cache: rewritten once here, used by every format.
    bodies = [rewrite_image_urls(a.content, cached) for a in articles]
    # feedgen puts the last entry added first: add the oldest first.
    for article, body in zip(reversed(articles), reversed(bodies), strict=True):
        _add_entry(gen.add_entry(), article, body, images, links)
    for file in ("atom.xml", "rss.xml"):
        self_link = {"href": links.feed(feed.folder, file), "rel": "self"}
        # feedgen takes RSS's <link> from the last link given: the alternate goes last.
        gen.link([self_link, {"href": links.home(), "rel": "alternate"}], replace=True)
        documents[file] = gen.atom_str(pretty=True) if file == "atom.xml" else (
            gen.rss_str(pretty=True))
    documents["feed.json"] = _json_feed(feed, articles, bodies, images, cached, links,
                                        config.images, config.site.language)
    return documents


def _add_entry(entry: FeedEntry, article: Article, body: str,
               images: Mapping[str, CachedImageInfo], links: Links) -> None:
    guid = article_guid(article.path)
    entry.id(guid)
    entry.guid(guid, permalink=False)
    entry.title(article.title)
    entry.link(href=links.item_link(article), rel="alternate")
    entry.published(article.published)
    entry.updated(article.last_change)
    entry.content(body, type="html")
    # As HTML, escaped: readers read an RSS description as HTML, so text such as
    # "a <b" must not be taken for markup. (feedgen writes it into both formats.)
    entry.summary(html.escape(article.summary, quote=False), type="html")
    if article.author:
        entry.author({"name": article.author})
        entry.dc.dc_creator(article.author)
    for name in (*article.categories, *article.tags):
        entry.category(term=name)
    head = images.get(article.headimg or "")
    if head is not None:
        entry.enclosure.set(links.image(head.name), head.size, head.mime)


def _json_feed(feed: FeedInfo, articles: Sequence[Article], bodies: Sequence[str],
               images: Mapping[str, CachedImageInfo], cached: Mapping[str, str],
               links: Links, images_config: ImagesConfig, language: str) -> bytes:
    """JSON Feed 1.1 (https://jsonfeed.org/version/1.1)."""
    items = []
    for article, body in zip(articles, bodies, strict=True):
        item: dict[str, object] = {
            "id": article_guid(article.path),
            "url": links.item_link(article),
            "title": article.title,
            "content_html": body,
            "date_published": _rfc3339(article.published),
            "date_modified": _rfc3339(article.last_change),
        }
        if article.author:
            item["authors"] = [{"name": article.author}]
        if article.categories or article.tags:
            item["tags"] = [*article.categories, *article.tags]
        # From the cache (the origin refuses hotlinks), or as it is from a host feeder
        # does not fetch from.
        shown = next((url for url in (article.headimg, article.thumbnail) if url in cached), None)
        if shown is not None:
            item["image"] = cached[shown]
        elif article.headimg and not is_allowed(article.headimg, images_config):
            with contextlib.suppress(ValueError):  # a host no URI can name
                item["image"] = iri_to_uri(article.headimg)
        head = images.get(article.headimg or "")
        if head is not None:
            item["attachments"] = [{"url": cached[article.headimg or ""], "mime_type": head.mime,
                                    "size_in_bytes": head.size}]
        items.append(item)
    document = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": feed.title,
        "language": language,
        "home_page_url": links.home(),
        "feed_url": links.feed(feed.folder, "feed.json"),
        "items": items,
    }
    # Not indented: only then does json use its C encoder, 10 times faster.
    return json.dumps(document, ensure_ascii=False).encode() + b"\n"


def build_article_page(article: Article, images: Mapping[str, CachedImageInfo],
                       slugs: Mapping[str, str], config: Config) -> bytes:
    """A readable page of one article: the item's link when the source has none."""
    links = Links(config.site.base_url)
    esc = html.escape
    categories = ", ".join(
        f'<a href="{esc(links.feed(category_folder(slugs[c]), "rss.xml"))}">{esc(c)}</a>'
        for c in article.categories if c in slugs
    )
    byline = " · ".join(filter(None, [
        esc(article.author or ""),
        f'<time datetime="{_rfc3339(article.published, "seconds")}">'
        f'{article.published.astimezone(config.site.tz).strftime("%Y-%m-%d %H:%M %z")}</time>',
        categories,
    ]))
    body = rewrite_image_urls(article.content, image_urls(images, links))
    return _page(article.title, f"<article>\n<h1>{esc(article.title)}</h1>\n"
                 f'<p class="byline">{byline}</p>\n{body}\n</article>', head="",
                 language=config.site.language)


def build_opml(feeds: Sequence[FeedInfo], config: Config) -> bytes:
    """OPML 2.0 listing every feed, so a reader imports them all at once."""
    links = Links(config.site.base_url)
    opml = ElementTree.Element("opml", version="2.0")
    head = ElementTree.SubElement(opml, "head")
    ElementTree.SubElement(head, "title").text = config.site.title
    body = ElementTree.SubElement(opml, "body")
    for feed in feeds:
        ElementTree.SubElement(body, "outline", type="rss", text=feed.title, title=feed.title,
                               xmlUrl=links.feed(feed.folder, "rss.xml"),
                               htmlUrl=links.home())
    ElementTree.indent(opml)
    return ElementTree.tostring(opml, encoding="utf-8", xml_declaration=True) + b"\n"


def build_index(feeds: Sequence[FeedInfo], counts: Mapping[str, int], total: int,
                config: Config) -> bytes:
    """The index page: every feed for a person, with autodiscovery links for readers.

    ``counts`` are the articles of each category, ``total`` all articles.
    """
    links = Links(config.site.base_url)
    esc = html.escape
    discovery = "".join(
        f'<link rel="alternate" type="application/rss+xml" title="{esc(f.title)}" '
        f'href="{esc(links.feed(f.folder, "rss.xml"))}">\n' for f in feeds
    )
    rows = []
    for feed in feeds:
        count = counts.get(feed.category, 0) if feed.category else total
        name = esc(feed.category or "All articles")
        formats = " ".join(
            f'<a href="{esc(links.feed(feed.folder, file))}">{label}</a>'
            for file, label in zip(FEED_FILES, ("RSS", "Atom", "JSON"), strict=True)
        )
        rows.append(f"<li>{name} ({count}): {formats}</li>")
    opml = esc(links.file("index.opml"))
    body = (f"<h1>{esc(config.site.title)}</h1>\n<p>Subscribe to a feed, or import "
            f'<a href="{opml}">all of them (OPML)</a>.</p>\n<ul>\n' + "\n".join(rows) + "\n</ul>")
    return _page(config.site.title, body, head=discovery, language=config.site.language)


def _page(title: str, body: str, head: str, language: str) -> bytes:
    return (
        f'<!DOCTYPE html>\n<html lang="{html.escape(language)}">\n'
        '<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{html.escape(title)}</title>\n{head}"
        "<style>body{max-width:42em;margin:2em auto;padding:0 1em;font-family:sans-serif;"
        "line-height:1.6}img{max-width:100%;height:auto}.byline{color:#666}</style>\n"
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    ).encode()


def _feed_guid(feed: FeedInfo) -> str:
    """Feed id independent of ``site.base_url``; the feed of every article has one of
    its own, which no category's can be (not even one named "all")."""
    return article_guid(f"feed:{feed.category}") if feed.category is not None else _ALL_FEED_ID


def _rfc3339(value: datetime, timespec: str = "auto") -> str:
    """``value`` in UTC, as ``2022-03-30T03:17:49Z``; HTML's ``<time>`` takes no
    more than milliseconds, so pages ask for ``timespec="seconds"``."""
    return value.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _short_hash(name: str) -> str:
    return _name_hash(name)[: _SUFFIX_DIGITS[0]]


def _name_hash(name: str) -> str:
    """The SHA-1 of a category name, in hex: where slug suffixes come from."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


class _EnclosureExtension(BaseExtension):
    """Feed half of the enclosure extension (feedgen needs one; it adds nothing)."""


class _EnclosureEntryExtension(BaseEntryExtension):
    """An item's enclosure, written by us for RSS and Atom alike.

    feedgen 1.0.0 drops ``rel``, ``type`` and ``length`` from Atom entry links, so
    its own enclosure becomes a second *alternate* link and readers open the image
    instead of the article. This extension writes the elements itself.
    """

    def __init__(self) -> None:
        self._enclosure: tuple[str, int, str] | None = None

    def set(self, url: str, length: int, mime: str) -> None:
        self._enclosure = (url, length, mime)

    def extend_rss(self, entry: etree._Element) -> etree._Element:
        if self._enclosure:
            url, length, mime = self._enclosure
            etree.SubElement(entry, "enclosure", url=url, length=str(length), type=mime)
        return entry

    def extend_atom(self, entry: etree._Element) -> etree._Element:
        if self._enclosure:
            url, length, mime = self._enclosure
            # In the feed's default namespace, as feedgen writes its own elements.
            etree.SubElement(entry, "link", rel="enclosure",
                             href=url, length=str(length), type=mime)
        return entry
