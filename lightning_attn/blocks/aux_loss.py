"""Auxiliary router losses: balance and stability terms for blocks with a router.

A block with a router (:class:`~lightning_attn.blocks.DynamicSpatialAttention`, or a block of yours
that inherits :class:`RouterAuxMixin`) keeps the router logits of its latest forward,
``z (B, K)``, as part of the autograd graph (a reference, not a copy: nothing is computed).
After the forward, the terms below are computed from them, in the graph, so their gradients
reach the router; a term whose weight is zero is never computed::

    logits = self.net(x)
    loss = F.cross_entropy(logits, y) + attention_aux_loss(self, balance=0.01, z_loss=1e-3)

With ``p = softmax(z)`` ``(B, K)``, ``P_k = mean_b p_bk`` (mean branch weight) and
``f_k`` the share of samples whose largest weight is branch ``k`` (no gradient):

==============  =====================================================  ===================
term            value                                                   balanced / worst
==============  =====================================================  ===================
``importance``  ``CV^2`` of the importance ``I_k = sum_b p_bk``:        ``0`` / ``K - 1``
                ``Var_k(I) / mean_k(I)^2`` (population variance)
``balance``     Switch-style ``K * sum_k f_k * P_k``                    ``1`` / ``K``
``entropy``     entropy bonus ``1 - mean_b H(p_b) / log K``             ``0`` / ``1``
``z_loss``      ``mean_b logsumexp_k(z_bk)^2`` (router z-loss)          ``0`` at ``z = 0``
==============  =====================================================  ===================

``importance`` and ``balance`` penalise unequal use of the branches across the batch (the
mixture-of-experts importance and load-balancing losses); ``entropy`` rewards spreading each
sample's weights (the diagnostics' normalised router entropy is ``1 - entropy``); ``z_loss``
keeps the logits small, against blow-up. Every term is computed in float32.

Under DDP each process computes the terms on its own shard (as Switch does per device); the
gradients are averaged by DDP like any other. Under ``torch.compile`` the logits are an output
of the compiled graph; the terms are a few ``(B, K)`` operations after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..core.validation import check_nonnegative_float

__all__ = [
    "AUX_TERMS",
    "AuxLossWeights",
    "RouterAuxMixin",
    "attention_aux_loss",
    "attention_aux_terms",
    "find_router_blocks",
    "router_aux_terms",
]

#: The auxiliary terms, in the order they are computed and logged.
AUX_TERMS: tuple[str, ...] = ("importance", "balance", "entropy", "z_loss")


def _check_terms(terms: Iterable[str]) -> tuple[str, ...]:
    if isinstance(terms, str):
        terms = (terms,)
    terms = tuple(terms)
    unknown = [t for t in terms if t not in AUX_TERMS]
    if unknown:
        raise ValueError(f"unknown auxiliary terms {unknown}; known terms: {list(AUX_TERMS)}")
    return terms


def router_aux_terms(
    logits: torch.Tensor, terms: Iterable[str] = AUX_TERMS
) -> dict[str, torch.Tensor]:
    """The requested auxiliary terms of router logits ``(B, K)``, each a 0-d float32 tensor.

    Only the requested terms are computed (and only what they need: ``z_loss`` alone never
    takes a softmax). An empty batch gives zeros. See the module docstring for the formulas.
    """
    terms = _check_terms(terms)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"router logits must be a (B, K) tensor with K >= 1, got {shape}")
    if not terms:
        return {}
    z = logits.float()
    b, k = z.shape
    if b == 0:  # nothing routed: every term is 0 (a mean over no samples would be NaN)
        return {t: z.new_zeros(()) for t in terms}
    out: dict[str, torch.Tensor] = {}
    needs_p = any(t in terms for t in ("importance", "balance", "entropy"))
    log_p = torch.log_softmax(z, dim=1) if needs_p else None
    p = log_p.exp() if log_p is not None else None
    usage = p.mean(dim=0) if p is not None else None  # P_k (K,)
    for term in terms:
        if term == "importance":
            # CV^2 is scale-free: the importance sum_b p_bk and the mean usage P_k agree.
            mean = usage.mean()
            out[term] = ((usage - mean) ** 2).mean() / mean**2
        elif term == "balance":
            # f_k: the share of samples dispatched (top weight) to k, a constant; the
            # gradient goes through P_k, as in the Switch Transformer.
            top = torch.nn.functional.one_hot(p.argmax(dim=1), k).to(p.dtype)
            out[term] = k * (top.mean(dim=0) * usage).sum()
        elif term == "entropy":
            if k == 1:  # one branch: nothing to spread
                out[term] = z.new_zeros(())
            else:
                # -sum p log p from log_softmax: finite even where p underflows to 0.
                entropy = -(p * log_p).sum(dim=1)
                out[term] = 1.0 - entropy.mean() / math.log(k)
        else:  # z_loss
            out[term] = torch.logsumexp(z, dim=1).square().mean()
    return out


class RouterAuxMixin:
    """A block with a router keeps its latest router logits for the auxiliary losses.

    Call :meth:`keep_router_logits` in ``forward`` with the logits ``(B, K)`` before the
    softmax (a reference is kept, nothing is computed: a zero-weight term costs nothing).
    Put it before ``nn.Module`` in the bases. The logits are a plain attribute: never in the
    state dict, dropped from pickles and copies by the blocks of this package.
    """

    _router_logits: torch.Tensor | None = None

    def keep_router_logits(self, logits: torch.Tensor) -> None:
        """Keep ``logits`` ``(B, K)`` of this forward (replacing the previous forward's)."""
        self._router_logits = logits

    @property
    def router_logits(self) -> torch.Tensor | None:
        """The router logits ``(B, K)`` of the latest forward (``None`` before the first)."""
        return self._router_logits

    def clear_router_logits(self) -> None:
        """Drop the kept logits (and with them any autograd graph they still reference)."""
        self.__dict__.pop("_router_logits", None)

    def aux_terms(self, terms: Iterable[str] = AUX_TERMS) -> dict[str, torch.Tensor]:
        """The requested auxiliary terms of the latest forward (see :func:`router_aux_terms`).

        Raises ``RuntimeError`` before the first forward.
        """
        logits = self._router_logits
        if logits is None:
            raise RuntimeError(
                f"{type(self).__name__} has not run a forward yet: its auxiliary terms come "
                "from the router logits of the latest forward"
            )
        return router_aux_terms(logits, terms)


def find_router_blocks(module: nn.Module) -> dict[str, RouterAuxMixin]:
    """Every block with a router under ``module`` (``module`` itself included), by name.

    Wrappers (DDP, ``torch.compile``) are looked through: each block appears once.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    # named_modules yields each module once, however many paths lead to it.
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, RouterAuxMixin)}


def attention_aux_terms(
    module: nn.Module, terms: Iterable[str] = AUX_TERMS
) -> dict[str, torch.Tensor]:
    """Each requested term, averaged over the router blocks under ``module`` that have run.

    The mean over blocks (not the sum) keeps a weight's meaning independent of how many
    blocks the network has: ``balance`` is 1.0 when every block is balanced. A block that has
    not run a forward yet is left out. Raises ``ValueError`` when ``module`` holds no block
    with a router, ``RuntimeError`` when none of them has run a forward.
    """
    terms = _check_terms(terms)
    blocks = find_router_blocks(module)
    if not blocks:
        raise ValueError(
            f"{type(module).__name__} holds no attention block with a router "
            "(DynamicSpatialAttention, or a block inheriting RouterAuxMixin): the auxiliary "
            "router losses need one"
        )
    ran = [b for b in blocks.values() if b.router_logits is not None]
    if not ran:
        raise RuntimeError(
            f"no router block of {type(module).__name__} has run a forward yet "
            f"({', '.join(blocks)}): call attention_aux_loss after the forward"
        )
    if not terms:
        return {}
    per_block = [b.aux_terms(terms) for b in ran]
    if len(per_block) == 1:
        return per_block[0]
    return {t: torch.stack([d[t] for d in per_block]).mean() for t in terms}


@dataclass(frozen=True)
class AuxLossWeights:
    """The weight of each auxiliary router term (``0``: the term is not computed).

    Args:
        importance: weight of the importance ``CV^2``.
        balance: weight of the Switch-style load-balancing term (``0.01`` is the Switch
            Transformer's choice).
        entropy: weight of the entropy bonus ``1 - normalised router entropy``.
        z_loss: weight of the router z-loss (``1e-3`` in ST-MoE).
    """

    importance: float = 0.0
    balance: float = 0.0
    entropy: float = 0.0
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        for name in AUX_TERMS:
            object.__setattr__(self, name, check_nonnegative_float(name, getattr(self, name)))

    def nonzero(self) -> dict[str, float]:
        """``term -> weight`` for the terms with a non-zero weight, in :data:`AUX_TERMS` order."""
        return {t: getattr(self, t) for t in AUX_TERMS if getattr(self, t) != 0.0}

    @classmethod
    def coerce(cls, value: object, argument: str = "aux_loss") -> AuxLossWeights:
        """An ``AuxLossWeights`` from itself, a mapping of some of its fields, or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(AUX_TERMS))
            if unknown:
                raise TypeError(
                    f"{argument} has unknown keys {unknown}; valid keys: {list(AUX_TERMS)}"
                )
            return cls(**value)
        raise TypeError(
            f"{argument} must be an AuxLossWeights or a dict of its fields, got "
            f"{type(value).__name__}"
        )


def attention_aux_loss(
    module: nn.Module,
    *,
    importance: float = 0.0,
    balance: float = 0.0,
    entropy: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """``sum_t weight_t * term_t`` over the auxiliary terms, each averaged over the router
    blocks under ``module`` (see :func:`attention_aux_terms`); a 0-d tensor to add to the loss.

    Call it after the forward: ``loss = loss + attention_aux_loss(self, balance=0.01)``.
    Terms with weight 0 are not computed; with every weight 0 the result is a constant zero
    (no graph). Weights must be finite and ``>= 0``.
    """
    weights = AuxLossWeights(importance, balance, entropy, z_loss).nonzero()
    if not weights:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        param = next(module.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    terms = attention_aux_terms(module, tuple(weights))
    total = None
    for term, weight in weights.items():
        value = weight * terms[term]
        total = value if total is None else total + value
    return total
