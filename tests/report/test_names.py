"""Any module name round-trips: callback -> TensorBoard and CSV -> the report's HTML page and
Markdown document, each name shown as it is, never as markup, never split into a phantom
block (one fit and two reports shared by every case)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from markdown_it import MarkdownIt
from torch import nn
from torch.utils.data import DataLoader

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.report import load_runs, parse_tags, write_report

from ..callbacks.cb_models import FakeBlock, make_data

#: ModuleDict keys (any string but "" and those holding "."), each a block of its own.
NAMES = [
    "res/3x3", "a%2Fb 100%", "héllo 注意力 🙂", "say \"hi\", it's", "<img src=x onerror=alert(1)>",
    "back`tick` ```", "a|b *s* _u_ [l](http://x) #h &amp; \\", "$x^2$", "_hidden", "attn",
    "tab\there\nnew line", "trailing ",
]
#: A block whose masks carry odd names (a mask name cannot hold "/" nor be a group's name).
ODD_MASKS = ("_m", "m%2F", "<i>m&lt;")


class OddMasks(FakeBlock):
    mask_names = ODD_MASKS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask_of(x)
        self.record(masks={m: mask * (i + 1) / 4 for i, m in enumerate(ODD_MASKS)},
                    router_weights=self.router_of(x))
        return x * mask * self.gain


class NamedNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({name: FakeBlock() for name in NAMES})
        self.blocks["odd masks"] = OddMasks()
        self.head = nn.Linear(64, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = torch.full_like(x, 0.5) + 0.01 * x  # nearly flat masks: every block warns
        h = sum(block(x) for block in self.blocks.values())
        return F.cross_entropy(self.head(h.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(make_data(24), batch_size=8)


@dataclass(frozen=True)
class Written:
    callback: AttentionDiagnostics
    logs: dict[str, Path]  # "tensorboard" / "csv" -> the logger's folder
    report: Path  # the report's folder (of the TensorBoard log)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    root = tmp_path_factory.mktemp("names")
    tb, csv = TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")
    callback = AttentionDiagnostics(num_images=0, summary=False, log_every_n_steps=1)
    trainer = Trainer(max_steps=3, logger=[tb, csv], callbacks=[callback], accelerator="cpu",
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every block collapses, as planned
        trainer.fit(NamedNet())
    logs = {"tensorboard": Path(tb.log_dir), "csv": Path(csv.log_dir)}
    report = root / "report"  # the page is written alike from either log
    write_report(logs["tensorboard"], report, progress=False)
    return Written(callback, logs, report)


def _qualified(name: str) -> str:
    return f"blocks.{name}"


class _Elements(HTMLParser):
    """Every element's tag and attributes, and the exact text of each h3 and td."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.texts: dict[str, list[str]] = {"h3": [], "td": []}
        self._open: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in self.texts:
            self._open.append((tag, []))

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            t, parts = self._open.pop()
            self.texts[t].append("".join(parts))

    def handle_data(self, data):
        for _, parts in self._open:
            parts.append(data)


def _elements(html: str) -> _Elements:
    parser = _Elements()
    parser.feed(html)
    return parser


#: The elements the page and the rendered Markdown are made of: anything else came from a
#: name.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "p",
             "nav", "a", "table", "thead", "tbody", "tr", "th", "td", "span", "code",
             "strong", "em", "div", "ul", "li", "details", "summary", "figure", "img",
             "figcaption", "footer", "blockquote", "br"}


def test_no_name_becomes_markup_and_no_block_is_a_phantom(written):
    html = (written.report / "report.html").read_text(encoding="utf-8")
    page = _elements(html)
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in page.tags
               if t == "img")
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids))  # names that slug alike keep their own anchors
    blocks = {_qualified(n) for n in NAMES} | {_qualified("odd masks")}
    assert set(page.texts["h3"]) - {"Verdicts", "Warnings"} == blocks  # no phantom block

    markdown = (written.report / "report.md").read_text(encoding="utf-8")
    rendered = _elements(MarkdownIt("commonmark").enable("table").render(markdown))
    assert {tag for tag, _ in rendered.tags} <= PAGE_TAGS
    assert all(Path(a["src"]).name == a["src"] and a["src"].endswith(".png")
               and (written.report / a["src"]).is_file()
               for t, a in rendered.tags if t == "img")
    shown = {re.sub(r"\n", " ", b) for b in blocks}
    assert set(rendered.texts["h3"]) - {"Verdicts", "Warnings"} == shown


@pytest.mark.parametrize("name", [*NAMES, "odd masks"])
def test_a_name_round_trips_to_its_own_statistics_in_every_format(written, name):
    block = _qualified(name)
    masks = ODD_MASKS if name == "odd masks" else ("mask",)
    for kind, path in written.logs.items():
        (run,) = load_runs(path, progress=False)
        series = parse_tags(run).train[block]
        assert set(series.masks) == set(masks), kind
        assert all(len(series.masks[m]["std"]) == 3 for m in masks), kind
        assert len(series.router["usage"]) == 3 and len(series.params["value"]["temperature"])
    stats = written.callback.last_stats.blocks[block]  # what the callback logged last
    assert stats.masks[masks[0]].std < 0.02
    page = _elements((written.report / "report.html").read_text(encoding="utf-8"))
    assert block in page.texts["td"]  # the verdict table's cell, exactly the name
    verdict = page.texts["td"][page.texts["td"].index(block) + 1]
    assert verdict.startswith("problem") and "collapse" in verdict, verdict
