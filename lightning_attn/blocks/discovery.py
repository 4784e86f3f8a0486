"""Discovery: every attention module of a model, by qualified name.

Our blocks and users' own implement :class:`~.recording.AttentionBlock`; the attention already
in timm's and torchvision's models is found through its adapter (:mod:`.adapters`), and the
heads of transformer attention (timm, ``nn.MultiheadAttention``, Hugging Face) through their
head adapters (:mod:`.heads`). Names are those of ``model.named_modules()``, seen through DDP's
and ``torch.compile``'s wrappers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from .adapters import (
    AdapterRecorder,
    AttentionAdapter,
    adapter_matching,
    adapters_in_force,
    hooked_paths,
    is_instance_by_name,
)
from .heads import HeadAdapter, HeadRecorder, head_adapter_matching
from .recording import AttentionBlock

__all__ = ["AVERAGED_MODELS", "averaged_copies", "find_attention_blocks"]


def _unwrap(root: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real module under ``.module``.
    while isinstance(root, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        root = root.module
    return root


_COMPILE_SEGMENT = "_orig_mod"  # torch.compile's OptimizedModule keeps the module under it

#: The wrappers that hold an averaged copy of a model, by class name (nothing is imported):
#: timm's EMAs, and torch's ``AveragedModel`` (SWA; the EMA of Lightning's
#: ``WeightAveraging`` and of ``get_ema_multi_avg_fn``).
AVERAGED_MODELS: tuple[str, ...] = (
    "timm.utils.model_ema:ModelEmaV2",
    "timm.utils.model_ema:ModelEmaV3",
    "torch.optim.swa_utils:AveragedModel",
)


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != _COMPILE_SEGMENT)


def averaged_copies(root: nn.Module) -> list[str]:
    """The qualified names (as :func:`find_attention_blocks` gives them) of the averaged
    copies of a model held under ``root`` (:data:`AVERAGED_MODELS`): their blocks are
    blocks like any other, which run where the user runs the copy (usually evaluation only).
    """
    return [_clean(name) for name, module in _unwrap(root).named_modules()
            if any(is_instance_by_name(module, target) for target in AVERAGED_MODELS)]


def _recorder(module: nn.Module, adapter: AttentionAdapter | HeadAdapter,
              names: Counter) -> Any:
    if isinstance(adapter, HeadAdapter):
        return HeadRecorder(module, adapter)
    return AdapterRecorder(module, adapter,
                           scoped=_shares_a_hooked_submodule(module, adapter, names))


def find_attention_blocks(
    root: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Iterable[str] = (),
    third_party: bool = False,
    adapters: Iterable[AttentionAdapter] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Every :class:`AttentionBlock` under ``root`` by qualified name, in module order, and
    the include/exclude patterns that matched no block.

    Names never carry DDP's ``module.`` prefix (the wrapper is looked through) nor
    ``torch.compile``'s ``_orig_mod.``. ``include`` (fnmatch patterns) keeps only matching
    blocks; ``exclude`` then leaves matching ones out. ``third_party``: also every module an
    adapter applies to (:mod:`.adapters`: ``adapters`` first, then the registered and the
    built-in ones: timm's and torchvision's attention; without it, ``adapters`` alone), as a new
    :class:`~.adapters.AdapterRecorder` with its hooks attached (the caller owns it:
    ``clear_recording()`` removes them).
    """
    root = _unwrap(root)
    in_force = adapters_in_force(adapters) if third_party else tuple(adapters)
    found: dict[str, Any] = {}
    for name, module in root.named_modules():
        if module is root:
            continue
        adapter = None if isinstance(module, AttentionBlock) else adapter_matching(
            module, in_force)
        if adapter is None and third_party and not isinstance(module, AttentionBlock):
            adapter = head_adapter_matching(module)
        if adapter is None and not isinstance(module, AttentionBlock):
            continue
        found.setdefault(_clean(name), (module, adapter))
    exclude = tuple(exclude)
    unmatched = [
        p for p in (*(include or ()), *exclude) if not any(fnmatchcase(n, p) for n in found)
    ]
    names = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    blocks = {
        name: module if adapter is None else _recorder(module, adapter, names)
        for name, (module, adapter) in found.items()
        if (include is None or any(fnmatchcase(name, p) for p in include))
        and not any(fnmatchcase(name, p) for p in exclude)
    }
    return blocks, unmatched


def _shares_a_hooked_submodule(
    module: nn.Module, adapter: AttentionAdapter, names: Counter[int]
) -> bool:
    # A submodule the model holds under two names (one nn.Sigmoid given to two gates) runs
    # for both: its recorder must take only the calls made inside its own module's forward.
    return any(names[id(module.get_submodule(path))] > 1
               for path in hooked_paths(adapter) if path)
