"""The diagnostics' tags of a run, grouped by stage and block (the tag schema is
:class:`lightning_attn.core.tags.ScalarTag`; nothing here restates it)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.statistics import BlockInfo, Quantity
from ..core.tags import CONFIG_TAG, HEADS_MAP_TAG, PROBLEMS_TAG, ScalarTag, maps_stage
from .reading import ImageRecord, RunLog, Series, natural_key

__all__ = ["MAP_STAGES", "BlockSeries", "RunTags", "parse_tags"]

#: Stages in the order their image is preferred for the attention-map grid.
MAP_STAGES = ("train", "val", "test")


@dataclass
class BlockSeries:
    """The series of one block at one stage, by quantity (the names of
    :mod:`lightning_attn.core.statistics`).

    ``masks``: mask -> quantity -> series; ``router``: quantity -> series, or branch ->
    series for a per-branch quantity (``usage``); ``params``: quantity (``value``,
    ``grad_norm``) -> parameter -> series.
    """

    name: str
    masks: dict[str, dict[str, Series]] = field(default_factory=dict)
    router: dict[str, Any] = field(default_factory=dict)
    params: dict[str, dict[str, Series]] = field(default_factory=dict)
    heads: dict[str, Series] = field(default_factory=dict)

    def add(self, tag: ScalarTag, series: Series) -> None:
        if tag.section == "mask":
            self.masks.setdefault(tag.group, {})[tag.quantity] = series
        elif tag.section == "heads":
            self.heads[tag.quantity] = series
        elif tag.section == "router":
            if tag.branch is None:
                self.router[tag.quantity] = series
            else:
                self.router.setdefault(tag.quantity, {})[tag.branch] = series
        else:
            self.params.setdefault(tag.quantity, {})[tag.param] = series

    @property
    def num_branches(self) -> int:
        per_branch = [v for v in self.router.values() if isinstance(v, dict) and v]
        return max((max(v) + 1 for v in per_branch), default=0)

    def curves(self, q: Quantity) -> Iterator[tuple[str, Series]]:
        """``(subject, series)`` of quantity ``q``: a mask's name, a branch index or a
        parameter name as the subject. A quantity that is not logged but derived from others
        (``saturated``) is computed point by point where they are all logged."""
        if q.group == "mask":
            for mask, stats in self.masks.items():
                s = stats.get(q.name) or _derived(q, stats)
                if s is not None:
                    yield mask, s
        elif q.group == "router":
            value = self.router.get(q.name)
            if isinstance(value, dict):
                for k in sorted(value):
                    yield str(k), value[k]
            elif value is not None:
                yield "", value
        elif q.group == "heads":
            if q.name in self.heads:
                yield "", self.heads[q.name]
        else:
            yield from self.params.get(q.name, {}).items()

    def all_series(self) -> list[Series]:
        out = [s for stats in self.masks.values() for s in stats.values()]
        for v in self.router.values():
            out += list(v.values()) if isinstance(v, dict) else [v]
        out += list(self.heads.values())
        return out + [s for by_param in self.params.values() for s in by_param.values()]

    def steps(self) -> list[int]:
        """Every step at which this block has a value, ascending."""
        return sorted({step for s in self.all_series() for step in s.steps})


def _derived(q: Quantity, stats: dict[str, Series]) -> Series | None:
    inputs = q.inputs
    if q.tag is not None or q.derive is None or not inputs or any(n not in stats for n in inputs):
        return None  # logged, not derived, or its inputs were not logged
    if not all(stats[n].exact for n in inputs):
        return None  # from envelopes it would be wrong: judge_run draws it from every point
    common = sorted(set.intersection(*(set(stats[n].steps) for n in inputs)))
    at = {n: dict(zip(stats[n].steps, stats[n].values, strict=True)) for n in inputs}
    return Series(common, [q.derive({n: at[n][s] for n in inputs}) for s in common])


@dataclass
class RunTags:
    """A run's diagnostics: blocks per stage (``"train"``, ``"val"``, ``"test"``, ...), the
    attention-map images, the heads' heatmaps, the configuration and the problems the callbacks
    logged."""

    blocks: dict[str, dict[str, BlockSeries]] = field(default_factory=dict)
    maps: dict[str, list[ImageRecord]] = field(default_factory=dict)
    heads_maps: list[ImageRecord] = field(default_factory=list)
    config: dict[str, Any] | None = None
    problems: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def train(self) -> dict[str, BlockSeries]:
        return self.blocks.get("train", {})

    def infos(self) -> dict[str, BlockInfo]:
        """The configuration's description of each block (masks, branches, parameters)."""
        out = {}
        for entry in (self.config or {}).get("blocks") or []:
            try:
                info = BlockInfo.from_json(entry)
            except (KeyError, TypeError, ValueError):
                continue
            out[info.name] = info
        return out

    def block_names(self) -> list[str]:
        """Every block of the run: the configuration's order, then any other block."""
        names = list(self.infos())
        for stage in self.blocks.values():
            names += [n for n in stage if n not in names]
        return names

    def branch_label(self, block: str, k: int) -> str:
        info = self.infos().get(block)
        return info.branch_label(k) if info is not None else f"branch {k}"

    def trainable(self, block: str) -> frozenset[str]:
        """The block's learnable parameters: the configuration's list, else those with a
        gradient-norm tag anywhere in the run."""
        info = self.infos().get(block)
        if info is not None:
            return frozenset(info.trainable_names)
        bs = self.train.get(block)
        return frozenset(bs.params.get("grad_norm", {})) if bs is not None else frozenset()

    def last_map(self) -> tuple[str, ImageRecord] | None:
        """The latest attention-map grid, training or validation preferred over test."""
        def rank(tag: str) -> int:
            stage = maps_stage(tag)
            return MAP_STAGES.index(stage) if stage in MAP_STAGES else len(MAP_STAGES)

        for tag in sorted(self.maps, key=rank):
            if self.maps[tag]:
                return tag, self.maps[tag][-1]
        return None


def _json_objects(texts: Iterable[tuple[int, str]], tag: str, notes: list[str]) -> list[dict]:
    out = []
    for step, text in texts:
        try:
            doc = json.loads(text)
        except ValueError:
            notes.append(f"{tag} at step {step} is not JSON; ignored")
            continue
        # one object per record, or (the problems of one point) a list of them
        docs = doc if isinstance(doc, list) else [doc]
        if all(isinstance(d, dict) for d in docs):
            out += docs
        else:
            notes.append(f"{tag} at step {step} is not a JSON object (or list of them); ignored")
    return out


def parse_tags(run: RunLog) -> RunTags:
    """Group a run's tags by stage and block (blocks in order of first appearance; a CSV
    run's columns come sorted, so its blocks are in natural order)."""
    out = RunTags()
    for tag, series in run.scalars.items():
        parsed = ScalarTag.parse(tag)
        if parsed is None:
            continue
        blocks = out.blocks.setdefault(parsed.stage, {})
        blocks.setdefault(parsed.block, BlockSeries(parsed.block)).add(parsed, series)
    if run.kind == "csv":
        out.blocks = {
            stage: dict(sorted(blocks.items(), key=lambda item: natural_key(item[0])))
            for stage, blocks in out.blocks.items()
        }
    out.maps = {tag: images for tag, images in run.images.items() if maps_stage(tag)}
    out.heads_maps = list(run.images.get(HEADS_MAP_TAG, []))
    if CONFIG_TAG in run.texts:
        configs = _json_objects(run.texts[CONFIG_TAG], CONFIG_TAG, out.notes)
        out.config = configs[-1] if configs else None
    if PROBLEMS_TAG in run.texts:
        out.problems = _json_objects(run.texts[PROBLEMS_TAG], PROBLEMS_TAG, out.notes)
    return out
