"""Finding the attention blocks of a model, and what each one will report.

Blocks are found once per ``fit`` and named by their qualified name in ``named_modules()`` of
the LightningModule: the set is fixed from then on and identical on every process, which is
what lets every process run the same reduction at the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..blocks import CoordinateAttention, DynamicSpatialAttention, ObservableAttention

__all__ = ["BlockLayout", "describe_block", "find_attention_blocks", "is_attention_block"]

_WRAPPER_SEGMENT = "_orig_mod"  # torch.compile's OptimizedModule keeps the module under it


def is_attention_block(module: nn.Module) -> bool:
    """DSA, CoordinateAttention (and subclasses), or any module speaking the protocol."""
    return isinstance(module, (DynamicSpatialAttention, CoordinateAttention)) or isinstance(
        module, ObservableAttention
    )


def _unwrap(root: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real module under ``.module``.
    while isinstance(root, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        root = root.module
    return root


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != _WRAPPER_SEGMENT)


def find_attention_blocks(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    warn_unmatched: bool = True,
) -> dict[str, nn.Module]:
    """Qualified name -> block, for every attention block under ``root``, in module order.

    Args:
        root: the LightningModule (a DDP/DataParallel wrapper is looked through, so names
            never carry a ``module.`` prefix; ``torch.compile``'s ``_orig_mod`` is dropped).
        include: fnmatch patterns; when given, only blocks matching one of them are kept.
        exclude: fnmatch patterns of blocks to leave out (applied after ``include``).
        warn_unmatched: warn (rank zero) about each pattern that matches no block.
    """
    root = _unwrap(root)
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if module is root or not is_attention_block(module):
            continue
        found.setdefault(_clean_name(name), module)

    patterns = [("include", p) for p in (include or ())] + [("exclude", p) for p in exclude]
    if warn_unmatched:
        for option, pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in found):
                rank_zero_warn(
                    f"{option} pattern {pattern!r} matches no attention block; blocks found: "
                    f"{sorted(found) or 'none'}"
                )
    return {
        name: module
        for name, module in found.items()
        if (include is None or any(fnmatchcase(name, p) for p in include))
        and not any(fnmatchcase(name, p) for p in exclude)
    }


@dataclass(frozen=True)
class BlockLayout:
    """What a block reports, fixed when the block is found.

    Attributes:
        name: qualified module name (the ``<block>`` in every tag).
        mask_names: names of its masks (``("mask",)`` for DSA, ``("mask_h", "mask_w")`` for
            CoordinateAttention; a user's block may declare ``mask_names``).
        num_branches: ``K`` of its router, ``None`` when it has none (a user's block may
            declare ``num_branches``).
        param_names: its scalar parameters (``attention_parameters()`` keys).
        trainable_names: the learnable ones (``trainable_attention_parameters()`` keys).
    """

    name: str
    mask_names: tuple[str, ...]
    num_branches: int | None
    param_names: tuple[str, ...]
    trainable_names: tuple[str, ...]


def describe_block(name: str, block: nn.Module) -> BlockLayout:
    """The :class:`BlockLayout` of ``block`` (reads its parameters once, no forward)."""
    # Declared by the observation protocol (ObservableMixin gives the defaults).
    masks = tuple(getattr(block, "mask_names", ("mask",)))
    declared = getattr(block, "num_branches", None)
    k = declared if isinstance(declared, int) and not isinstance(declared, bool) else None
    params = tuple(block.attention_parameters())
    trainable = tuple(n for n in block.trainable_attention_parameters() if n in params)
    return BlockLayout(name, masks, k if k and k > 0 else None, params, trainable)
