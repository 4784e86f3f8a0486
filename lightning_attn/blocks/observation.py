"""The observation point: how an outside observer sees what an attention block computed.

A block that speaks this protocol keeps a small table of observers. On every forward, and
only when that table is not empty, it builds one :class:`AttentionObservation` from tensors
it computed anyway and calls each observer with ``(block, observation)``. The block's return
values never change. With no observer attached the forward does one dictionary truthiness
check and nothing else: no tensor is kept, nothing is copied, nothing syncs with the device.

Observers are attached with :meth:`ObservableMixin.attach_observer`, which returns a
:class:`torch.utils.hooks.RemovableHandle`; ``handle.remove()`` detaches it. Attach and
detach as often as you like. The tensors in an observation are detached views (no autograd
graph, no copy): an observer that wants to keep one past the call must copy it, and one that
only computes statistics should do so under ``torch.no_grad()`` right away.

A user's own block joins the diagnostics by implementing :class:`ObservableAttention`
(easiest: inherit :class:`ObservableMixin`, call ``self._notify_observers(...)`` at the end
of ``forward`` when ``self.has_observers``, and override the two parameter methods). It
declares up front, as class or instance attributes, the names of the masks it reports
(``mask_names``, default ``("mask",)``) and, if it routes, its number of branches
(``num_branches``): under DDP every process must agree on the statistics' layout before any
forward has run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "MASK_NAMES",
    "AttentionObservation",
    "ObservableAttention",
    "ObservableMixin",
    "Observer",
]

#: Mask names an observation may carry: ``mask`` (DSA, ``(B,1,H,W)``), ``mask_h``
#: (CoordinateAttention's ``a_h``, ``(B,C,H,1)``) and ``mask_w`` (``a_w``, ``(B,C,1,W)``).
MASK_NAMES: tuple[str, ...] = ("mask", "mask_h", "mask_w")


@dataclass(frozen=True)
class AttentionObservation:
    """What one forward of an attention block exposes to observers.

    Attributes:
        masks: name -> detached mask tensor, values in ``[0, 1]``. Names are drawn from
            :data:`MASK_NAMES` (a user's block may use other names).
        router_weights: detached ``(B, K)`` softmax weights of a routed block, else ``None``.
        parameters: name -> detached 0-d tensor with the block's current scalar
            parameters: ``temperature`` (DSA), ``alpha`` or ``alpha_h``/``alpha_w`` and
            ``beta`` (CoordinateAttention), whether learnable or fixed.
    """

    masks: Mapping[str, torch.Tensor]
    router_weights: torch.Tensor | None = None
    parameters: Mapping[str, torch.Tensor] = field(default_factory=dict)


Observer = Callable[[nn.Module, AttentionObservation], None]


@runtime_checkable
class ObservableAttention(Protocol):
    """The protocol the diagnostics callbacks look for on every submodule."""

    def attach_observer(self, observer: Observer) -> RemovableHandle:
        """Call ``observer(self, observation)`` after every forward until the handle is removed."""
        ...

    def attention_parameters(self) -> dict[str, torch.Tensor]:
        """Current scalar parameters (temperature, alpha, ...) as detached 0-d tensors."""
        ...

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable ones among them, mapped to the ``nn.Parameter`` that holds them.

        The parameter may be a reparametrisation (DSA's ``t_raw`` for ``temperature``); its
        ``.grad`` is what a gradient-norm statistic reads.
        """
        ...


class ObservableMixin:
    """Observer bookkeeping for an ``nn.Module``; call ``_init_observers()`` in ``__init__``."""

    #: Names of the masks this block reports in its observations.
    mask_names: tuple[str, ...] = ("mask",)
    #: ``K`` of the block's router, or ``None`` for a block without one.
    num_branches: int | None = None
    _observers: OrderedDict[int, Observer]

    def _init_observers(self) -> None:
        # A plain attribute, not a buffer or parameter: it never enters the state dict.
        self._observers = OrderedDict()

    def attach_observer(self, observer: Observer) -> RemovableHandle:
        if not callable(observer):
            raise TypeError(f"observer must be callable, got {type(observer).__name__}")
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = observer
        return handle

    @property
    def has_observers(self) -> bool:
        return bool(self._observers)

    def _notify_observers(
        self,
        masks: Mapping[str, torch.Tensor],
        router_weights: torch.Tensor | None = None,
    ) -> None:
        observation = AttentionObservation(
            masks={name: m.detach() for name, m in masks.items()},
            router_weights=None if router_weights is None else router_weights.detach(),
            parameters=self.attention_parameters(),
        )
        for observer in tuple(self._observers.values()):
            observer(self, observation)  # type: ignore[arg-type]

    def attention_parameters(self) -> dict[str, torch.Tensor]:
        return {}

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def __getstate__(self) -> dict:
        # Observers are closures of whoever watches (often a Trainer callback); they must not
        # travel with a pickled or deep-copied model (ddp_spawn, checkpoint copies).
        state = self.__dict__.copy()  # type: ignore[attr-defined]
        state["_observers"] = OrderedDict()
        return state
