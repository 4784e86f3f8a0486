"""Triton kernels for the blocks' full-size work, as ``torch.library`` custom ops.

``backend="triton"`` runs these on CUDA tensors (or on CPU tensors under
``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use). Each op lives in the
``lightning_attn::`` namespace with a fake (meta) implementation and an autograd formula, so
that ``torch.compile(block, fullgraph=True)`` traces them as single graph nodes and the
backward kernels appear in the compiled backward graph.

- :mod:`.triton_dsa`: DynamicSpatialAttention (``dsa_summary``, ``dsa_apply``);
- :mod:`.triton_coord`: CoordinateAttention (``coord_pool``, ``coord_scale``);
- :mod:`.triton_common`: what both share (reductions, launch parameters, tuning).

Numerics: every kernel loads its inputs in their own dtype (float32, bfloat16, float16 or
float64) and computes and accumulates in float32 (float64 when an input is float64), rounding
once on store. Output dtypes are those of the plain path under the same autocast:
``dsa_apply`` and ``coord_scale`` return ``torch.promote_types`` of their full-size and map
operands (a float32 ``x`` times a bfloat16 mask is float32), the reductions return
``x.dtype``. NaN propagates as in the seeds: ``torch.max`` returns NaN and the index of the
first NaN channel, and ``amax`` (add-on 1) returns NaN; its gradient, like amax's, splits
evenly among tied maxima (``grad / count * (x == max)``, so a NaN row gets NaN gradients).

Passes over full-size ``(B,C,H,W)`` memory (one pass = reading or writing ``numel``
elements; everything else is on maps ``C`` or ``H*W`` times smaller), as the blocks call the
ops (linked: the backward writes ``grad_x`` once, see :mod:`.triton_dsa`):

================  =======  ========  =====================================================
block             forward  backward  backward detail
================  =======  ========  =====================================================
DSA               3        4         read ``grad_y``, ``x`` (``grad_mask``); read
                                     ``grad_y``, write ``grad_x``
CoordAttention    3        4 (5)     read ``grad_y``, ``x`` (map gradients); read
                                     ``grad_y`` (and ``x`` for the ties of
                                     ``pool="mean_max"``), write ``grad_x``
================  =======  ========  =====================================================

3 + 4 is the floor: the mask depends on a full read of ``x`` before ``y`` can be written,
and the map gradients on a full read of ``grad_y`` and ``x`` before ``grad_x`` can be.
Without ``x.requires_grad`` the backward is 2 passes (``grad_y`` and ``x`` read once).
"""

from __future__ import annotations

from .triton_common import GPU_TILES, INTERPRETER_TILES, TileSizes
from .triton_coord import CoordLink, coord_pool, coord_pool_linked, coord_scale
from .triton_dsa import DsaLink, dsa_apply, dsa_summary, dsa_summary_linked

__all__ = [
    "GPU_TILES",
    "INTERPRETER_TILES",
    "CoordLink",
    "DsaLink",
    "TileSizes",
    "coord_pool",
    "coord_pool_linked",
    "coord_scale",
    "dsa_apply",
    "dsa_summary",
    "dsa_summary_linked",
]
