"""A small HTML reader for the report tests: headings, images, links, verdict lines."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from html.parser import HTMLParser

PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Page:
    headings: list[tuple[str, str, str]] = field(default_factory=list)  # (tag, id, text)
    images: list[dict[str, str]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # every href / src
    verdicts: list[str] = field(default_factory=list)  # text of <p class="verdict">
    text: str = ""

    def heading_texts(self, tag: str) -> list[str]:
        return [text for t, _, text in self.headings if t == tag]

    def png_images(self) -> list[bytes]:
        out = []
        for img in self.images:
            src = img.get("src", "")
            assert src.startswith("data:image/png;base64,"), src[:60]
            data = base64.b64decode(src.split(",", 1)[1])
            assert data.startswith(PNG)
            out.append(data)
        return out


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._open: list[tuple[str, dict]] = []
        self._buf: list[str] = []
        self._all: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        for key in ("href", "src"):
            if key in a:
                self.page.urls.append(a[key])
        if tag == "img":
            self.page.images.append(a)
        if tag in ("h1", "h2", "h3") or (tag == "p" and a.get("class") == "verdict"):
            self._open.append((tag, a))
            self._buf = []

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            t, a = self._open.pop()
            text = " ".join("".join(self._buf).split())
            if t == "p":
                self.page.verdicts.append(text)
            else:
                self.page.headings.append((t, a.get("id", ""), text))

    def handle_data(self, data):
        self._buf.append(data)
        self._all.append(data)


def read_page(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    reader.page.text = " ".join("".join(reader._all).split())
    return reader.page
