"""Tag names, the scalars of a logging point, and the TensorBoard custom-scalars layout.

Training statistics (every logging step) are ``attn/<block>/...``; evaluation statistics (one
point per validation / test epoch) carry the stage in front: ``val/attn/<block>/...``,
``test/attn/<block>/...``, like Lightning users' ``val/loss``.

==========================================  ===============================================
tag                                         value
==========================================  ===============================================
``attn/<block>/router/entropy``             mean over samples of ``-sum_k w_k log w_k``
``attn/<block>/router/entropy_norm``        the same divided by ``log K``
``attn/<block>/router/usage_<k>``           mean weight of branch ``k``
``attn/<block>/<mask>/mean``                mean of the mask's values
``attn/<block>/<mask>/std``                 unbiased std of the mask's values
``attn/<block>/<mask>/min``, ``.../max``    extremes of the mask's values
``attn/<block>/<mask>/sat_low``             share of values below ``saturation_low``
``attn/<block>/<mask>/sat_high``            share of values above ``saturation_high``
``attn/<block>/param/<name>``               temperature, alpha, alpha_h, alpha_w, beta
``attn/<block>/param/<name>_grad_norm``     gradient norm of the learnable ones
``attn/<block>/<mask>/hist``                histogram of the mask's values (TensorBoard)
``attn/<block>/router/weights_hist``        histogram of the router weights (TensorBoard)
``val/attn/maps``, ``test/attn/maps``       attention-map grid (TensorBoard image)
``attn/problems``                           one JSON object per warning given (text)
``attn/config``                             thresholds and options of the run (JSON text)
==========================================  ===============================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..blocks.statistics import GlobalStats, StatisticsLayout

__all__ = [
    "CONFIG_TAG",
    "PREFIX",
    "PROBLEMS_TAG",
    "BlockInfo",
    "custom_scalar_layout",
    "histogram_tag",
    "maps_tag",
    "scalar_metrics",
    "stage_prefix",
]

PREFIX = "attn"
PROBLEMS_TAG = f"{PREFIX}/problems"
CONFIG_TAG = f"{PREFIX}/config"


@dataclass(frozen=True)
class BlockInfo:
    """What a watched block reports, fixed when the diagnostics start.

    Attributes:
        name: qualified module name (the ``<block>`` of every tag).
        layout: its accumulator layout (mask names, branches, histogram bins).
        param_names: its scalar parameters (``attention_parameters()`` keys).
        trainable_names: the learnable ones.
        branch_names: labels of the router's branches (``("3x3", "7x7", "7x7 d2")``), if any.
    """

    name: str
    layout: StatisticsLayout
    param_names: tuple[str, ...] = ()
    trainable_names: tuple[str, ...] = ()
    branch_names: tuple[str, ...] | None = None

    def branch_label(self, k: int) -> str:
        names = self.branch_names
        return f"branch {k} ({names[k]})" if names and k < len(names) else f"branch {k}"


def stage_prefix(stage: str = "train") -> str:
    """``attn`` for training, ``val/attn`` / ``test/attn`` for evaluation."""
    return PREFIX if stage == "train" else f"{stage}/{PREFIX}"


def _tag(block: str, *parts: str, stage: str = "train") -> str:
    return "/".join((stage_prefix(stage), block, *parts))


def histogram_tag(block: str, name: str, stage: str = "train") -> str:
    """``attn/<block>/<mask>/hist`` or, for ``name == "router"``, ``.../router/weights_hist``."""
    if name == "router":
        return _tag(block, "router", "weights_hist", stage=stage)
    return _tag(block, name, "hist", stage=stage)


def maps_tag(stage: str) -> str:
    """``val/attn/maps`` or ``test/attn/maps``."""
    return f"{stage}/{PREFIX}/maps"


def scalar_metrics(
    stats: GlobalStats, sections: Iterable[str], stage: str = "train"
) -> dict[str, float]:
    """Tag -> value for every scalar of ``stats`` in ``sections`` (mask / router / param)."""
    sections = set(sections)
    out: dict[str, float] = {}
    for block, bs in stats.blocks.items():
        if "router" in sections and bs.router is not None:
            out[_tag(block, "router", "entropy", stage=stage)] = bs.router.entropy
            out[_tag(block, "router", "entropy_norm", stage=stage)] = bs.router.entropy_norm
            for k, usage in enumerate(bs.router.usage):
                out[_tag(block, "router", f"usage_{k}", stage=stage)] = usage
        if "mask" in sections:
            for mask, m in bs.masks.items():
                for stat in ("mean", "std", "min", "max", "sat_low", "sat_high"):
                    out[_tag(block, mask, stat, stage=stage)] = getattr(m, stat)
        if "param" in sections:
            for name, value in bs.params.items():
                out[_tag(block, "param", name, stage=stage)] = value
            for name, value in bs.grad_norms.items():
                out[_tag(block, "param", f"{name}_grad_norm", stage=stage)] = value
    return out


def _chart(tag: str) -> list:
    # One line per chart: TensorBoard's multiline charts do not say which line is which.
    return ["Multiline", [f"^{re.escape(tag)}$"]]


def custom_scalar_layout(
    blocks: Sequence[BlockInfo], sections: Iterable[str]
) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: one category per block, one line per chart, titles that
    say what the line is (format of ``SummaryWriter.add_custom_scalars``)."""
    sections = set(sections)
    layout: dict[str, dict[str, list]] = {}
    for info in blocks:
        b = info.name
        charts: dict[str, list] = {}
        k = info.layout.num_branches
        if "router" in sections and k:
            charts["router entropy"] = _chart(_tag(b, "router", "entropy"))
            charts["router entropy / log K (1 = uniform)"] = _chart(
                _tag(b, "router", "entropy_norm")
            )
            for i in range(k):
                charts[f"usage of {info.branch_label(i)}"] = _chart(
                    _tag(b, "router", f"usage_{i}")
                )
        if "mask" in sections:
            for mask in info.layout.mask_names:
                charts[f"{mask} mean"] = _chart(_tag(b, mask, "mean"))
                charts[f"{mask} std"] = _chart(_tag(b, mask, "std"))
                charts[f"{mask} share below saturation_low"] = _chart(_tag(b, mask, "sat_low"))
                charts[f"{mask} share above saturation_high"] = _chart(_tag(b, mask, "sat_high"))
        if "param" in sections:
            for name in info.param_names:
                charts[name] = _chart(_tag(b, "param", name))
            for name in info.trainable_names:
                charts[f"{name} gradient norm"] = _chart(_tag(b, "param", f"{name}_grad_norm"))
        if charts:
            layout[f"{PREFIX}/{b}"] = charts
    return layout
