"""The tag schema: every name the diagnostics log under, formatted and parsed in one place.

Training statistics (every logging step) are ``attn/<block>/<group>/<leaf>``; evaluation
statistics (one point per validation / test run) carry the stage in front:
``val/attn/<block>/...``, ``test/attn/<block>/...``, like Lightning users' ``val/loss``.
``<group>`` is ``router``, ``param``, ``heads`` or a mask's name; ``<leaf>`` comes from the
quantity's declaration (:mod:`.statistics`): ``mean``, ``usage_2``, ``temperature_grad_norm``,
``max_logit``. The per-head values behind the ``heads`` scalars are one JSON record per point
(:data:`HEADS_TAG`, :func:`head_record`), not a scalar each, and drawn as an image
(:data:`HEADS_MAP_TAG`).
:class:`ScalarTag` formats and parses them (a round trip), :func:`scalar_metrics` writes a
point's scalars, :func:`chart_layout` the TensorBoard charts, all from the declarations.

Names are the modules' own (any string a ``ModuleDict`` key can be): in a tag, a block, mask
or parameter name has ``%``, ``/`` and control characters percent-encoded
(:func:`encode_name`; ``"res/3x3"`` -> ``"res%2F3x3"``), so a tag splits one way only; every
other name (unicode, quotes, HTML included) is written as it is.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np

from .point import PointColumns
from .statistics import (
    PARAM_QUANTITIES,
    RESERVED_GROUPS,
    BlockInfo,
    GlobalStats,
    HeadStats,
    MaskStats,
    Quantity,
    RouterStats,
    quantities,
)

__all__ = [
    "CONFIG_TAG",
    "EVALUATION_TAG",
    "HEADS_MAP_TAG",
    "HEADS_TAG",
    "PREFIX",
    "PROBLEMS_TAG",
    "ScalarTag",
    "chart_layout",
    "decode_name",
    "encode_name",
    "head_record",
    "histogram_tag",
    "is_attention_tag",
    "maps_tag",
    "scalar_columns",
    "scalar_metrics",
    "stage_prefix",
    "tag_table",
]

PREFIX = "attn"
PROBLEMS_TAG = f"{PREFIX}/problems"
CONFIG_TAG = f"{PREFIX}/config"
#: One JSON record per ``validate``/``test`` call: the step of the weights it evaluated (that
#: of their checkpoint; ``null`` when unknown) and the step Lightning logged its metrics at.
EVALUATION_TAG = f"{PREFIX}/evaluation"
#: One JSON record per training point: block -> each per-head quantity's values.
HEADS_TAG = f"{PREFIX}/heads"
#: The layer x head heatmaps of the heads' entropy and max logit: an image at the training
#: points that write histograms.
HEADS_MAP_TAG = f"{PREFIX}/heads_map"
_MAPS = "maps"
#: The quantities of each tag group (a mask's name is any group but these).
_GROUPS: dict[str, tuple[Quantity, ...]] = {
    "router": quantities(RouterStats),
    "param": PARAM_QUANTITIES,
    "heads": quantities(HeadStats),
    "mask": quantities(MaskStats),
}
#: The groups that name a section (any other group is a mask's name).
_NAMED = RESERVED_GROUPS


def _percent(char: str) -> str:
    # UTF-8 bytes; a lone surrogate (a str Python allows) keeps its three bytes.
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def encode_name(name: str) -> str:
    """``name`` as one part of a tag: ``%``, ``/`` and control characters (and lone
    surrogates, which no log format can store) percent-encoded; any other name unchanged
    (``encode_name("stages.0.attn") == "stages.0.attn"``)."""
    return "".join(
        _percent(c) if c in "%/" or unicodedata.category(c) in ("Cc", "Cs") else c
        for c in name
    )


def decode_name(part: str) -> str:
    """The name :func:`encode_name` wrote as ``part``."""
    return unquote(part, errors="surrogatepass") if "%" in part else part


def stage_prefix(stage: str = "train") -> str:
    """``attn`` for training, ``val/attn`` / ``test/attn`` for evaluation."""
    return PREFIX if stage == "train" else f"{stage}/{PREFIX}"


def _leaf_pattern(q: Quantity) -> re.Pattern:
    pattern = re.escape(q.tag).replace(r"\{branch\}", r"(?P<branch>\d+)")
    return re.compile(pattern.replace(r"\{param\}", r"(?P<param>.+?)") + "$")


_PATTERNS = {
    group: [(q, _leaf_pattern(q)) for q in declared if q.tag is not None]
    for group, declared in _GROUPS.items()
}
# A parameter named like "x_grad_norm" is its own value only when no gradient reading
# fits; the gradient's pattern is tried first.
_PATTERNS["param"].sort(key=lambda item: -len(item[0].tag))


@dataclass(frozen=True)
class ScalarTag:
    """One scalar's tag, split: ``stage`` (``"train"``, ``"val"``, ``"test"``), ``block``,
    ``group`` (``"router"``, ``"param"`` or a mask name), ``quantity`` (the declaration's
    name: ``"mean"``, ``"usage"``, ``"grad_norm"``), ``branch`` and ``param`` where the
    quantity has one."""

    stage: str
    block: str
    group: str
    quantity: str
    branch: int | None = None
    param: str | None = None

    @property
    def section(self) -> str:
        return self.group if self.group in _NAMED else "mask"

    def declaration(self) -> Quantity:
        return next(q for q in _GROUPS[self.section] if q.name == self.quantity)

    def format(self) -> str:
        return _format(self)

    @classmethod
    def parse(cls, tag: str) -> ScalarTag | None:
        """The parts of a diagnostics scalar tag, else ``None``. A training tag has four
        parts and an evaluation tag five, so a block named ``attn`` is still told apart."""
        parts = tag.split("/")
        if len(parts) == 4 and parts[0] == PREFIX:
            stage, rest = "train", parts[1:]
        elif len(parts) == 5 and parts[1] == PREFIX and parts[0]:
            stage, rest = parts[0], parts[2:]
        else:
            return None
        block, group, leaf = rest
        section = group if group in _NAMED else "mask"
        for q, pattern in _PATTERNS[section]:
            found = pattern.match(leaf)
            if found:
                named = found.groupdict()
                branch = int(named["branch"]) if named.get("branch") is not None else None
                param = named.get("param")
                return cls(stage, decode_name(block), decode_name(group), q.name, branch,
                           None if param is None else decode_name(param))
        return None


@functools.lru_cache(maxsize=65536)
def _format(tag: ScalarTag) -> str:
    # Cached: a run logs the same few dozen tags at every point.
    param = None if tag.param is None else encode_name(tag.param)
    leaf = tag.declaration().leaf(branch=tag.branch, param=param)
    group = tag.group if tag.section != "mask" else encode_name(tag.group)
    return "/".join((stage_prefix(tag.stage), encode_name(tag.block), group, leaf))


def is_attention_tag(tag: str) -> bool:
    """Whether ``tag`` is one of the diagnostics' (scalars, maps, texts)."""
    parts = tag.split("/")
    return parts[0] == PREFIX or (len(parts) > 1 and parts[1] == PREFIX)


def histogram_tag(block: str, name: str, stage: str = "train") -> str:
    """``attn/<block>/<mask>/hist`` or, for ``name == "router"``, ``.../router/weights_hist``."""
    leaf = (encode_name(name), "hist") if name != "router" else ("router", "weights_hist")
    return "/".join((stage_prefix(stage), encode_name(block), *leaf))


def maps_tag(stage: str) -> str:
    """``val/attn/maps`` or ``test/attn/maps`` (``attn/maps`` for training)."""
    return f"{stage_prefix(stage)}/{_MAPS}"


def maps_stage(tag: str) -> str | None:
    """The stage of an attention-map tag, else ``None``."""
    if tag == f"{PREFIX}/{_MAPS}":
        return "train"
    parts = tag.split("/")
    return parts[0] if len(parts) == 3 and parts[1:] == [PREFIX, _MAPS] else None


def _tag_columns(point: PointColumns, stage: str, sections: frozenset[str]) -> tuple:
    """What :func:`scalar_columns` writes, from the point's structure: the tags in block
    order, the columns of values ``(section, group index, quantity, branch)`` (``branch``: a
    per-branch quantity's branch; for parameters ``quantity`` is ``value`` or
    ``grad_norm``), and the permutation that puts their concatenation in block order."""
    tags, blocks, spec = [], [], []
    for section in ("router", "mask", "heads"):
        if section not in sections:
            continue
        for g, items in enumerate(point.groups(section)):
            for q in _GROUPS[section]:
                if q.tag is None:
                    continue
                for branch in (range(items.width) if q.per_branch else (None,)):
                    tags += [ScalarTag(stage, point.names[b],
                                       items.names[i] if section == "mask" else section,
                                       q.name, branch=branch).format()
                             for i, b in enumerate(items.block.tolist())]
                    blocks.append(items.block)
                    spec.append((section, g, q.name, branch))
    if "param" in sections:
        p = point.params
        for q in PARAM_QUANTITIES:
            tags += [ScalarTag(stage, point.names[b], "param", q.name, param=n).format()
                     for b, n in zip(p.block.tolist(), p.names, strict=True)]
            blocks.append(p.block)
            spec.append(("param", 0, q.name, None))
    order = np.argsort(np.concatenate(blocks), kind="stable") if blocks else np.zeros(
        0, dtype=np.int64)
    return [tags[i] for i in order.tolist()], spec, order


def scalar_columns(
    stats: GlobalStats, sections: Iterable[str]
) -> tuple[list[str], np.ndarray]:
    """The tags and values (one array) of every logged quantity of ``stats`` in
    ``sections``, under the point's phase, block by block: a few array operations however
    many blocks the point has (the tags are made once per run and stage when the point
    comes from the collector's plan)."""
    point = stats.point()
    key = (stats.phase, frozenset(sections))
    cache = point.tag_cache
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = _tag_columns(point, *key)
        if cache is not None:
            cache[key] = plan
    tags, spec, order = plan
    if not spec:
        return [], np.zeros(0)
    groups = {section: list(point.groups(section)) for section in ("router", "mask", "heads")}
    values, keep = [], []
    for section, g, quantity, branch in spec:
        if section == "param":
            p = point.params
            values.append(p.value if quantity == "value" else p.grad)
            keep.append(np.ones(len(p), dtype=bool) if quantity == "value" else p.has_grad)
        else:
            items = groups[section][g]
            column = items.cols[quantity]
            values.append(column[:, branch] if branch is not None else column)
            keep.append(items.present)
    kept = np.concatenate(keep)[order]
    values = np.concatenate(values)[order]
    if kept.all():
        return tags, values
    return [t for t, k in zip(tags, kept.tolist(), strict=True) if k], values[kept]


def scalar_metrics(stats: GlobalStats, sections: Iterable[str]) -> dict[str, float]:
    """Tag -> value for every logged quantity of ``stats`` in ``sections``, under the
    point's phase (``attn/...`` for training, ``val/attn/...`` for validation)."""
    tags, values = scalar_columns(stats, sections)
    return dict(zip(tags, values.tolist(), strict=True))


def _chart(tag: str) -> list:
    # One line per chart: TensorBoard's multiline charts do not say which line is which.
    return ["Multiline", [f"^{re.escape(tag)}$"]]


def _block_tags(info: BlockInfo, sections: set[str]) -> Iterator[tuple[str, ScalarTag]]:
    """(chart title, tag) of every training scalar a block logs."""
    k = info.layout.num_branches
    if "router" in sections and k:
        for q in _GROUPS["router"]:
            if q.tag is None:
                continue
            for branch in (range(k) if q.per_branch else (None,)):
                label = info.branch_label(branch) if branch is not None else ""
                yield (q.title.format(branch=label),
                       ScalarTag("train", info.name, "router", q.name, branch=branch))
    if "mask" in sections:
        for mask in info.layout.mask_names:
            for q in _GROUPS["mask"]:
                if q.tag is not None:
                    yield (q.title.format(mask=mask),
                           ScalarTag("train", info.name, mask, q.name))
    if "heads" in sections and info.layout.num_heads:
        for q in _GROUPS["heads"]:
            if q.tag is not None:
                yield q.title, ScalarTag("train", info.name, "heads", q.name)
    if "param" in sections:
        for q in PARAM_QUANTITIES:
            names = info.param_names if q.name == "value" else info.trainable_names
            for name in names:
                yield (q.title.format(param=name),
                       ScalarTag("train", info.name, "param", q.name, param=name))


def chart_layout(
    blocks: Sequence[BlockInfo], sections: Iterable[str]
) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: one category per block, one line per chart, titles that say
    what the line is (format of ``SummaryWriter.add_custom_scalars``)."""
    sections = set(sections)
    layout: dict[str, dict[str, list]] = {}
    for info in blocks:
        charts = {title: _chart(tag.format()) for title, tag in _block_tags(info, sections)}
        if charts:
            layout[f"{PREFIX}/{info.name}"] = charts
    return layout


def tag_table() -> list[tuple[str, str]]:
    """``(tag pattern, what it is)`` for every logged quantity, for the docs."""
    rows = []
    for section in ("mask", "router", "heads", "param"):
        declared = _GROUPS[section]
        group = "<mask>" if section == "mask" else section
        for q in declared:
            if q.tag is not None:
                leaf = q.tag.format(branch="<k>", param="<name>")
                what = q.title.format(mask="the mask's", branch="branch <k>", param="<name>")
                rows.append((f"attn/<block>/{group}/{leaf}", what))
    return rows


def head_record(stats: GlobalStats) -> dict[str, dict[str, list[float]]]:
    """The per-head values of a point, for :data:`HEADS_TAG`: block -> per-head quantity
    (``head_entropy``, ``head_max_logit``, ``head_sink``, ``head_count``) -> one value per head.
    Blocks without heads are left out (an empty record: nothing to write)."""
    per_head = [q.name for q in _GROUPS["heads"] if q.per_head]
    point = stats.point()
    return {
        point.names[b]: {name: g.cols[name][i].tolist() for name in per_head}
        for g in point.heads
        for i, b in enumerate(g.block.tolist()) if g.present[i]
    }
