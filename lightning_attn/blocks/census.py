"""The census: every attention-like class of PyTorch, timm, torchvision and transformers,
diagnosed or declared here with the reason why not.

A class is *attention-like* when its name says so (:data:`ATTENTION_LIKE`: ``Attention``,
``Attn``, ``SE``, ``Excite``, ``Gate``, ``NonLocal``, ...). It is *diagnosed* when one of the
built-in adapters (:data:`~.adapters.BUILTIN_ADAPTERS`) or head adapters
(:data:`~.heads.HEAD_ADAPTERS`) matches it; otherwise it must be in :data:`NOT_DIAGNOSED`
(PyTorch, timm, torchvision: one entry per class, by ``"module:QualName"``) or fall under one
of :data:`TRANSFORMERS_RULES` (the ~900 attention-like classes of transformers are read from
their source text, each rule a fact of that text). ``tests/blocks/test_census.py`` fails on a
class that is neither; ``docs/coverage.md`` and the table of ``docs/diagnostics.md`` are
generated from :func:`census` (``scripts/coverage_table.py``).

:func:`unseen_attention` is the same verdict on a built model: the diagnostics warn, naming the
class and the reason, about every attention module of the model they do not measure.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .adapters import BUILTIN_ADAPTERS
from .heads import (
    HEAD_ADAPTERS,
    dispatches_through_registry,
    hands_sink_logits,
    transformers_attention_implementation,
)

__all__ = [
    "ATTENTION_LIKE",
    "NOT_DIAGNOSED",
    "TRANSFORMERS_RULES",
    "CensusRow",
    "NotDiagnosed",
    "census",
    "coverage_page",
    "coverage_summary",
    "unseen_attention",
]

#: Class names that announce attention (case-sensitive): a heuristic, kept wide on purpose
#: (the census lists what it catches that is not attention, with why).
ATTENTION_LIKE = re.compile(
    r"Attn|Attention|Excit|Squeeze|NonLocal|GlobalContext|Cbam|SelectiveKernel|GhostModule"
    r"|(?<![A-Za-z])SE(?=[A-Z]|$)|(?<=[a-z])SE(?=[A-Z]|$)|ESE|Ese(?=[A-Z])|[Ee]ca(?=Module)"
    r"|Gate(?!d)|(?<=[A-Z])SA$|XCA$|Lambda(?=Layer)"
)

#: What a not-diagnosed class is: attention the diagnostics cannot measure (a model holding one
#: gets a warning), a module that holds attention measured on its own, or no attention at all.
UNSUPPORTED, HOLDS, NOT_ATTENTION = "unsupported", "holds attention", "not attention"


@dataclass(frozen=True)
class NotDiagnosed:
    """An attention-like class the diagnostics do not measure themselves, and why."""

    target: str
    kind: str
    reason: str


def _entries(kind: str, reason: str, *targets: str) -> tuple[NotDiagnosed, ...]:
    return tuple(NotDiagnosed(t, kind, reason) for t in targets)


_INLINE = ("computes its logits and softmax inline (no submodule returns its queries and keys, "
           "no SDPA call receives them)")
_FIVE_D = ("calls SDPA with windows as an extra dimension (not queries of shape (B, H, N, D)), "
           "which the SDPA seam leaves alone")
_CHANNELS = "a softmax over channels (cross-covariance), not over positions"
_T, _TM = "timm.layers", "timm.models"

#: PyTorch's, timm's and torchvision's attention-like classes that no adapter matches.
NOT_DIAGNOSED: tuple[NotDiagnosed, ...] = (
    *_entries(HOLDS, "a part of CbamModule / LightCbamModule, measured through it (alone, "
              "it has no adapter)", f"{_T}.cbam:ChannelAttn", f"{_T}.cbam:SpatialAttn",
              f"{_T}.cbam:LightChannelAttn", f"{_T}.cbam:LightSpatialAttn"),
    *_entries(HOLDS, "a part of BatNonLocalAttn, measured through it",
              f"{_T}.non_local_attn:BilinearAttnTransform"),
    *_entries(HOLDS, "a part of SelectiveKernel (its router), measured through it",
              f"{_T}.selective_kernel:SelectiveKernelAttn"),
    *_entries(UNSUPPORTED, f"multi-query attention that {_INLINE}",
              f"{_T}.attention2d:MultiQueryAttentionV2"),
    *_entries(UNSUPPORTED, f"relative-position logits of its pos_embed; {_INLINE}",
              f"{_T}.bottleneck_attn:BottleneckAttn", f"{_T}.halo_attn:HaloAttn"),
    *_entries(UNSUPPORTED, "the difference of two softmax maps weighted by a learned lambda: no "
              "single distribution per head", f"{_T}.diff_attention:DiffAttention"),
    *_entries(UNSUPPORTED, "a lambda layer: a softmax over the keys alone (no query-key logits)",
              f"{_T}.lambda_layer:LambdaLayer"),
    *_entries(HOLDS, "holds MultiQueryAttention2d or Attention2d, measured on their own",
              f"{_TM}._efficientnet_blocks:MobileAttention"),
    *_entries(HOLDS, "a block holding a self-attention layer (BottleneckAttn, HaloAttn, "
              "LambdaLayer), listed on its own", f"{_TM}.byobnet:SelfAttnBlock"),
    *_entries(HOLDS, "a block holding ClassAttn, measured on its own",
              f"{_TM}.cait:LayerScaleBlockClassAttn", f"{_TM}.xcit:ClassAttentionBlock"),
    *_entries(UNSUPPORTED, "talking heads: mixes the heads' logits before the softmax and the "
              "weights after it, so no head's distribution comes from its queries and keys",
              f"{_TM}.cait:TalkingHeadAttn"),
    *_entries(UNSUPPORTED, "factorised attention: a softmax over the keys alone (no query-key "
              "logits)", f"{_TM}.coat:FactorAttnConvRelPosEnc"),
    *_entries(UNSUPPORTED, f"cross-attention of the class token that {_INLINE}",
              f"{_TM}.crossvit:CrossAttention"),
    *_entries(HOLDS, "a block holding CrossAttention, listed on its own",
              f"{_TM}.crossvit:CrossAttentionBlock"),
    *_entries(UNSUPPORTED, f"holds a single-head attention over scalar tokens that {_INLINE}",
              f"{_TM}.csatv2:SpatialAttention"),
    *_entries(UNSUPPORTED, _CHANNELS, f"{_TM}.davit:ChannelAttention",
              f"{_TM}.davit:ChannelAttentionV2", f"{_TM}.edgenext:CrossCovarianceAttn",
              f"{_TM}.xcit:XCA"),
    *_entries(UNSUPPORTED, f"attention with learned biases (and talking heads in v2) that "
              f"{_INLINE}", f"{_TM}.efficientformer:Attention",
              f"{_TM}.efficientformer_v2:Attention2d",
              f"{_TM}.efficientformer_v2:Attention2dDownsample", f"{_TM}.levit:Attention",
              f"{_TM}.levit:AttentionDownsample"),
    *_entries(UNSUPPORTED, f"cascaded group attention with biases that {_INLINE}",
              f"{_TM}.efficientvit_msra:CascadedGroupAttention"),
    *_entries(HOLDS, "holds CascadedGroupAttention, listed on its own",
              f"{_TM}.efficientvit_msra:LocalWindowAttention"),
    *_entries(HOLDS, "a block holding FastViT's Attention, measured on its own",
              f"{_TM}.fastvit:AttentionBlock"),
    *_entries(HOLDS, "a GCViT model, stage or block holding WindowAttentionGlobal, listed on its "
              "own", f"{_TM}.gcvit:GlobalContextVit", f"{_TM}.gcvit:GlobalContextVitBlock",
              f"{_TM}.gcvit:GlobalContextVitStage"),
    *_entries(UNSUPPORTED, f"window attention with global queries and relative bias that "
              f"{_INLINE}", f"{_TM}.gcvit:WindowAttentionGlobal"),
    *_entries(NOT_ATTENTION, "a ghost convolution without the DFC gate (GhostNetV1, RepGhost)",
              f"{_TM}.ghostnet:GhostModule", f"{_TM}.repghost:RepGhostModule"),
    *_entries(UNSUPPORTED, f"mask-unit attention: {_FIVE_D}", f"{_TM}.hiera:MaskUnitAttention",
              f"{_TM}.nest:Attention", f"{_TM}.twins:LocallyGroupedAttn"),
    *_entries(HOLDS, "a MaxViT / CoAtNet partition block holding Attention2d or AttentionCl, "
              "measured on their own", f"{_TM}.maxxvit:ParallelPartitionAttention",
              f"{_TM}.maxxvit:PartitionAttention2d", f"{_TM}.maxxvit:PartitionAttentionCl"),
    *_entries(UNSUPPORTED, "linear attention: a softmax over positions of one context score per "
              "token (no query-key logits)", f"{_TM}.mobilevit:LinearSelfAttention"),
    *_entries(UNSUPPORTED, f"pooled attention with decomposed relative positions that {_INLINE}",
              f"{_TM}.mvitv2:MultiScaleAttention", f"{_TM}.mvitv2:MultiScaleAttentionPoolFirst"),
    *_entries(HOLDS, "holds EffectiveSEModule, measured on its own", f"{_TM}.rdnet:BlockESE"),
    *_entries(HOLDS, "a SENet model or block holding SEModule, measured on its own",
              f"{_TM}.senet:SENet", f"{_TM}.senet:SEBottleneck", f"{_TM}.senet:SEResNetBlock",
              f"{_TM}.senet:SEResNetBottleneck", f"{_TM}.senet:SEResNeXtBottleneck"),
    *_entries(HOLDS, "a block holding SelectiveKernel, measured on its own",
              f"{_TM}.sknet:SelectiveKernelBasic", f"{_TM}.sknet:SelectiveKernelBottleneck"),
    *_entries(UNSUPPORTED, "additive attention: a normalised pooling of the queries, no softmax",
              f"{_TM}.swiftformer:EfficientAdditiveAttention"),
    *_entries(UNSUPPORTED, f"cosine attention with a learned logit scale that {_INLINE}",
              f"{_TM}.swin_transformer_v2:WindowAttention",
              f"{_TM}.swin_transformer_v2_cr:WindowMultiHeadAttention"),
    *_entries(UNSUPPORTED, f"attention that {_INLINE}", f"{_TM}.tnt:Attention",
              f"{_TM}.volo:ClassAttention", f"{_TM}.convit:MHSA"),
    *_entries(UNSUPPORTED, "gated positional self-attention: two softmax maps (content, "
              "position) mixed by a learned gate", f"{_TM}.convit:GPSA"),
    *_entries(UNSUPPORTED, "outlook attention: a softmax over a window's positions predicted "
              "from the centre token (no query-key logits)", f"{_TM}.volo:OutlookAttention"),
    *_entries(UNSUPPORTED, "its fused path is experimental in timm (off by default); the inline "
              "path's softmax is not read", f"{_TM}.visformer:Attention"),
    *_entries(UNSUPPORTED, "calls SDPA with the heads folded into the batch and adds decomposed "
              "relative positions inline", f"{_TM}.vision_transformer_sam:Attention"),
    *_entries(UNSUPPORTED, f"relative-position window attention that {_INLINE}",
              "torchvision.models.maxvit:RelativePositionalMultiHeadAttention",
              "torchvision.models.swin_transformer:ShiftedWindowAttention",
              "torchvision.models.swin_transformer:ShiftedWindowAttentionV2",
              "torchvision.models.video.swin_transformer:ShiftedWindowAttention3d",
              "torchvision.models.video.mvit:MultiscaleAttention"),
    *_entries(HOLDS, "a MaxViT layer holding RelativePositionalMultiHeadAttention, listed on its "
              "own", "torchvision.models.maxvit:PartitionAttentionLayer"),
    *_entries(NOT_ATTENTION, "multi-head convolutional attention: a grouped 3x3 convolution, "
              "no softmax", f"{_TM}.nextvit:ConvAttention"),
    *_entries(UNSUPPORTED, f"single-head attention over a channel split that {_INLINE}",
              f"{_TM}.shvit:SHSA"),
    *_entries(NOT_ATTENTION, "the SqueezeNet model (fire modules): no attention",
              "torchvision.models.squeezenet:SqueezeNet"),
    *_entries(NOT_ATTENTION, "an activation (scaled ELU)", "torch.nn.modules.activation:SELU"),
)


# -- transformers: rules on the source text ----------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A verdict on a transformers class from its name and source text (first rule wins)."""

    kind: str
    reason: str
    test: Callable[[str, str, frozenset[str]], bool]


_GATE_NAME = re.compile(r"Gate|GLU|MLP|Mlp|Router|Expert|Gating")
_ATTN_NAME = re.compile(r"Attn|Attention")
_INSTANTIATES = re.compile(r"\b([A-Z]\w*)\s*\(")


def _holds(name: str, source: str, candidates: frozenset[str]) -> bool:
    made = {m for m in _INSTANTIATES.findall(source) if m != name}
    return bool(made & candidates) or "ATTENTION_CLASSES[" in source or (
        "attention_class(" in source)


#: The verdicts on transformers' attention-like classes that do not dispatch through the
#: attention-function registry, in order.
TRANSFORMERS_RULES: tuple[Rule, ...] = (
    Rule(NOT_ATTENTION, "a gate of an MLP or a router of experts: it weighs channels or "
         "experts, not positions",
         lambda name, source, c: bool(_GATE_NAME.search(name)) and not _ATTN_NAME.search(name)),
    Rule(UNSUPPORTED, "learned attention sinks (s_aux): its softmax has a column per head that "
         "no query-key logit holds", lambda name, source, c: hands_sink_logits(source)),
    Rule(HOLDS, "holds an attention module, diagnosed or listed on its own", _holds),
    Rule(UNSUPPORTED, "a squeeze-excite gate of a transformers convolutional model: no adapter",
         lambda name, source, c: bool(re.search(r"Squeeze|Excit|SE(?=[A-Z]|$)", name))),
    Rule(UNSUPPORTED, "computes its softmax over keys inline, not through the attention-function "
         "registry (ALL_ATTENTION_FUNCTIONS): its queries and keys are not seen",
         lambda name, source, c: "softmax" in source),
    Rule(UNSUPPORTED, "no softmax over keys in its code: linear, deformable, state-space or "
         "convolutional attention, or a helper", lambda name, source, c: True),
)

_CLASS = re.compile(r"^class (\w+)\((.*?)\):", re.M)
_TOP_LEVEL = re.compile(r"^(?=[A-Za-z@_])", re.M)


def _transformers_sources() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """``module:Name`` -> (name, class source, base names) of every class of transformers'
    modeling files, read as text (nothing is imported)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return {}
    root = Path(next(iter(spec.submodule_search_locations)))
    out = {}
    for path in sorted(root.glob("models/*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        for match in _CLASS.finditer(text):
            rest = text[match.end():]
            end = next((m.start() for m in _TOP_LEVEL.finditer(rest) if m.start() > 0),
                       len(rest))
            bases = tuple(b.strip().split(".")[-1] for b in match.group(2).split(",") if b)
            out[f"{module}:{match.group(1)}"] = (match.group(1), text[match.start():
                                                                       match.end() + end], bases)
    return out


# -- the census --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CensusRow:
    """One attention-like class: ``status`` is ``"diagnosed"`` or a :class:`NotDiagnosed`
    kind; ``how``: what measures it, or why not."""

    package: str
    target: str
    status: str
    how: str


def _adapter_words(cls: type | None, key: str, source: str | None) -> str | None:
    """What diagnoses the class: an adapter's masks / router, or its heads; else ``None``."""
    mro = {f"{c.__module__}:{c.__qualname__}" for c in cls.__mro__} if cls is not None else {key}
    for adapter in BUILTIN_ADAPTERS:
        if isinstance(adapter.target, str) and adapter.target in mro:
            parts = [f"masks {', '.join(adapter.masks)}"] if adapter.masks else []
            parts += ["router"] if adapter.router else []
            return "; ".join(parts)
    for adapter in HEAD_ADAPTERS:
        if isinstance(adapter.target, str):
            if adapter.target in mro:
                return "heads" + (f" (with {adapter.needs})" if adapter.needs else "")
        elif (cls is not None and adapter.matches_class(cls)) or (
                cls is None and source is not None and dispatches_through_registry(source)):
            return f"heads, through the attention-function registry (with {adapter.needs})"
    return None


_DECLARED = {entry.target: entry for entry in NOT_DIAGNOSED}


def _imported_classes(prefixes: Iterable[str]) -> Iterator[tuple[str, type]]:
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(tuple(prefixes)):
            continue
        for obj in list(vars(module).values()):
            if (inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == name
                    and ATTENTION_LIKE.search(obj.__name__)):
                yield f"{obj.__module__}:{obj.__qualname__}", obj


#: package -> (what to import, the modules whose classes count)
_IMPORTED = {
    "torch": (("torch.nn",), ("torch.nn.modules.",)),
    "timm": (("timm", "timm.layers", "timm.models"), ("timm.layers", "timm.models")),
    "torchvision": (("torchvision.models", "torchvision.ops"),
                    ("torchvision.models", "torchvision.ops")),
}


def _import_all(package: str) -> bool:
    imports, _ = _IMPORTED[package]
    try:
        for name in imports:
            importlib.import_module(name)
    except ImportError:
        return False
    if package == "timm":  # timm.layers' own modules (some are not imported by timm.layers)
        for info in pkgutil.iter_modules(sys.modules["timm.layers"].__path__):
            importlib.import_module(f"timm.layers.{info.name}")
    return True


PACKAGES = ("torch", "timm", "torchvision", "transformers")


@functools.cache
def census(packages: tuple[str, ...] = PACKAGES) -> tuple[CensusRow, ...]:
    """Every attention-like class of the installed ``packages`` with its verdict; a class
    neither diagnosed nor declared gets the status ``"unknown"`` (what the census test
    fails on). Imports the packages' model code (timm's and torchvision's models)."""
    rows = []
    for package in packages:
        if package == "transformers":
            rows += _transformers_rows()
            continue
        if not _import_all(package):
            continue
        for key, cls in sorted(_imported_classes(_IMPORTED[package][1])):
            how = _adapter_words(cls, key, None)
            entry = _DECLARED.get(key)
            if how is not None:
                rows.append(CensusRow(package, key, "diagnosed", how))
            elif entry is not None:
                rows.append(CensusRow(package, key, entry.kind, entry.reason))
            else:
                rows.append(CensusRow(package, key, "unknown", ""))
    return tuple(rows)


def _forward_source(key: str, sources: dict, by_name: dict) -> str:
    # The class's own text when it defines forward, else its bases' (the forward it runs).
    seen, todo = set(), [key]
    while todo:
        current = todo.pop(0)
        if current in seen or current not in sources:
            continue
        seen.add(current)
        name, text, bases = sources[current]
        if "def forward" in text:
            return text
        module = current.split(":")[0]
        todo += [f"{module}:{b}" if f"{module}:{b}" in sources else by_name.get(b, "")
                 for b in bases]
    return sources[key][1] if key in sources else ""


def _transformers_rows() -> list[CensusRow]:
    sources = _transformers_sources()
    by_name = {}
    for key, (name, _, _) in sources.items():
        by_name.setdefault(name, key)
    candidates = frozenset(name for name, _, _ in sources.values() if ATTENTION_LIKE.search(name))
    rows = []
    for key, (name, _, _) in sources.items():
        if name not in candidates:
            continue
        forward = _forward_source(key, sources, by_name)
        how = _adapter_words(None, key, forward)
        if how is not None:
            rows.append(CensusRow("transformers", key, "diagnosed", how))
            continue
        rule = next(r for r in TRANSFORMERS_RULES if r.test(name, forward, candidates))
        rows.append(CensusRow("transformers", key, rule.kind, rule.reason))
    return rows


# -- the tables of the docs ------------------------------------------------------------------

STATUSES = ("diagnosed", UNSUPPORTED, HOLDS, NOT_ATTENTION, "unknown")


def _versions(rows: Iterable[CensusRow]) -> str:
    from importlib import metadata

    return ", ".join(f"{p} {metadata.version(p)}" for p in dict.fromkeys(r.package for r in rows))


def coverage_summary(rows: Iterable[CensusRow]) -> str:
    """The table of docs/diagnostics.md: attention-like classes per package and verdict."""
    rows = list(rows)
    packages = list(dict.fromkeys(r.package for r in rows))
    lines = [f"| verdict | {' | '.join(packages)} |", "| --- |" + " --- |" * len(packages)]
    for status in STATUSES:
        counts = [sum(r.package == p and r.status == status for r in rows) for p in packages]
        if any(counts):
            lines.append(f"| {status} | {' | '.join(map(str, counts))} |")
    return "\n".join(lines) + f"\n\n(installed: {_versions(rows)})"


def _short(target: str) -> str:
    return target.split(":")[1]


def coverage_page(rows: Iterable[CensusRow]) -> str:
    """docs/coverage.md: every class of PyTorch, timm and torchvision with its verdict, and
    transformers' classes grouped by verdict."""
    rows = list(rows)
    out = [
        "# Attention coverage: every attention-like class, diagnosed or why not",
        "",
        "Generated by `scripts/coverage_table.py` from `lightning_attn.blocks.census` (the",
        "adapters, the head adapters, `NOT_DIAGNOSED` and `TRANSFORMERS_RULES`);",
        "`tests/blocks/test_census.py` fails when a class is neither diagnosed nor declared,",
        "and when this page is not what the script writes.",
        "",
        f"Installed: {_versions(rows)}.",
        "",
    ]
    for package in dict.fromkeys(r.package for r in rows if r.package != "transformers"):
        out += [f"## {package}", "", "| class | verdict | how, or why not |",
                "| --- | --- | --- |"]
        out += [f"| `{r.target}` | {r.status} | {r.how} |" for r in rows if r.package == package]
        out.append("")
    hf = [r for r in rows if r.package == "transformers"]
    if hf:
        out += ["## transformers", "",
                f"{len(hf)} attention-like classes in the modeling files, read as text. A class "
                "whose forward calls its attention through `ALL_ATTENTION_FUNCTIONS` is "
                "diagnosed (its heads, when the model runs `sdpa` or `eager`); the others, by "
                "the first rule that holds:", "", "| verdict | why | classes |",
                "| --- | --- | --- |"]
        groups: dict[tuple[str, str], list[str]] = {}
        for r in hf:
            groups.setdefault((r.status, r.how), []).append(_short(r.target))
        for (status, how), names in groups.items():
            listed = f"{len(names)} classes" if status == "diagnosed" else ", ".join(
                f"`{n}`" for n in sorted(set(names)))
            out.append(f"| {status} | {how} | {listed} |")
        out.append("")
    return "\n".join(out)


# -- a built model --------------------------------------------------------------------------


@functools.cache
def _verdict(cls: type) -> tuple[str, str] | None:
    """``(kind, reason)`` of a class no adapter matched, ``None`` when it is not
    attention-like."""
    key = f"{cls.__module__}:{cls.__qualname__}"
    if key in _DECLARED:
        return _DECLARED[key].kind, _DECLARED[key].reason
    if not ATTENTION_LIKE.search(cls.__name__):
        return None
    if cls.__module__.startswith("transformers."):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        rule = next(r for r in TRANSFORMERS_RULES if r.test(cls.__name__, source, frozenset()))
        return rule.kind, rule.reason
    return UNSUPPORTED, ("an attention-like module the diagnostics do not know: let it record "
                         "(HeadRecordingMixin.record_heads, RecordingMixin.record) or give an "
                         "adapter (attention_adapter)")


def _builtin_class(cls: type) -> bool:
    mro = {f"{c.__module__}:{c.__qualname__}" for c in cls.__mro__}
    return any(isinstance(a.target, str) and a.target in mro for a in BUILTIN_ADAPTERS)


def unseen_attention(
    root: nn.Module, watched: Iterable[nn.Module], ignored: Callable[[str], bool] = lambda n: False
) -> dict[str, tuple[str, list[str]]]:
    """The attention modules of ``root`` the diagnostics do not measure: class name -> (why,
    the modules' names). Left out: the ``watched`` modules, what lies inside or around one (a
    part or a container of measured attention), the names ``ignored`` (left out on purpose),
    modules of an adapted class with nothing to read (a SplitAttn of radix 1, a GhostNetV3
    module without its gate) and classes that are not attention. A module of a head adapter's
    class that the adapter does not apply to (a transformers model running
    ``flash_attention_2``, timm's non-fused path) is named with what it needs."""
    watched = {id(m) for m in watched}
    modules = list(root.named_modules())
    quiet: set[int] = set()
    for name, module in modules:
        if id(module) in watched:
            inside = f"{name}."
            quiet |= {id(m) for n, m in modules if n.startswith(inside) or not n
                      or inside.startswith(f"{n}.")}
    out: dict[str, tuple[str, list[str]]] = {}
    for name, module in modules:
        if id(module) in watched or id(module) in quiet or ignored(name):
            continue
        cls = type(module)
        adapter = next((a for a in HEAD_ADAPTERS if a.matches_class(cls)), None)
        if adapter is not None or _builtin_class(cls):
            if adapter is None or not adapter.needs:
                continue  # its adapter finds nothing to read in this instance
            implementation = transformers_attention_implementation(module)
            why = f"it needs {adapter.needs}" + (
                f"; it runs {implementation!r}" if implementation else "")
        else:
            verdict = _verdict(cls)
            if verdict is None or verdict[0] != UNSUPPORTED:
                continue
            why = verdict[1]
        out.setdefault(cls.__qualname__, (why, []))[1].append(name)
    return out
