"""Image references in article HTML: found, checked against the allowed hosts, rewritten.

Pure functions of strings and the images config: what parsing needs of images,
without the fetcher's network stack (aiohttp alone costs a parsing worker 24 MB).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from html import unescape
from typing import Final
from urllib.parse import urljoin, urlsplit

from feeder.config import ImagesConfig

#: Attributes a lazy-loading script takes an ``<img>``'s real URL from.
LAZY_ATTRIBUTES: Final = ("data-src", "data-original")
#: The attribute a lazy-loading script takes an ``<img>``'s real ``srcset`` from.
LAZY_SRCSET: Final = "data-srcset"
#: Attributes holding one image URL, on ``<img>``.
URL_ATTRIBUTES: Final = ("src", *LAZY_ATTRIBUTES)
#: Attributes holding a ``srcset`` (comma-separated candidates), on ``<img>`` and ``<source>``.
SRCSET_ATTRIBUTES: Final = ("srcset", LAZY_SRCSET)
_SRCSET_SPACE: Final = " \t\n\r\f"
#: A URL's scheme, and what a browser ignores in reading it (tabs and line breaks
#: anywhere; controls and spaces in front, and XML drops the controls anyway).
_SCHEME: Final = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")
_IGNORED_IN_URL: Final = dict.fromkeys(map(ord, "\t\n\r"))
_C0_AND_SPACE: Final = "".join(map(chr, range(0x21)))
#: An http(s) URL with a plain ASCII host and maybe a port, up to its path: urlsplit
#: finds a scheme and this host (lowercased) in each, and never raises.
_PLAIN_HTTP_URL: Final = re.compile(
    r"https?://([a-z0-9._~-]+)(?::[0-9]*)?(?:[/?#]|\Z)", re.IGNORECASE | re.ASCII
)


def rewrite_image_urls(html: str, mapping: Mapping[str, str]) -> str:
    """The fragment with each image URL that is a key of ``mapping`` replaced by its value.

    ``html`` is an article's content, nh3's output: its tags are edited as text (see
    :func:`show_lazy_images`), and ``html`` itself is returned when nothing is
    replaced, so an article without a cached image costs nothing.
    """
    if not mapping or not any(references(html, url) for url in mapping):
        return html

    def rewrite(tag: re.Match[str]) -> str:
        attributes = dict(_ATTRIBUTE.findall(tag[2]))
        changed = False
        for attribute in _image_attributes(tag[1]):
            if (value := attributes.get(attribute)) is None:
                continue
            candidates = _candidates(attribute, unescape(value))
            if any(url in mapping for url, _ in candidates):
                joined = _joined([(mapping.get(url, url), d) for url, d in candidates])
                attributes[attribute] = _escaped(joined)
                changed = True
        return _start_tag(tag[1], attributes) if changed else tag[0]

    return _IMAGE_TAG.sub(rewrite, html)


def references(html: str, url: str) -> bool:
    """Does ``html`` (nh3's output) hold ``url``, in an attribute or in text?"""
    return url in html or _escaped(url) in html


def show_lazy_images(html: str) -> str:
    """Give a lazy-loading ``<img>`` (``data-src``) its real URL as ``src``.

    In place of its placeholder (a grey GIF, a spinner), or of no ``src`` at all: feed
    readers and the article pages run no script, so they would show the placeholder,
    or nothing. Its ``data-srcset`` becomes its ``srcset`` likewise.
    ``html`` is nh3's output, where every attribute is written ``name="value"``: the
    tags are edited as text, and ``html`` itself is returned when nothing changes.
    (Serializing a parse again would change the markup: libxml2 percent-encodes URLs
    and moves tags as HTML 4 nests them.)
    """
    if not any(attribute in html for attribute in LAZY_ATTRIBUTES):  # data-srcset too
        return html
    shown = _IMAGE_TAG.sub(_with_lazy_src, html)
    return html if shown == html else shown


#: A start tag of an image element as nh3 writes it, and one of its attributes.
_IMAGE_TAG = re.compile(r'<(img|source)((?:\s+[^\s"=>]+="[^"]*")*)\s*>')
_ATTRIBUTE = re.compile(r'([^\s"=>]+)="([^"]*)"')


def _with_lazy_src(tag: re.Match[str]) -> str:
    if tag[1] != "img":
        return tag[0]
    attributes = dict(_ATTRIBUTE.findall(tag[2]))
    shown = dict(attributes)
    lazy = next(filter(None, map(attributes.get, LAZY_ATTRIBUTES)), "")
    url = absolute_url(unescape(lazy).strip())
    if is_absolute_http(url):  # never javascript: or data:
        shown["src"] = _escaped(url)
    if attributes.get(LAZY_SRCSET):  # its URLs were checked as the srcset's are
        shown["srcset"] = attributes[LAZY_SRCSET]
    return tag[0] if shown == attributes else _start_tag("img", shown)


def _start_tag(name: str, attributes: dict[str, str]) -> str:
    """A start tag as nh3 writes it, from attribute values already escaped."""
    return f"<{name}" + "".join(f' {key}="{value}"' for key, value in attributes.items()) + ">"


def _escaped(value: str) -> str:
    """An attribute's value as nh3 writes it between double quotes."""
    return value.translate(_NH3_ATTRIBUTE_ESCAPES)


#: What nh3 (0.3.7 on: html5ever) escapes in an attribute's value.
_NH3_ATTRIBUTE_ESCAPES: Final = str.maketrans(
    {"&": "&amp;", '"': "&quot;", "<": "&lt;", ">": "&gt;", "\xa0": "&nbsp;"})


def _joined(candidates: list[tuple[str, str]]) -> str:
    """An attribute's value from its candidates; a plain one is one URL, no descriptor."""
    return ", ".join(f"{url} {descriptor}".rstrip() for url, descriptor in candidates)


def _candidates(attribute: str, value: str) -> list[tuple[str, str]]:
    if attribute in SRCSET_ATTRIBUTES:
        return _parse_srcset(value)
    return [(value.strip(), "")]


class ImageCollector:
    """An nh3 ``attribute_filter`` that notes the image URLs of the HTML being cleaned.

    It notes them while nh3 parses, so the cleaned HTML is never parsed again.
    A protocol-relative URL (``//img.cls.cn/...``) becomes ``https:``: a reader would
    resolve it against the feed's address, and the image is the origin's. So does
    a relative image or link URL become absolute, when the article names its
    original page (:attr:`base`).
    One collector serves one clean at a time: :meth:`take` returns and forgets.
    """

    def __init__(self) -> None:
        self._found: dict[str, None] = {}
        #: The URL of the page the HTML being cleaned comes from, if known.
        self.base: str | None = None

    def __call__(self, tag: str, attribute: str, value: str) -> str | None:
        if tag in ("img", "source") and attribute in _image_attributes(tag):
            candidates = _candidates(attribute, value)
            # Every image URL is http(s) or relative: nh3 checks the scheme of src
            # alone, and lets ftp: and others through; not srcset's, nor data-src's,
            # which :func:`show_lazy_images` may make the src.
            safe = [(self._absolute(url), d) for url, d in candidates
                    if not _has_unsafe_scheme(url)]
            if not safe:
                return None  # the attribute is dropped
            if safe != candidates:
                value = _joined(safe)
            for url, _ in safe:
                if is_absolute_http(url):
                    self._found.setdefault(url, None)
        elif attribute == "href" and self.base is not None:
            return urljoin(self.base, value.strip())  # nh3 checks its scheme
        return value

    def _absolute(self, url: str) -> str:
        if self.base is None or url.startswith("//") or is_absolute_http(url):
            return absolute_url(url)  # //img.cls.cn is https:, even on an http: page
        return urljoin(self.base, url)

    def take(self) -> list[str]:
        found = list(self._found)
        self._found.clear()
        return found


def _image_attributes(tag: str) -> tuple[str, ...]:
    if tag == "source":
        return SRCSET_ATTRIBUTES
    return URL_ATTRIBUTES + SRCSET_ATTRIBUTES


def _parse_srcset(value: str) -> list[tuple[str, str]]:
    """``srcset`` candidates as (URL, descriptor), following the HTML parsing algorithm."""
    candidates: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and (value[i] in _SRCSET_SPACE or value[i] == ","):
            i += 1
        start = i
        while i < n and value[i] not in _SRCSET_SPACE:
            i += 1
        url = value[start:i]
        if not url:
            break
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start, depth = i, 0
            while i < n:
                char = value[i]
                if char == "(":
                    depth += 1
                elif char == ")" and depth:
                    depth -= 1
                elif char == "," and not depth:
                    break
                i += 1
            descriptor = " ".join(value[start:i].split())
            i += 1
        if url:
            candidates.append((url, descriptor))
    return candidates


def _has_unsafe_scheme(url: str) -> bool:
    """Whether a browser would take ``url`` by another scheme than http(s): ``javascript:``."""
    if url.startswith(("https://", "http://", "/")):
        return False  # most URLs: known without the regex, at a fifth of its cost
    scheme = _SCHEME.match(url.translate(_IGNORED_IN_URL).lstrip(_C0_AND_SPACE))
    return scheme is not None and scheme[1].lower() not in ("http", "https")


def absolute_url(url: str) -> str:
    """``url``, with ``https:`` in front if it is protocol-relative (``//host/...``)."""
    return f"https:{url}" if url.startswith("//") else url


def is_absolute_http(url: str) -> bool:
    """Is ``url`` an http(s) URL with a host?"""
    if _PLAIN_HTTP_URL.match(url):
        return True  # what urlsplit says of these, at a fifth of its cost (sources have many)
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


# -- allowed hosts ------------------------------------------------------------------------


def is_allowed(url: str, config: ImagesConfig) -> bool:
    """True for an http(s) URL whose host is on ``config.allowed_hosts`` (exact, any case)."""
    return is_allowed_by(url, allowed_hosts(config))


def allowed_urls(urls: Iterable[str], config: ImagesConfig) -> list[str]:
    """Those of ``urls`` that :func:`is_allowed`, in order: the images feeder fetches."""
    hosts = allowed_hosts(config)
    return [url for url in urls if is_allowed_by(url, hosts)]


def allowed_hosts(config: ImagesConfig) -> frozenset[str]:
    """``config.allowed_hosts``, as :func:`url_host` gives hosts."""
    return frozenset(allowed.lower().rstrip(".") for allowed in config.allowed_hosts)


def is_allowed_by(url: str, hosts: frozenset[str]) -> bool:
    """:func:`is_allowed`, with the :func:`allowed_hosts` of a config."""
    return is_absolute_http(url) and url_host(url) in hosts


def url_host(url: str) -> str | None:
    """The host of an absolute URL, lowercased, without a trailing dot."""
    if match := _PLAIN_HTTP_URL.match(url):
        return match[1].lower().rstrip(".")
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None
