"""The diagnostics' tags of a run, grouped by stage and block.

Tags (``<block>`` is a dotted module path: dots, no slashes)::

    attn/<block>/router/{entropy,entropy_norm,usage_<k>}       training, every logging step
    attn/<block>/<mask>/{mean,std,min,max,sat_low,sat_high}
    attn/<block>/param/<name>, attn/<block>/param/<name>_grad_norm
    val/attn/<block>/...,  test/attn/<block>/...              evaluation, once per epoch
    attn/maps, val/attn/maps, test/attn/maps                  attention-map grid (image)
    attn/config, attn/problems                                JSON texts

A training tag has four parts and an evaluation tag five, so a block named ``attn`` is
still told apart from the prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .reading import ImageRecord, RunLog, Series, natural_key

__all__ = [
    "MASK_STATS",
    "ROUTER",
    "PARAM",
    "BlockSeries",
    "RunTags",
    "parse_tags",
    "split_tag",
    "usage_index",
]

PREFIX = "attn"
ROUTER = "router"
PARAM = "param"
#: Mask statistics, in the order they are shown (``min``/``max`` when the callbacks log them).
MASK_STATS = ("mean", "std", "min", "max", "sat_low", "sat_high")
GRAD_SUFFIX = "_grad_norm"
MAPS = "maps"
CONFIG = f"{PREFIX}/config"
PROBLEMS = f"{PREFIX}/problems"
#: Stages in the order their image is preferred for the attention-map grid.
MAP_STAGES = ("train", "val", "test")


@dataclass
class BlockSeries:
    """The series of one block at one stage.

    ``usage`` maps branch index -> series; ``masks`` mask name -> stat -> series;
    ``params`` / ``grad_norms`` parameter name -> series.
    """

    name: str
    entropy: Series | None = None
    entropy_norm: Series | None = None
    usage: dict[int, Series] = field(default_factory=dict)
    masks: dict[str, dict[str, Series]] = field(default_factory=dict)
    params: dict[str, Series] = field(default_factory=dict)
    grad_norms: dict[str, Series] = field(default_factory=dict)
    other: dict[str, Series] = field(default_factory=dict)

    @property
    def has_router(self) -> bool:
        return self.entropy is not None or self.entropy_norm is not None or bool(self.usage)

    @property
    def num_branches(self) -> int:
        return max(self.usage) + 1 if self.usage else 0

    def steps(self) -> list[int]:
        """Every step at which this block has a value, ascending."""
        out: set[int] = set()
        for s in self.all_series():
            out.update(s.steps)
        return sorted(out)

    def all_series(self) -> list[Series]:
        out = [s for s in (self.entropy, self.entropy_norm) if s is not None]
        out += list(self.usage.values())
        out += [s for stats in self.masks.values() for s in stats.values()]
        out += list(self.params.values()) + list(self.grad_norms.values())
        return out


@dataclass
class RunTags:
    """A run's diagnostics: blocks per stage (``"train"``, ``"val"``, ``"test"``, ...), the
    attention-map images, the configuration and the problems the callbacks logged."""

    blocks: dict[str, dict[str, BlockSeries]] = field(default_factory=dict)
    maps: dict[str, list[ImageRecord]] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    problems: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def train(self) -> dict[str, BlockSeries]:
        return self.blocks.get("train", {})

    def block_names(self) -> list[str]:
        """Every block of the run: the configuration's order, then any other block."""
        names: list[str] = []
        for entry in (self.config or {}).get("blocks") or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                names.append(entry["name"])
        for stage in self.blocks.values():
            names += [n for n in stage if n not in names]
        return names

    def block_config(self, block: str) -> dict[str, Any]:
        """The configuration's entry of ``block`` (masks, branches, params, trainable)."""
        for entry in (self.config or {}).get("blocks") or []:
            if isinstance(entry, dict) and entry.get("name") == block:
                return entry
        return {}

    def branch_label(self, block: str, k: int) -> str:
        names = self.block_config(block).get("branches") or []
        if k < len(names) and names[k]:
            return f"branch {k} ({names[k]})"
        return f"branch {k}"

    def trainable(self, block: str) -> frozenset[str]:
        """The block's learnable parameters: the configuration's list, else those with a
        gradient-norm tag anywhere in the run."""
        listed = self.block_config(block).get("trainable")
        if isinstance(listed, list):
            return frozenset(str(n) for n in listed)
        bs = self.train.get(block)
        return frozenset(bs.grad_norms) if bs is not None else frozenset()

    def last_map(self) -> tuple[str, ImageRecord] | None:
        """The latest attention-map grid, training or validation preferred over test."""
        def rank(tag: str) -> int:
            stage = tag[: -len(f"{PREFIX}/{MAPS}")].rstrip("/") or "train"
            return MAP_STAGES.index(stage) if stage in MAP_STAGES else len(MAP_STAGES)

        for tag in sorted(self.maps, key=rank):
            if self.maps[tag]:
                return tag, self.maps[tag][-1]
        return None


def split_tag(tag: str) -> tuple[str, str, str, str] | None:
    """``(stage, block, group, stat)`` of a diagnostics scalar tag, else ``None``."""
    parts = tag.split("/")
    if len(parts) == 4 and parts[0] == PREFIX:
        return ("train", *parts[1:])  # type: ignore[return-value]
    if len(parts) == 5 and parts[1] == PREFIX and parts[0]:
        return (parts[0], *parts[2:])  # type: ignore[return-value]
    return None


def usage_index(stat: str) -> int | None:
    """``k`` of a ``usage_<k>`` router statistic, else ``None``."""
    head, _, k = stat.partition("usage_")
    return int(k) if not head and k.isdigit() else None


def _add(bs: BlockSeries, group: str, stat: str, series: Series) -> None:
    if group == ROUTER:
        if stat == "entropy":
            bs.entropy = series
        elif stat == "entropy_norm":
            bs.entropy_norm = series
        elif usage_index(stat) is not None:
            bs.usage[usage_index(stat)] = series
        else:
            bs.other[f"{group}/{stat}"] = series
    elif group == PARAM:
        if stat.endswith(GRAD_SUFFIX):
            bs.grad_norms[stat[: -len(GRAD_SUFFIX)]] = series
        else:
            bs.params[stat] = series
    elif stat in MASK_STATS:
        bs.masks.setdefault(group, {})[stat] = series
    else:
        bs.other[f"{group}/{stat}"] = series


def _json_objects(texts: Iterable[tuple[int, str]], tag: str, notes: list[str]) -> list[dict]:
    out = []
    for step, text in texts:
        try:
            doc = json.loads(text)
        except ValueError:
            notes.append(f"{tag} at step {step} is not JSON; ignored")
            continue
        if isinstance(doc, dict):
            out.append(doc)
        else:
            notes.append(f"{tag} at step {step} is not a JSON object; ignored")
    return out


def parse_tags(run: RunLog) -> RunTags:
    """Group a run's tags by stage and block (blocks in order of first appearance; a CSV
    run's columns come sorted, so its blocks are in natural order)."""
    out = RunTags()
    for tag, series in run.scalars.items():
        split = split_tag(tag)
        if split is None:
            continue
        stage, block, group, stat = split
        blocks = out.blocks.setdefault(stage, {})
        bs = blocks.setdefault(block, BlockSeries(block))
        _add(bs, group, stat, series)
    if run.kind == "csv":
        out.blocks = {
            stage: dict(sorted(blocks.items(), key=lambda item: natural_key(item[0])))
            for stage, blocks in out.blocks.items()
        }
    for tag, images in run.images.items():
        if tag == f"{PREFIX}/{MAPS}" or tag.endswith(f"/{PREFIX}/{MAPS}"):
            out.maps[tag] = images
    if CONFIG in run.texts:
        configs = _json_objects(run.texts[CONFIG], CONFIG, out.notes)
        out.config = configs[-1] if configs else None
    if PROBLEMS in run.texts:
        out.problems = _json_objects(run.texts[PROBLEMS], PROBLEMS, out.notes)
    return out
