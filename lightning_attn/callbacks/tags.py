"""Stable tag names, the scalars of a logging step, and the TensorBoard custom-scalars layout.

========================================  ===============================================
tag                                       value
========================================  ===============================================
``attn/<block>/router/entropy``           mean over samples of ``-sum_k w_k log w_k``
``attn/<block>/router/entropy_norm``      the same divided by ``log K``
``attn/<block>/router/usage_<k>``         mean weight of branch ``k``
``attn/<block>/<mask>/mean``              mean of the mask's values
``attn/<block>/<mask>/std``               unbiased std of the mask's values
``attn/<block>/<mask>/sat_low``           share of values below ``saturation_low``
``attn/<block>/<mask>/sat_high``          share of values above ``saturation_high``
``attn/<block>/param/<name>``             temperature, alpha, alpha_h, alpha_w, beta
``attn/<block>/param/<name>_grad_norm``   gradient norm of the learnable ones
``attn/<block>/<mask>/hist``              histogram of the mask's values (TensorBoard)
``attn/<block>/router/weights_hist``      histogram of the router weights (TensorBoard)
========================================  ===============================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .discovery import BlockLayout
from .statistics import GlobalStats

__all__ = [
    "PREFIX",
    "custom_scalar_layout",
    "histogram_tag",
    "mask_tag",
    "param_tag",
    "router_tag",
    "scalar_metrics",
]

PREFIX = "attn"


def router_tag(block: str, stat: str) -> str:
    """``attn/<block>/router/<stat>`` (``entropy``, ``entropy_norm``, ``usage_<k>``)."""
    return f"{PREFIX}/{block}/router/{stat}"


def mask_tag(block: str, mask: str, stat: str) -> str:
    """``attn/<block>/<mask>/<stat>`` (``mean``, ``std``, ``sat_low``, ``sat_high``)."""
    return f"{PREFIX}/{block}/{mask}/{stat}"


def param_tag(block: str, name: str, grad_norm: bool = False) -> str:
    """``attn/<block>/param/<name>`` or ``.../<name>_grad_norm``."""
    return f"{PREFIX}/{block}/param/{name}{'_grad_norm' if grad_norm else ''}"


def histogram_tag(block: str, name: str) -> str:
    """``attn/<block>/<mask>/hist`` or, for ``name == "router"``, ``.../router/weights_hist``."""
    if name == "router":
        return router_tag(block, "weights_hist")
    return mask_tag(block, name, "hist")


def scalar_metrics(stats: GlobalStats, sections: Iterable[str]) -> dict[str, float]:
    """Tag -> value for every scalar of ``stats`` in ``sections`` (mask / router / param)."""
    sections = set(sections)
    out: dict[str, float] = {}
    for block, bs in stats.blocks.items():
        if "router" in sections and bs.router is not None:
            out[router_tag(block, "entropy")] = bs.router.entropy
            out[router_tag(block, "entropy_norm")] = bs.router.entropy_norm
            for k, usage in enumerate(bs.router.usage):
                out[router_tag(block, f"usage_{k}")] = usage
        if "mask" in sections:
            for mask, m in bs.masks.items():
                out[mask_tag(block, mask, "mean")] = m.mean
                out[mask_tag(block, mask, "std")] = m.std
                out[mask_tag(block, mask, "sat_low")] = m.sat_low
                out[mask_tag(block, mask, "sat_high")] = m.sat_high
        if "param" in sections:
            for name, value in bs.params.items():
                out[param_tag(block, name)] = value
            for name, value in bs.grad_norms.items():
                out[param_tag(block, name, grad_norm=True)] = value
    return out


def _exact(tag: str) -> str:
    # Multiline charts match tags by regular expression.
    return f"^{re.escape(tag)}$"


def custom_scalar_layout(
    layouts: Iterable[BlockLayout], sections: Iterable[str]
) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: one category per block, related curves in one chart.

    Branch usages share a chart, ``sat_low`` with ``sat_high``, ``mean`` with ``std``,
    ``alpha_h`` with ``alpha_w``, and the gradient norms of a block share one.
    Format of :meth:`torch.utils.tensorboard.SummaryWriter.add_custom_scalars`.
    """
    sections = set(sections)
    layout: dict[str, dict[str, list]] = {}
    for bl in layouts:
        b = bl.name
        charts: dict[str, list] = {}
        if "router" in sections and bl.num_branches:
            charts["router entropy"] = [
                "Multiline", [_exact(router_tag(b, s)) for s in ("entropy", "entropy_norm")]
            ]
            charts["branch usage"] = [
                "Multiline", [_exact(router_tag(b, f"usage_{k}")) for k in range(bl.num_branches)]
            ]
        if "mask" in sections:
            for mask in bl.mask_names:
                charts[f"{mask} mean / std"] = [
                    "Multiline", [_exact(mask_tag(b, mask, s)) for s in ("mean", "std")]
                ]
                charts[f"{mask} saturation"] = [
                    "Multiline", [_exact(mask_tag(b, mask, s)) for s in ("sat_low", "sat_high")]
                ]
        if "param" in sections and bl.param_names:
            names = list(bl.param_names)
            if "alpha_h" in names and "alpha_w" in names:
                charts["alpha_h / alpha_w"] = [
                    "Multiline", [_exact(param_tag(b, "alpha_h")), _exact(param_tag(b, "alpha_w"))]
                ]
                names = [n for n in names if n not in ("alpha_h", "alpha_w")]
            for name in names:
                charts[name] = ["Multiline", [_exact(param_tag(b, name))]]
            if bl.trainable_names:
                grads = [_exact(param_tag(b, n, grad_norm=True)) for n in bl.trainable_names]
                charts["gradient norms"] = ["Multiline", grads]
        if charts:
            layout[f"{PREFIX}/{b}"] = charts
    return layout
