"""What images an HTML fragment references, read with lxml: a check, independent of
nh3, on the URLs feeder notes while sanitizing and on those it rewrites."""

from __future__ import annotations

import lxml.html
from lxml import etree

from feeder.imagehtml import _candidates, _image_attributes, is_absolute_http


def extract_image_urls(html: str) -> list[str]:
    """Absolute http(s) image URLs referenced by an HTML fragment, once each, in order."""
    try:
        root = lxml.html.fragment_fromstring(html, create_parent="div")
    except (etree.ParserError, ValueError):
        return []
    found: dict[str, None] = {}
    for element in root.iter("img", "source"):
        for attribute in _image_attributes(element.tag):
            value = element.get(attribute)
            for url, _ in _candidates(attribute, value) if value is not None else ():
                if is_absolute_http(url):
                    found.setdefault(url, None)
    return list(found)
