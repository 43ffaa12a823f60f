"""A deterministic corpus of articles shaped like ``samples/cls-seed.md``.

YAML front matter (title, categories, author, date, headimg, thumbnail, comments),
an HTML body of 2–8 KB, 1–3 of 40 categories with a Zipf-like spread, about four
``https://img.cls.cn/images/...`` references each, and the three date forms (RFC 822,
ISO 8601 with offset, Hexo's ``2022-03-30 11:17:49``).
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

CATEGORIES = (
    "金融", "财联社", "深度", "科创板", "港股", "美股", "A股", "基金", "债券", "期货",
    "外汇", "黄金", "原油", "新能源", "半导体", "人工智能", "医药", "消费", "地产", "银行",
    "保险", "券商", "汽车", "光伏", "锂电", "军工", "农业", "传媒", "游戏", "教育",
    "宏观", "政策", "公司", "研报", "IPO", "并购", "电报", "早报", "晚报", "环球",
)
#: Zipf weights (s = 1.1): the first categories hold most of the articles.
WEIGHTS = tuple(1 / (rank**1.1) for rank in range(1, len(CATEGORIES) + 1))
_EPOCH = datetime(2022, 3, 30, 3, 17, 49, tzinfo=UTC)
_PARAGRAPH = (
    "伴随着上海疫情防控举措的持续落地，在沪保险公司均在严格按照政府防疫要求做好疫情防控的同时，"
    "稳妥推动线下服务，并利用科技平台，多措并举提升线上办公效率，确保公司经营、客户服务最大程度得到保障。"
)
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def image_url(rng: random.Random, day: str) -> str:
    name = "".join(rng.choice(_ALPHABET) for _ in range(10))
    return f"https://img.cls.cn/images/{day}/{name}.png"


def _date(rng: random.Random, when: datetime, form: int) -> str:
    if form == 0:  # RFC 822
        return when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    local = when + timedelta(hours=8)
    if form == 1:  # ISO 8601 with offset
        return local.strftime("%Y-%m-%dT%H:%M:%S+08:00")
    return local.strftime("%Y-%m-%d %H:%M:%S")  # Hexo, in the configured zone


def article(rng: random.Random, index: int) -> str:
    """The text of article ``index``; every value comes from ``rng``."""
    when = _EPOCH - timedelta(minutes=index * 7 + rng.randrange(7))
    day = when.strftime("%Y%m%d")
    count = rng.choice((1, 1, 2, 2, 3))
    categories: list[str] = []
    while len(categories) < count:
        name = rng.choices(CATEGORIES, WEIGHTS)[0]
        if name not in categories:
            categories.append(name)
    images = [image_url(rng, day) for _ in range(rng.choice((3, 4, 4, 5)))]
    target = rng.randint(2048, 8192)
    parts = ['<div>\n<div class="m-b-10">']
    size, n = 0, 0
    while size < target:
        text = _PARAGRAPH[rng.randrange(20):] + f"（第{index}篇，第{n}段）"
        paragraph = f"<p>{text}</p>"
        if n < len(images):
            paragraph += (f'\n<p><img src="{images[n]}" alt="image" '
                          'referrerpolicy="no-referrer"></p>')
        parts.append(paragraph)
        size += len(paragraph.encode())
        n += 1
    parts += [f'<p><img src="{u}" alt="image"></p>' for u in images[n:]]
    parts.append("</div>\n</div>")
    lines = [
        "---",
        f"title: '财联社第{index}篇：{_PARAGRAPH[:rng.randrange(10, 30)]}'",
        "categories: ",
        *(f" - {c}" for c in categories),
        f"headimg: '{images[0]}'",
        "author: 财联社",
        "comments: false",
        f"date: {_date(rng, when, index % 3)}",
        f"thumbnail: '{images[0]}'",
        "---",
        "",
        "\n".join(parts),
        "",
    ]
    return "\n".join(lines)


def article_path(root: Path, index: int) -> Path:
    """Files spread over folders of 500, as a scraper's dated folders would be."""
    return root / f"{index // 500:04d}" / f"cls-{index:06d}.md"


def generate(root: Path, n: int, seed: int = 1, start: int = 0) -> list[Path]:
    """Write articles ``start`` … ``start + n - 1`` under ``root``; same seed, same bytes."""
    paths = []
    for index in range(start, start + n):
        rng = random.Random(f"{seed}:{index}")
        path = article_path(root, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(article(rng, index), encoding="utf-8")
        paths.append(path)
    return paths


def edit(path: Path) -> None:
    """Change one article's body (and so its size and mtime)."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("</div>\n</div>", "<p>更新。</p></div>\n</div>", 1),
                    encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
