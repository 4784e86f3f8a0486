"""Where an attention module keeps each head's query and key weights, and Kimi K2's QK-clip
rescaling of them.

A head's logits are ``q_h . k_g * scale`` (``g`` the key head it reads; ``g = h`` unless the keys
are grouped). Scaling the rows of ``W_q`` (and its bias) that make ``q_h`` by ``a`` and those of
``W_k`` that make ``k_g`` by ``b`` scales the head's logits by ``a * b``: the rotary embedding,
the ``scale`` and the dot product are all linear in ``q`` and ``k``. (Additive terms, Swin's
relative position bias or ALiBi, are not scaled: the clip scales the ``q . k`` part.)

:func:`query_key_projections` finds those rows in

- timm's ``Attention``, ``AttentionRope``, ``EvaAttention`` and Swin's ``WindowAttention``: one
  fused ``qkv`` (rows ``[q | k | v]``, each ``(H, D)``), or ``q_proj`` / ``k_proj`` (grouped
  keys in ``AttentionRope``), and EVA's ``q_bias``;
- ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q_proj_weight`` / ``k_proj_weight`` when
  ``kdim`` / ``vdim`` differ), ``in_proj_bias`` and ``bias_k``;
- Hugging Face attention: ``q_proj`` / ``k_proj`` (Llama, Mistral, Qwen, CLIP, Whisper, ...),
  ``query`` / ``key`` (BERT, ViT), ``q`` / ``k`` (T5), grouped-query keys included;

and refuses, saying why, a module whose queries and keys are normalised (``qk_norm``: the norm
undoes any rescaling, and bounds the logits by itself) or whose projections it cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["QueryKeyProjections", "query_key_projections"]

#: Separate projection pairs, as timm's and Hugging Face's modules name them.
_SEPARATE = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("to_q", "to_k"))
#: Submodules that normalise the queries or keys (timm's ``qk_norm``; Qwen3, OLMo 2, Gemma 3).
_QK_NORMS = ("q_norm", "k_norm", "query_norm", "key_norm", "q_layernorm", "k_layernorm")


@dataclass(frozen=True)
class _Rows:
    """The rows of ``heads`` heads of ``head_dim`` each, from ``start`` along ``dim`` of
    ``tensor`` (a weight ``(out, in)``: ``dim=0``; a bias ``(out,)``; ``bias_k (1, 1, E)``:
    ``dim=2``)."""

    tensor: torch.Tensor
    start: int
    heads: int
    head_dim: int
    dim: int = 0

    def scale_(self, factors: torch.Tensor) -> None:
        """Multiply head ``h``'s rows by ``factors[h]``, in place (a factor 1 leaves them
        bitwise as they were)."""
        rows = self.tensor.narrow(self.dim, self.start, self.heads * self.head_dim)
        shape = [1] * rows.dim()
        shape[self.dim] = self.heads * self.head_dim
        rows.mul_(factors.to(rows.dtype).repeat_interleave(self.head_dim).view(shape))


@dataclass(frozen=True)
class QueryKeyProjections:
    """The query and key rows of one attention module, per head.

    Attributes:
        num_heads: query heads ``H``.
        num_kv_heads: key heads ``Hk`` (``H`` a multiple of it; ``Hk < H``: grouped-query).
        head_dim: ``D``.
        query: the tensors holding the query rows (weight, bias, ...).
        key: those holding the key rows.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    query: tuple[_Rows, ...]
    key: tuple[_Rows, ...]

    @property
    def grouped(self) -> bool:
        """Whether several query heads share one key head."""
        return self.num_kv_heads < self.num_heads

    @torch.no_grad()
    def clip_(self, max_logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """Kimi K2's QK-clip, in place: each head whose max logit passed ``threshold`` has its
        logits scaled by ``gamma = threshold / max_logit``; the others are left bitwise as
        they were. Returns the factors ``gamma`` ``(H,)`` (1 for a head left alone).

        One key head per query head: ``sqrt(gamma)`` on each side (Kimi K2). Grouped keys: a
        key head is shared by the heads of its group, so it is left as it is and the query
        head takes the whole ``gamma`` (Kimi K2's treatment of the key components MLA shares
        between heads): each head lands on the threshold and no other head moves.

        Tensor operations only (no host sync): ``max_logits`` ``(H,)`` may be ``-inf`` (no
        forward) or NaN; neither clips.
        """
        maxima = max_logits.detach().float()
        over = maxima > threshold
        gamma = torch.where(over, threshold / torch.where(over, maxima, 1.0), 1.0)
        if self.grouped:
            for rows in self.query:
                rows.scale_(gamma)
            return gamma
        root = gamma.sqrt()
        for rows in (*self.query, *self.key):
            rows.scale_(root)
        return gamma

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the clip writes to."""
        return [r.tensor for r in (*self.query, *self.key)]


def _linear_rows(linear: nn.Linear, start: int, heads: int, head_dim: int) -> list[_Rows]:
    rows = [_Rows(linear.weight, start, heads, head_dim)]
    if linear.bias is not None:
        rows.append(_Rows(linear.bias, start, heads, head_dim))
    return rows


def _normalised(module: nn.Module) -> str | None:
    for name in _QK_NORMS:
        norm = getattr(module, name, None)
        if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
            return name
    return None


def _multihead(module: nn.MultiheadAttention) -> QueryKeyProjections:
    heads, e = module.num_heads, module.embed_dim
    d = e // heads
    if module._qkv_same_embed_dim:
        query = [_Rows(module.in_proj_weight, 0, heads, d)]
        key = [_Rows(module.in_proj_weight, e, heads, d)]
    else:
        query = [_Rows(module.q_proj_weight, 0, heads, d)]
        key = [_Rows(module.k_proj_weight, 0, heads, d)]
    if module.in_proj_bias is not None:
        query.append(_Rows(module.in_proj_bias, 0, heads, d))
        key.append(_Rows(module.in_proj_bias, e, heads, d))
    if module.bias_k is not None:  # a key appended to every sequence
        key.append(_Rows(module.bias_k, 0, heads, d, dim=2))
    return QueryKeyProjections(heads, heads, d, tuple(query), tuple(key))


def _fused(module: nn.Module, qkv: nn.Linear, heads: int) -> QueryKeyProjections:
    if qkv.out_features % (3 * heads):
        raise ValueError(f"its fused qkv has {qkv.out_features} outputs, not 3 x {heads} heads")
    d = qkv.out_features // (3 * heads)
    query, key = _linear_rows(qkv, 0, heads, d), _linear_rows(qkv, heads * d, heads, d)
    q_bias = getattr(module, "q_bias", None)  # EVA / BEiT: biases beside a bias-free qkv
    if isinstance(q_bias, nn.Parameter):
        query.append(_Rows(q_bias, 0, heads, d))
    k_bias = getattr(module, "k_bias", None)
    if isinstance(k_bias, nn.Parameter):
        key.append(_Rows(k_bias, 0, heads, d))
    return QueryKeyProjections(heads, heads, d, tuple(query), tuple(key))


def _separate(q: nn.Linear, k: nn.Linear, heads: int) -> QueryKeyProjections:
    if q.out_features % heads:
        raise ValueError(f"its query projection has {q.out_features} outputs, not a multiple "
                         f"of {heads} heads")
    d = q.out_features // heads
    kv_heads, rest = divmod(k.out_features, d)
    if rest or not kv_heads or heads % kv_heads:
        raise ValueError(f"its key projection has {k.out_features} outputs: not a number of "
                         f"{d}-wide heads that divides {heads}")
    return QueryKeyProjections(heads, kv_heads, d, tuple(_linear_rows(q, 0, heads, d)),
                               tuple(_linear_rows(k, 0, kv_heads, d)))


def query_key_projections(module: nn.Module, num_heads: int) -> QueryKeyProjections:
    """The query and key rows of ``module``'s ``num_heads`` heads (see the module's doc for
    the layouts read). A ``ValueError`` says why a module cannot be clipped: normalised
    queries or keys, or projections of another kind (a fused ``Conv1D``, a shared ``kv``)."""
    name = type(module).__name__
    norm = _normalised(module)
    if norm is not None:
        raise ValueError(
            f"{name} normalises its queries and keys ({norm}: qk_norm): the norm undoes a "
            "rescaling of their weights and bounds the logits itself, so there is nothing to "
            "clip")
    if isinstance(module, nn.MultiheadAttention):
        return _multihead(module)
    qkv = getattr(module, "qkv", None)
    try:
        if isinstance(qkv, nn.Linear):
            return _fused(module, qkv, num_heads)
        for q_name, k_name in _SEPARATE:
            q, k = getattr(module, q_name, None), getattr(module, k_name, None)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
                return _separate(q, k, num_heads)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    pairs = ", ".join(f"{q}/{k}" for q, k in _SEPARATE)
    raise ValueError(
        f"{name} has none of the query / key projections a clip reads (a fused nn.Linear "
        f"qkv, nn.MultiheadAttention's in_proj, or nn.Linear pairs {pairs}): exclude it")
