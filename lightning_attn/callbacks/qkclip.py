"""QKClip: Kimi K2's per-head QK-clip, a remedy for growing attention logits.

After each optimizer step, every attention head whose largest logit in that step's forwards
passed the threshold ``tau`` has its query and key weights rescaled, so that those logits
would have been ``tau`` (Kimi K2, "Open Agentic Intelligence", 2025: MuonClip's QK-clip). A
head below ``tau`` is not touched.

How it works, and why it is safe:

- The heads' max logits come from the blocks' own tracking
  (:meth:`~lightning_attn.blocks.HeadRecordingMixin.track_max_logits`): every forward keeps each
  head's largest logit in a device tensor, inside the (compiled) graph, with no softmax and no
  host sync. The flag is set when the fit starts, before the first compiled forward: one graph,
  no recompilation.
- After the step the maxima of every watched module are one vector; under DDP it is
  all-reduced with ``MAX`` (one collective per step), so every process takes the same
  decision and the weights stay identical.
- The rescale (:meth:`~lightning_attn.blocks.projections.QueryKeyProjections.clip_`) is an
  in-place multiply of the parameters, outside the graph, without a host sync: a compiled
  graph sees new values in the same tensors, never a new constant (nothing recompiles). A
  head left alone is multiplied by exactly 1 (bitwise unchanged).
- The optimizer's state (Adam's moments, momentum) is not touched, as in Kimi K2.

Grouped-query attention (a key head shared by several query heads): the query head takes the
whole factor and the shared key is left alone, so each clipped head lands on ``tau`` and no
other head moves (Kimi K2 treats the key components shared between heads the same way).

A module that normalises its queries and keys (timm's ``qk_norm=True``, Qwen3's ``q_norm``)
has bounded logits already and is left out (a rescaling of its weights would change nothing):
QK normalisation is the other remedy for logit growth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ..blocks.discovery import find_attention_blocks
from ..blocks.projections import QueryKeyProjections, query_key_projections
from ..core.problems import HealthThresholds
from ..core.validation import check_patterns, check_positive_float
from ..schedule import LoggingSchedule

__all__ = ["CLIPPED_HEADS_TAG", "QKClip"]

#: Lightning metric: heads clipped at the step (summed over modules; logged every step, written
#: at the Trainer's logging steps).
CLIPPED_HEADS_TAG = "qkclip/clipped_heads"


class QKClip(Callback):
    """Rescale a head's query and key weights after the optimizer step when its max logit passed
    ``threshold`` (Kimi K2's QK-clip).

    For a head ``h`` whose largest logit ``S_h`` (scaled, before the softmax, over the step's
    forwards and every process) is above ``threshold``, ``gamma = threshold / S_h``:
    ``W_q^h`` and its bias are multiplied by ``sqrt(gamma)``, and so are ``W_k^h`` and its
    bias, so the head's ``q . k`` logits are multiplied by ``gamma``; with grouped keys the
    query rows take the whole ``gamma`` and the shared key rows stay.

    Clips timm's ``Attention`` (ViT, DeiT, ...), ``AttentionRope``, ``EvaAttention`` and Swin's
    ``WindowAttention``, ``nn.MultiheadAttention`` (packed ``in_proj`` or separate
    ``q/k_proj_weight``) and Hugging Face attention (``q_proj``/``k_proj``, ``query``/``key``),
    grouped-query included, and a module of your own (:class:`~lightning_attn.blocks.
    HeadRecordingMixin`) with such projections. Others are named in a warning and left out.

    Args:
        threshold: ``tau``, the largest logit a head keeps (``> 0``); default 100, Kimi K2's and
            the diagnostics' ``max_logit_threshold``.
        include, exclude: fnmatch patterns of the attention modules' qualified names (as the
            diagnostics name them, e.g. ``net.blocks.3.attn``).

    Each step costs one max-only pass over every head's logits in the forward, one collective
    under DDP and a few in-place multiplies (docs/performance.md). Logs
    :data:`CLIPPED_HEADS_TAG`. Its state (clips per head, steps) is saved in checkpoints.

    Example::

        Trainer(callbacks=[QKClip(threshold=100.0), AttentionDiagnostics()])
    """

    def __init__(
        self,
        threshold: float = HealthThresholds.max_logit_threshold,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.threshold = check_positive_float("threshold", threshold)
        self.include = check_patterns("include", include, allow_none=True)
        self.exclude = check_patterns("exclude", exclude, allow_none=False) or ()
        #: Optimizer steps clipped (every step after which the callback ran), across resumes.
        self.steps = 0
        self._pending: dict[str, list[int]] = {}  # restored clip counts, until the fit binds
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._blocks: dict[str, tuple[Any, QueryKeyProjections]] = {}
        self._owned: list[Any] = []  # recorders this callback made (their hooks are its own)
        self._counts: torch.Tensor | None = None  # clips per head, all modules, on the device
        self._step_open = False

    # -- what it clips ---------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        """Qualified names of the attention modules clipped (from the fit's start on)."""
        return list(self._blocks) or list(self._pending)

    @property
    def clip_counts(self) -> dict[str, list[int]]:
        """Module -> how many steps each of its heads was clipped at (reads the device)."""
        counts = self._counts.tolist() if self._counts is not None else []
        out, start = {}, 0
        for name, (_, projections) in self._blocks.items():
            out[name] = counts[start:start + projections.num_heads]
            start += projections.num_heads
        return out or {n: list(c) for n, c in self._pending.items()}

    @property
    def state_key(self) -> str:
        # Keyed on the modules it clips, not on its threshold (a resumed run may change it).
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    # -- binding ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the modules to clip and start tracking their max logits: after
        configure_model and the strategy's setup (the modules on their device), before the
        first (compiled) forward (the tracking flag then costs no recompilation)."""
        owner = type(self).__name__
        self._release()
        found, unmatched = find_attention_blocks(pl_module, self.include, self.exclude,
                                                 third_party=True)
        for pattern in unmatched:
            rank_zero_warn(f"{owner}: pattern {pattern!r} matches no attention module")
        refused: dict[str, str] = {}
        for name, block in found.items():
            module = getattr(block, "module", block)
            if module is not block:
                self._owned.append(block)
            if not getattr(block, "num_heads", None):
                continue  # a gate, not attention heads
            try:
                self._blocks[name] = (block, query_key_projections(module, block.num_heads))
            except ValueError as err:
                refused[name] = str(err)
        for block in self._owned:  # hooks of modules it does not clip: removed now
            if not any(block is b for b, _ in self._blocks.values()):
                block.clear_recording()
        self._owned = [b for b, _ in self._blocks.values() if any(b is o for o in self._owned)]
        if refused:
            rank_zero_warn(f"{owner} leaves out " + "; ".join(
                f"{name!r} ({why})" for name, why in refused.items()))
        if not self._blocks:
            self._release()
            raise ValueError(
                f"{owner} found no attention module whose query and key weights it can rescale "
                f"in {type(pl_module).__name__}"
                + (f" matching include={list(self.include)}" if self.include else "")
                + (f" and exclude={list(self.exclude)}" if self.exclude else "")
                + (f" (left out: {'; '.join(f'{n}: {w}' for n, w in refused.items())})"
                   if refused else "")
                + ": QKClip rescales timm, nn.MultiheadAttention and Hugging Face attention")
        device = pl_module.device
        for block, _ in self._blocks.values():
            block.track_max_logits(self, device=device)
        heads = [p.num_heads for _, p in self._blocks.values()]
        self._counts = torch.zeros(sum(heads), dtype=torch.int64, device=device)
        self._restore_counts()

    def _restore_counts(self) -> None:
        if not self._pending or self._counts is None:
            return
        start, kept = 0, []
        for name, (_, projections) in self._blocks.items():
            saved = self._pending.get(name)
            if saved is not None and len(saved) == projections.num_heads:
                self._counts[start:start + len(saved)] = torch.tensor(saved)
                kept.append(name)
            start += projections.num_heads
        dropped = sorted(set(self._pending) - set(kept))
        if dropped:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's clip counts of {dropped} "
                           "match no clipped module of this model (or not its heads): left out")
        self._pending = {}

    # -- every step ------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The first micro-batch of an optimizer step starts a new maximum (what validation,
        # or the previous step, left behind is not this step's).
        if self._blocks and not self._step_open:
            for block, _ in self._blocks.values():
                block.reset_max_logits()
            self._step_open = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._blocks or not LoggingSchedule.steps_optimizer(trainer):
            return  # nothing to clip, or more micro-batches of this step to come
        self._step_open = False
        clipped = self.clip()
        pl_module.log(CLIPPED_HEADS_TAG, clipped, on_step=True, on_epoch=False, batch_size=1)

    @torch.no_grad()
    def clip(self) -> torch.Tensor:
        """Clip every watched head now, from its tracked max logits (all-reduced with ``MAX``
        under DDP): the callback's work after each optimizer step. Returns the number of heads
        clipped, a 0-d tensor on the device (no host sync)."""
        maxima = torch.cat([b.tracked_max_logits for b, _ in self._blocks.values()])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
        start = 0
        for _, projections in self._blocks.values():
            projections.clip_(maxima[start:start + projections.num_heads], self.threshold)
            start += projections.num_heads
        over = maxima > self.threshold
        self._counts += over
        self.steps += 1
        return over.sum(dtype=torch.float32)

    # -- cleanup, checkpointing ------------------------------------------------------------
    def _release(self) -> None:
        for block, _ in self._blocks.values():
            block.untrack_max_logits(self)
        for block in self._owned:
            block.clear_recording()  # the hooks this callback's recorders attached
        self._blocks, self._owned = {}, []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._finish()  # Lightning calls no teardown after an exception

    def _finish(self) -> None:
        # The counts stay readable (and saved by a later checkpoint) once the model is let go.
        self._pending = self.clip_counts if self._blocks else self._pending
        self._release()
        self._counts = None

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "steps": self.steps, "clips": self.clip_counts}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the clip counts and steps; a checkpoint of another threshold is said, and
        this callback's threshold applies from the resumed step."""
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{owner} state must be a mapping, got {type(state_dict).__name__}")
        saved, steps, clips = (state_dict.get(k) for k in ("threshold", "steps", "clips"))
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"{owner} state: steps is {steps!r}, not a count")
        if not isinstance(clips, Mapping) or not all(
                isinstance(c, list) and all(isinstance(v, int) and v >= 0 for v in c)
                for c in clips.values()):
            raise ValueError(f"{owner} state: clips is {clips!r}, not module -> counts per head")
        if not isinstance(saved, (int, float)) or not math.isclose(saved, self.threshold):
            rank_zero_warn(f"{owner}: the checkpoint clipped at threshold={saved!r}; this run "
                           f"clips at {self.threshold:g} from the resumed step")
        self.steps = steps
        self._pending = {str(n): list(c) for n, c in clips.items()}
        self._restore_counts()  # bound already (a strategy that restores after on_fit_start)

    def __getstate__(self) -> dict[str, Any]:
        # Configuration and counts travel (ddp_spawn); modules and device tensors do not.
        state = self.__dict__.copy()
        state["_pending"] = self.clip_counts
        for key in ("_blocks", "_owned", "_counts", "_step_open"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()
