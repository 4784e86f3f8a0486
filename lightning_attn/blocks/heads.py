"""Attention heads: transformer self-attention (and any softmax over keys) measures itself
per head, inside the forward, from the queries and keys the forward already has.

A module of your own records with one call in its forward::

    class MyAttention(HeadRecordingMixin, nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads                 # declared before the diagnostics start
            self.qkv = nn.Linear(dim, 3 * dim)

        def forward(self, x, mask=None):               # x: (B, N, C)
            q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
            self.record_heads(q, k, mask=mask)         # q, k: (B, H, N, D); free when off
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)...

On the diagnostics' logging steps, :meth:`HeadRecordingMixin.record_heads` adds each head's
normalised entropy, max logit and sink share to the block's accumulator
(:func:`~lightning_attn.core.accumulator.head_reductions`: a chunk of queries at a time,
compile-safe); on every other step it tests two flags.

The attention already in users' models records through :class:`HeadAdapter` declarations
(:data:`HEAD_ADAPTERS`), found by :func:`~.discovery.find_attention_blocks` like the CNN
gates' adapters: forward hooks on the submodules that produce the queries and keys (timm's
``q_norm``/``k_norm``, Swin's ``qkv``), a pre-hook on ``nn.MultiheadAttention`` that recomputes
its projections on logging steps, and, for Hugging Face ``transformers`` models, a wrapper of
the attention functions their attention modules call through ``ALL_ATTENTION_FUNCTIONS``
(``sdpa``) or their modeling file's ``eager_attention_forward`` (``eager``). The model's code,
outputs and state dict are untouched.

Per-step max logits (for a logit clip such as QK-clip): :meth:`HeadRecordingMixin.
track_max_logits` keeps, on every forward while a holder tracks, each head's largest logit in
:attr:`HeadRecordingMixin.tracked_max_logits` (no softmax: the logits' maximum only).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import sys
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.accumulator import first_query_attention, head_reductions, logit_reductions
from .adapters import AdapterRecorder
from .recording import RecordingMixin, recomputing

__all__ = [
    "HEAD_ADAPTERS",
    "HeadAdapter",
    "HeadRecorder",
    "HeadRecordingMixin",
    "head_adapter_matching",
    "transformers_attention_implementation",
]

#: Instance attributes of the per-step max-logit tracking and of the captured first-query
#: attention (never copied or pickled).
_TRACKING_STATE = ("_attn_tracking", "_attn_tracking_holders", "_attn_logit_max",
                   "_attn_captured_query")


class HeadRecordingMixin(RecordingMixin):
    """Recording of attention heads for an ``nn.Module`` (before ``nn.Module`` in the bases).

    A block sets ``num_heads`` (the query heads ``H`` of the ``q`` it records; a class
    attribute or set in ``__init__``) and calls :meth:`record_heads` in its forward. It may
    also record masks (``mask_names``, default none) in the same forward through ``masks=``.
    """

    mask_names: tuple[str, ...] = ()
    num_heads: int | None = None

    _attn_tracking: bool = False
    _attn_logit_max: torch.Tensor | None = None
    _attn_captured_query: torch.Tensor | None = None

    # -- inside forward -------------------------------------------------------------------
    def record_heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        causal: bool = False,
        softcap: float | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record one attention call from its queries and keys, as the softmax sees them.

        ``q (B, H, Nq, D)`` as the softmax sees it (after any norm or rotary embedding;
        ``H == num_heads``), ``k (B, Hk, Nk, D)`` (``H`` a multiple of ``Hk``), ``scale``
        (``None``: ``D ** -0.5``, as SDPA), ``mask`` (SDPA's ``attn_mask``), ``bias``,
        ``causal`` and ``softcap``: as :func:`~lightning_attn.core.accumulator.head_reductions`
        reads them. ``masks``: masks of the same forward (name -> tensor), as :meth:`record`.

        While capture is held (:meth:`start_capture`: the attention-map images), it also
        keeps the first query's attention over the keys (:attr:`captured_query_attention`).

        Costs four attribute tests on a step that neither records, tracks nor captures.
        """
        recording, tracking = self._attn_recording, self._attn_tracking
        if not (recording or tracking or self._attn_capture) or recomputing():
            return  # (checkpointing's rerun: recorded when the forward first ran)
        self._check_heads(q.shape[1])
        if self._attn_capture:
            self._attn_captured_query = first_query_attention(
                q, k, scale=scale, mask=mask, bias=bias, causal=causal, softcap=softcap)
        config = self._attn_accumulator.config if self._attn_accumulator is not None else None
        chunk = config.head_chunk_elements if config is not None else 2**22
        reduced = None
        if recording:
            reduced = head_reductions(
                q, k, scale=scale, mask=mask, bias=bias, causal=causal, softcap=softcap,
                chunk_elements=chunk, dtype=self._attn_accumulator.values.dtype,
            )
            self.record(masks or {}, None, heads=reduced)
        if tracking:
            if reduced is None:
                reduced = head_reductions(
                    q, k, scale=scale, mask=mask, bias=bias, causal=causal, softcap=softcap,
                    chunk_elements=chunk, dtype=torch.float32, max_only=True,
                )
            self._track(reduced["max_logit"])

    def record_attention_logits(
        self,
        logits: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record attention whose logits the forward computed itself: ``logits (B, H, Nq,
        Nk)``, scaled and biased, before the softmax over the last dim (``mask``, ``causal``
        as in :meth:`record_heads`)."""
        recording, tracking = self._attn_recording, self._attn_tracking
        if not (recording or tracking) or recomputing():  # checkpointing's rerun: recorded
            return
        self._check_heads(logits.shape[1])
        acc = self._attn_accumulator
        reduced = logit_reductions(
            logits, mask=mask, causal=causal,
            chunk_elements=acc.config.head_chunk_elements if acc is not None else 2**22,
            dtype=acc.values.dtype if acc is not None else torch.float32,
        )
        if recording:
            self.record(masks or {}, None, heads=reduced)
        if tracking:
            self._track(reduced["max_logit"])

    def _check_heads(self, heads: int) -> None:
        # Shapes only: a compiled graph folds the check away.
        if heads != self.num_heads:
            raise ValueError(
                f"{type(self).__name__} records {heads} heads, but num_heads={self.num_heads}: "
                "set num_heads to the number of query heads (q of shape (B, H, N, D))"
            )

    def _track(self, max_logit: torch.Tensor) -> None:
        # In place: the tensor the tracker reads stays the same (no recompilation).
        current = self._attn_logit_max
        current.copy_(torch.maximum(current, max_logit.detach().to(current.dtype)))

    # -- outside forward: per-step max logits ---------------------------------------------
    def track_max_logits(self, holder: Hashable = "default",
                         device: torch.device | str | None = None) -> None:
        """Keep each head's largest logit over every forward from now on, in
        :attr:`tracked_max_logits` (float32, on ``device``: the module's by default), until
        every holder has called :meth:`untrack_max_logits`. Call it before the first
        (compiled) forward: the flag then costs one graph, not a recompilation."""
        if not self.num_heads:
            raise ValueError(f"{type(self).__name__} records no attention heads (num_heads="
                             f"{self.num_heads}): there are no max logits to track")
        if self._attn_logit_max is None:
            if device is None:
                param = next(self.parameters(), None) if hasattr(self, "parameters") else None
                device = param.device if param is not None else "cpu"
            self._attn_logit_max = torch.full((self.num_heads,), -math.inf,
                                              dtype=torch.float32, device=device)
        self.__dict__.setdefault("_attn_tracking_holders", set()).add(holder)
        self._attn_tracking = True

    def untrack_max_logits(self, holder: Hashable = "default") -> None:
        """Release ``holder``'s hold; tracking stops when the last holder releases it."""
        holders = self.__dict__.get("_attn_tracking_holders", set())
        holders.discard(holder)
        if not holders:
            self._attn_tracking = False

    @property
    def tracked_max_logits(self) -> torch.Tensor | None:
        """``(num_heads,)``: each head's largest logit since :meth:`reset_max_logits`
        (``-inf``: no forward yet); ``None`` before :meth:`track_max_logits`."""
        return self._attn_logit_max

    def reset_max_logits(self) -> None:
        """Start a new maximum (a device fill, outside the forward: after each optimizer
        step, say)."""
        if self._attn_logit_max is not None:
            self._attn_logit_max.fill_(-math.inf)

    # -- outside forward: the first query's attention (attention-map images) ------------
    @property
    def captured_query_attention(self) -> torch.Tensor | None:
        """``(B, Nk)``: the first query's attention over the keys, averaged over the heads
        (a ViT's class token over its prefix tokens and patches), from the latest forward
        while capture was held; ``None`` otherwise.
        :func:`~lightning_attn.callbacks.maps.token_map` lays it over the image."""
        return self._attn_captured_query

    def stop_capture(self, holder: Hashable = "default") -> None:
        super().stop_capture(holder)
        if not self._attn_capture:
            self._attn_captured_query = None

    def clear_recording(self) -> None:
        super().clear_recording()
        for key in _TRACKING_STATE:
            self.__dict__.pop(key, None)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in _TRACKING_STATE:
            state.pop(key, None)
        return state


# -- adapters: the attention already in users' models ----------------------------------------


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@dataclass(frozen=True)
class HeadAdapter:
    """How one kind of module exposes its attention heads to the diagnostics.

    Attributes:
        target: ``"package.module:QualName"`` of the class (matched by name along the
            class's bases, so nothing is imported), or a predicate on the class.
        attach: ``attach(module, recorder)`` registers the hooks that feed the recorder's
            :meth:`~HeadRecordingMixin.record_heads` and returns their handles.
        num_heads: the module's query heads (``None``: it has no heads to record).
        masks: the masks it also records (a tuple, or a function of the module).
        applies: a predicate on the module (default: every instance).
        kind: what holds its query and key weights (``"qkv"``: one fused projection,
            ``"in_proj"``: ``nn.MultiheadAttention``'s, ``"separate"``: a projection each,
            ``""``: not known here): what a logit clip rescales.
        needs: what ``applies`` asks of an instance, in words (for the warning about a
            module of the class that it does not apply to).
    """

    target: str | Callable[[type], bool]
    attach: Callable[[nn.Module, HeadRecorder], list]
    num_heads: Callable[[nn.Module], int | None]
    masks: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] = ()
    applies: Callable[[nn.Module], bool] | None = None
    kind: str = ""
    needs: str = ""

    def matches_class(self, cls: type) -> bool:
        if isinstance(self.target, str):
            return any(_class_key(c) == self.target for c in cls.__mro__)
        return bool(self.target(cls))

    def matches(self, module: nn.Module) -> bool:
        return self.matches_class(type(module)) and (
            self.applies is None or bool(self.applies(module)))


class HeadRecorder(HeadRecordingMixin):
    """The head recording of one adapted module, fed by the hooks its adapter attaches.

    Not a module: the adapted module's parameters, outputs and state dict stay its own. A hook
    records only for the module it was attached to (``id`` compared: a deep copy of the model
    carries the hooks but records nothing).
    """

    def __init__(self, module: nn.Module, adapter: HeadAdapter) -> None:
        self._module = weakref.ref(module)
        # The module and its submodules, by id: a hook called on anything else (a deep copy of
        # the model carries the hooks) does nothing.
        self._owned = frozenset(id(m) for m in module.modules())
        self.adapter = adapter
        self.num_heads = adapter.num_heads(module)
        masks = adapter.masks
        self.mask_names = tuple(masks(module) if callable(masks) else masks)
        self._stash: dict[str, Any] = {}
        self._handles = list(adapter.attach(module, self))

    # The adapted module, its parameters and the hooks' removal: as an AdapterRecorder's.
    module = AdapterRecorder.module
    parameters = AdapterRecorder.parameters
    remove_hooks = AdapterRecorder.remove_hooks

    def __repr__(self) -> str:
        return f"HeadRecorder({type(self.module).__name__})"

    def active(self, module: nn.Module) -> bool:
        """Whether a hook called on ``module`` (the adapted module or one of its submodules)
        should do anything now."""
        return ((self._attn_recording or self._attn_tracking or self._attn_capture)
                and id(module) in self._owned and not recomputing())

    def clear_recording(self) -> None:
        super().clear_recording()
        self._stash = {}
        self.remove_hooks()


class _Undo:
    """A handle whose ``remove()`` unregisters a module from the wrappers."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


def _argument(args: tuple, kwargs: Mapping[str, Any], name: str, index: int,
              default: Any = None) -> Any:
    """A forward argument by name or position (``index`` counts from the first after self)."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pre_hook(recorder: HeadRecorder, names: Mapping[str, int]):
    """A forward pre-hook stashing the named forward arguments (name -> position)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if recorder.active(module):
            for name, index in names.items():
                recorder._stash[name] = _argument(args, kwargs, name, index)

    return hook


# timm: Attention, AttentionRope, EvaAttention -- q and k are what q_norm / k_norm return


def _timm_qk_norm(rope: bool, argument_names: tuple[str, ...]):
    """Hooks for timm's attention modules whose forward runs ``q, k = self.q_norm(q),
    self.k_norm(k)`` (an ``nn.Identity`` without qk_norm) and then, with ``rope``, applies the
    rotary embedding to the tokens after the prefix with ``apply_rot_embed_cat``."""
    positions = {name: i for i, name in enumerate(argument_names)}
    wanted = {n: positions[n] for n in ("attn_mask", "is_causal", "rope") if n in positions}

    def attach(module: nn.Module, recorder: HeadRecorder) -> list:
        rotate = getattr(sys.modules[type(module).__module__], "apply_rot_embed_cat", None)

        def on_q(sub: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if recorder.active(sub):
                recorder._stash["q"] = output

        def on_k(sub: nn.Module, inputs: tuple, k: torch.Tensor) -> None:
            if not recorder.active(sub):
                return
            stash, recorder._stash = recorder._stash, {}
            q, embedding = stash.get("q"), stash.get("rope")
            if rope and embedding is not None:
                npt, half = module.num_prefix_tokens, getattr(module, "rotate_half", False)
                q, k = (torch.cat([t[:, :, :npt], rotate(t[:, :, npt:], embedding, half=half)],
                                  dim=2).type_as(t) for t in (q, k))
            recorder.record_heads(q, k, scale=module.scale, mask=stash.get("attn_mask"),
                                  causal=bool(stash.get("is_causal") or False))

        return [
            module.register_forward_pre_hook(_pre_hook(recorder, wanted), with_kwargs=True),
            module.q_norm.register_forward_hook(on_q),
            module.k_norm.register_forward_hook(on_k),
        ]

    return attach


# timm Swin: window attention with relative position bias and the shifted-window mask


def _swin_window(module: nn.Module, recorder: HeadRecorder) -> list:
    """timm's Swin ``WindowAttention``: q and k from ``qkv``'s output, reshaped as its forward
    does; the relative position bias it adds; its shifted-window mask ``(nW, N, N)`` of 0 and
    -100 read as booleans (-100 hides a key of another sub-window: ``exp(-100)`` is 0 to
    1e-43 of the attention)."""

    def on_qkv(sub: nn.Module, inputs: tuple, qkv: torch.Tensor) -> None:
        if not recorder.active(sub):
            return
        stash, recorder._stash = recorder._stash, {}
        windows, n, _ = qkv.shape
        q, k, _ = qkv.reshape(windows, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
        window_mask = stash.get("mask")
        visible = None
        if window_mask is not None:  # window b uses mask b % nW (its view in the forward)
            per_window = window_mask.shape[0]
            visible = (window_mask == 0).repeat(windows // per_window, 1, 1).unsqueeze(1)
        recorder.record_heads(q, k, scale=module.scale, mask=visible,
                              bias=module._get_rel_pos_bias())

    return [module.register_forward_pre_hook(_pre_hook(recorder, {"mask": 0}), with_kwargs=True),
            module.qkv.register_forward_hook(on_qkv)]


# torch.nn.MultiheadAttention: projections recomputed on logging steps, as its forward does


def _mha_queries_keys(m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, key_padding_mask: torch.Tensor | None,
                      attn_mask: torch.Tensor | None):
    """``(q, k, mask)`` of one ``nn.MultiheadAttention`` call: ``(B, H, L, hd)``, ``(B, H, S,
    hd)`` and the additive mask ``(B, H|1, L, S)`` (or ``None``), computed as
    ``F.multi_head_attention_forward`` does (the packed projection of self-attention, the
    separate ones otherwise, ``bias_k``, ``add_zero_attn``; boolean masks: True hides)."""
    if query.dim() == 2:  # unbatched
        query, key, value = (t.unsqueeze(1 - int(m.batch_first)) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    self_attention, shared_kv = query is key and key is value, key is value
    if m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, heads = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        w, b = m.in_proj_weight, m.in_proj_bias
        if self_attention:
            proj = F.linear(query, w, b).unflatten(-1, (3, e))
            q, k = proj[..., 0, :], proj[..., 1, :]
        elif shared_kv:
            w_q, w_kv = w.split([e, 2 * e])
            b_q, b_kv = b.split([e, 2 * e]) if b is not None else (None, None)
            q = F.linear(query, w_q, b_q)
            k = F.linear(key, w_kv, b_kv).unflatten(-1, (2, e))[..., 0, :]
        else:
            w_q, w_k, _ = w.chunk(3)
            b_q, b_k, _ = b.chunk(3) if b is not None else (None, None, None)
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
    else:
        b_q, b_k, _ = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
        q, k = F.linear(query, m.q_proj_weight, b_q), F.linear(key, m.k_proj_weight, b_k)
    length, batch = q.shape[0], q.shape[1]

    def additive(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask, -math.inf)
        return mask.to(q.dtype)

    attn_mask, key_padding_mask = additive(attn_mask), additive(key_padding_mask)
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.repeat(1, batch, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(length, batch, heads, -1).permute(1, 2, 0, 3)
    k = k.reshape(k.shape[0], batch, heads, -1).permute(1, 2, 0, 3)
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, k.shape[-1])], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape(batch, heads, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 \
            else attn_mask
    if key_padding_mask is not None:
        padding = key_padding_mask.reshape(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return q, k, mask


def _padded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A nested batch of sequences ``(B, L_i, E)`` (what the nested-tensor fast path of
    ``nn.TransformerEncoder`` hands its layers) as ``(B, L, E)`` zero-padded, and ``(B, L)``:
    True where a position is padding (no such query or key exists in the model's forward)."""
    parts = x.unbind()
    padded = torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)
    lengths = torch.tensor([p.shape[0] for p in parts], device=padded.device)
    return padded, torch.arange(padded.shape[1], device=padded.device) >= lengths[:, None]


def _multihead(module: nn.Module, recorder: HeadRecorder) -> list:
    """``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer`` /
    ``TransformerDecoderLayer``): a pre-hook reads the call's arguments and recomputes q and
    k on logging steps. Its hook makes ``nn.TransformerEncoderLayer`` take its regular path
    instead of the fused inference fast path (PyTorch skips the fast path for a layer with
    hooks): the same attention, computed by separate kernels. Nested inputs (the nested-tensor
    path of ``nn.TransformerEncoder``) are padded, the padding neither a query nor a key."""

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if not recorder.active(m):
            return
        query, key, value = (_argument(args, kwargs, n, i) for i, n in
                             enumerate(("query", "key", "value")))
        padding = _argument(args, kwargs, "key_padding_mask", 3)
        attn_mask = _argument(args, kwargs, "attn_mask", 5)
        with torch.no_grad():
            if not query.is_nested:
                q, k, mask = _mha_queries_keys(m, query, key, value, padding, attn_mask)
            else:  # the nested path takes neither mask: the lengths are the padding
                same, shared = query is key and key is value, key is value
                query, query_padding = _padded(query)
                key, key_padding = (query, query_padding) if same else _padded(key)
                value = key if shared else _padded(value)[0]
                q, k, _ = _mha_queries_keys(m, query, key, value, None, None)
                mask = (~query_padding)[:, None, :, None] & (~key_padding)[:, None, None, :]
        recorder.record_heads(q, k, mask=mask)

    return [module.register_forward_pre_hook(hook, with_kwargs=True)]


# Any module whose forward calls F.scaled_dot_product_attention (timm's fused paths)


#: The watched modules whose forward is running, innermost last (pushed by a pre-hook on a
#: logging step only): the SDPA calls in that forward are theirs.
_SDPA_CALLERS: list[HeadRecorder] = []
#: The SDPA function the wrapper replaced (while a recorder uses it), and those recorders.
_SDPA_ORIGINAL: list[Callable] = []
_SDPA_USERS: set[int] = set()


def _sdpa_wrapper(original: Callable) -> Callable:
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                     is_causal=False, scale=None, **kwargs):
        if _SDPA_CALLERS and query.dim() == 4:
            _SDPA_CALLERS[-1].record_heads(query, key, scale=scale, mask=attn_mask,
                                           causal=is_causal)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                        is_causal=is_causal, scale=scale, **kwargs)

    scaled_dot_product_attention.__wrapped__ = original
    return scaled_dot_product_attention


def _sdpa_calls(module: nn.Module, recorder: HeadRecorder) -> list:
    """A module whose forward hands its queries and keys to
    ``F.scaled_dot_product_attention`` (timm's fused attention paths): while it runs on a
    logging step, the SDPA calls it makes are recorded with the arguments SDPA gets (queries,
    keys, mask with any bias folded in, causal flag, scale). ``torch.nn.functional``'s SDPA is
    wrapped while any such module is watched."""
    if not _SDPA_ORIGINAL:
        _SDPA_ORIGINAL.append(F.scaled_dot_product_attention)
        F.scaled_dot_product_attention = _sdpa_wrapper(_SDPA_ORIGINAL[0])
    _SDPA_USERS.add(id(recorder))

    def enter(m: nn.Module, args: tuple) -> None:
        if recorder.active(m):
            _SDPA_CALLERS.append(recorder)

    def leave(m: nn.Module, args: tuple, output: Any) -> None:
        if _SDPA_CALLERS and _SDPA_CALLERS[-1] is recorder:
            _SDPA_CALLERS.pop()

    def undo() -> None:
        _SDPA_USERS.discard(id(recorder))
        if not _SDPA_USERS and _SDPA_ORIGINAL:
            F.scaled_dot_product_attention = _SDPA_ORIGINAL.pop()

    return [module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True), _Undo(undo)]


# timm NonLocalAttn: one head over the positions; GlobalContext: a spatial softmax (one query)


def _non_local(module: nn.Module, recorder: HeadRecorder) -> list:
    """timm's ``NonLocalAttn``: ``softmax(t^T p * scale)`` over positions, one head; q and k
    are the outputs of its ``t`` and ``p`` convolutions ``(B, C', H, W)``."""

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
        return x.flatten(2).transpose(1, 2).unsqueeze(1)

    def on_t(sub: nn.Module, inputs: tuple, t: torch.Tensor) -> None:
        if recorder.active(sub):
            recorder._stash["q"] = t

    def on_p(sub: nn.Module, inputs: tuple, p: torch.Tensor) -> None:
        if recorder.active(sub):
            q = recorder._stash.pop("q")
            recorder.record_heads(tokens(q), tokens(p), scale=module.scale)

    return [module.t.register_forward_hook(on_t), module.p.register_forward_hook(on_p)]


def _global_context(module: nn.Module, recorder: HeadRecorder) -> list:
    """timm's ``GlobalContext`` (GCNet): the softmax over positions of ``conv_attn``'s logits
    (one head, one query, the positions as keys) and, with ``fuse_scale``, the channel gate
    ``(B, C, 1, 1)`` of its ``gate`` as the mask ``mask``; recorded as one forward."""
    handles = []

    def on_logits(sub: nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        if recorder.active(sub):
            recorder._stash["logits"] = logits.flatten(1).unsqueeze(1).unsqueeze(1)

    def on_gate(sub: nn.Module, inputs: tuple, gate: torch.Tensor) -> None:
        if recorder.active(sub):
            recorder._stash["mask"] = gate

    def flush(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not recorder.active(m):
            return
        stash, recorder._stash = recorder._stash, {}
        masks = {"mask": stash["mask"]} if "mask" in stash else {}
        if "logits" in stash:
            recorder.record_attention_logits(stash["logits"], masks=masks)
        else:
            recorder.record(masks)

    if module.conv_attn is not None:
        handles.append(module.conv_attn.register_forward_hook(on_logits))
    if module.mlp_scale is not None:
        handles.append(module.gate.register_forward_hook(on_gate))
    handles.append(module.register_forward_hook(flush))
    return handles


# Hugging Face transformers: the attention functions their attention modules call


_HF_IMPLEMENTATIONS = ("sdpa", "eager")
#: id(module) -> its recorders, for the wrappers (several consumers may watch one module).
_HF_RECORDERS: dict[int, tuple[HeadRecorder, ...]] = {}
#: What the wrappers replaced, restored when the last recorder goes: key -> (original, whether
#: it was an override of the registry instance, which then gets it back).
_HF_ORIGINALS: dict[tuple[str, str], tuple[Callable, bool]] = {}


def transformers_attention_implementation(module: nn.Module) -> str | None:
    """The attention implementation a ``transformers`` attention module runs
    (``config._attn_implementation``: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...)."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _class_source(cls: type) -> str:
    # The source of the forward the class runs (its own or inherited), for the registry test.
    for c in cls.__mro__:
        if "forward" in c.__dict__:
            try:
                return inspect.getsource(c.forward)
            except (OSError, TypeError):
                return ""
    return ""


#: A forward that dispatches through the attention-function registry.
_REGISTRY_CALL = re.compile(r"ALL_ATTENTION_FUNCTIONS\s*(\.get_interface\s*\(|\[)")
#: A forward that hands learned sink logits to the attention function (gpt-oss): the softmax
#: then has a column the recorded logits do not hold.
_SINK_LOGITS = re.compile(r"\bs_aux\s*=")


def hands_sink_logits(source: str) -> bool:
    """Whether a ``transformers`` attention forward (its source) hands learned sink logits
    (``s_aux``) to its attention function."""
    return bool(_SINK_LOGITS.search(source))


def dispatches_through_registry(source: str) -> bool:
    """Whether a ``transformers`` attention forward (its source) calls its attention through
    ``ALL_ATTENTION_FUNCTIONS`` with the queries and keys as the softmax sees them (and no
    learned sink logits)."""
    return bool(_REGISTRY_CALL.search(source)) and not hands_sink_logits(source)


@functools.cache
def _registry_class(cls: type) -> bool:
    return cls.__module__.startswith("transformers.") and dispatches_through_registry(
        _class_source(cls))


def _hf_record(recorder: HeadRecorder, implementation: str, module: nn.Module,
               query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
               options: Mapping[str, Any]) -> None:
    # sdpa_attention_forward's reading of its arguments; eager applies the mask it is given.
    causal = False
    if attention_mask is None and implementation == "sdpa":
        flag = options.get("is_causal")
        flag = getattr(module, "is_causal", True) if flag is None else flag
        causal = bool(flag) and query.shape[2] > 1
    recorder.record_heads(
        query, key, scale=options.get("scaling"), mask=attention_mask, causal=causal,
        bias=options.get("position_bias"), softcap=options.get("softcap"),
    )


def _hf_wrapper(implementation: str, original: Callable) -> Callable:
    names = tuple(inspect.signature(original).parameters)[5:]  # after (module, q, k, v, mask)

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        for recorder in _HF_RECORDERS.get(id(module), ()):
            if recorder.active(module):
                options = {**dict(zip(names, args, strict=False)), **kwargs}
                _hf_record(recorder, implementation, module, query, key, attention_mask,
                           options)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__wrapped__ = original
    return attention


def _registry() -> Any:
    # The model holding the module imported transformers: nothing is imported here.
    return sys.modules["transformers.modeling_utils"].ALL_ATTENTION_FUNCTIONS


def _hf_install(implementation: str, module: nn.Module) -> None:
    registry = _registry()
    if implementation == "sdpa":
        key = ("sdpa", "")
        if key not in _HF_ORIGINALS:
            original = registry["sdpa"]
            _HF_ORIGINALS[key] = (original, "sdpa" in registry._local_mapping)
            registry["sdpa"] = _hf_wrapper("sdpa", original)
        return
    modeling = sys.modules[type(module).__module__]
    key = ("eager", modeling.__name__)
    if key not in _HF_ORIGINALS:
        original = modeling.eager_attention_forward
        _HF_ORIGINALS[key] = (original, False)
        modeling.eager_attention_forward = _hf_wrapper("eager", original)


def _hf_uninstall() -> None:
    for (implementation, modeling), (original, overridden) in _HF_ORIGINALS.items():
        if implementation == "eager":
            sys.modules[modeling].eager_attention_forward = original
        elif overridden:
            _registry()["sdpa"] = original
        else:  # ours was the instance's only override: the class-wide function shows again
            del _registry()["sdpa"]
    _HF_ORIGINALS.clear()


def _hf_applies(module: nn.Module) -> bool:
    implementation = transformers_attention_implementation(module)
    if implementation == "eager":
        return hasattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return implementation in _HF_IMPLEMENTATIONS


def _transformers(module: nn.Module, recorder: HeadRecorder) -> list:
    """A ``transformers`` attention module: its attention function is wrapped (``sdpa`` in
    ``ALL_ATTENTION_FUNCTIONS``, ``eager`` in its modeling file) while any module is watched;
    the wrapper records the call's queries, keys (before grouped-query repetition), mask,
    scaling, causal flag, position bias and soft cap, then calls the original."""
    _hf_install(transformers_attention_implementation(module), module)
    key = id(module)
    _HF_RECORDERS[key] = (*_HF_RECORDERS.get(key, ()), recorder)

    def undo() -> None:
        left = tuple(r for r in _HF_RECORDERS.get(key, ()) if r is not recorder)
        if left:
            _HF_RECORDERS[key] = left
        else:
            _HF_RECORDERS.pop(key, None)
        if not _HF_RECORDERS:
            _hf_uninstall()

    return [_Undo(undo)]


def _transformers_heads(module: nn.Module) -> int:
    config = module.config
    return int(getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
               or config.num_attention_heads)


# -- the built-in head adapters ----------------------------------------------------------------

_TIMM = "timm.layers"
_ROPE_ARGUMENTS = ("x", "rope", "attn_mask", "is_causal")
#: timm's attention whose fused path hands SDPA what its softmax sees (queries and keys, the
#: relative position bias folded into the mask): each checked against the oracle on a real
#: model (tests/blocks/test_heads.py).
_SDPA_CLASSES = (
    f"{_TIMM}.attention2d:Attention2d", f"{_TIMM}.attention2d:MultiQueryAttention2d",
    f"{_TIMM}.attention_pool2d:AttentionPool2d", f"{_TIMM}.attention_pool2d:RotAttentionPool2d",
    f"{_TIMM}.attention_pool:AttentionPoolLatent", f"{_TIMM}.attention_pool:AttentionPoolPrr",
    "timm.models.beit:Attention", "timm.models.cait:ClassAttn", "timm.models.cpubone:ConvAttention",
    "timm.models.davit:WindowAttention", "timm.models.fastvit:Attention",
    "timm.models.gemma4_vit:Gemma4Attention", "timm.models.hieradet_sam2:MultiScaleAttention",
    "timm.models.lowformer:ConvAttention", "timm.models.maxxvit:Attention2d",
    "timm.models.maxxvit:AttentionCl", "timm.models.metaformer:Attention",
    "timm.models.nextvit:EfficientAttention", "timm.models.pvt_v2:Attention",
    "timm.models.tiny_vit:Attention", "timm.models.twins:GlobalSubSampleAttn",
    "timm.models.vision_transformer_relpos:RelPosAttention", "timm.models.volo:Attention",
)

#: timm's, PyTorch's and transformers' attention, by class name (nothing is imported).
HEAD_ADAPTERS: tuple[HeadAdapter, ...] = (
    HeadAdapter(f"{_TIMM}.attention:Attention", _timm_qk_norm(False, ("x", "attn_mask",
                                                                      "is_causal")),
                lambda m: m.num_heads, kind="qkv"),
    HeadAdapter(f"{_TIMM}.attention:AttentionRope", _timm_qk_norm(True, _ROPE_ARGUMENTS),
                lambda m: m.num_heads, kind="qkv"),
    HeadAdapter("timm.models.eva:EvaAttention", _timm_qk_norm(True, _ROPE_ARGUMENTS),
                lambda m: m.num_heads, kind="qkv"),
    HeadAdapter("timm.models.swin_transformer:WindowAttention", _swin_window,
                lambda m: m.num_heads, kind="qkv"),
    HeadAdapter(f"{_TIMM}.non_local_attn:NonLocalAttn", _non_local, lambda m: 1),
    HeadAdapter(f"{_TIMM}.global_context:GlobalContext", _global_context,
                lambda m: 1 if m.conv_attn is not None else None,
                masks=lambda m: ("mask",) if m.mlp_scale is not None else (),
                applies=lambda m: m.conv_attn is not None or m.mlp_scale is not None),
    *(HeadAdapter(target, _sdpa_calls, lambda m: m.num_heads,
                  applies=lambda m: bool(getattr(m, "fused_attn", True)),
                  needs="timm's fused attention (fused_attn=True, its default; "
                        "TIMM_FUSED_ATTN=0 turns it off)")
      for target in _SDPA_CLASSES),
    HeadAdapter("torch.nn.modules.activation:MultiheadAttention", _multihead,
                lambda m: m.num_heads, kind="in_proj"),
    HeadAdapter(_registry_class, _transformers, _transformers_heads, applies=_hf_applies,
                kind="separate",
                needs="attn_implementation 'sdpa' or 'eager' (model.set_attn_implementation("
                      "'sdpa'))"),
)


def head_adapter_matching(module: nn.Module,
                          adapters: Iterable[HeadAdapter] = HEAD_ADAPTERS) -> HeadAdapter | None:
    """The first of ``adapters`` that applies to ``module``, else ``None``."""
    return next((a for a in adapters if a.matches(module)), None)

