"""Implementations of the blocks' full-size work, selected by the ``backend`` argument.

- :mod:`.torch_fused`: fused autograd functions in plain torch (``backend="torch"``).
- :mod:`.triton_ops`: Triton kernels as ``torch.library`` custom ops (``backend="triton"``),
  imported only when a block asks for them: :mod:`.triton_dsa` and :mod:`.triton_coord`, one
  per block, on :mod:`.triton_common`.
- :mod:`.backend`: the choice (``"auto"`` resolves per device and, on CUDA, per measured
  shape rule).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .backend import (
    BACKENDS,
    Backend,
    backend_from_fused,
    check_triton_input,
    resolve_backend,
    triton_importable,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "backend_from_fused",
    "check_triton_input",
    "load_triton_ops",
    "resolve_backend",
    "triton_importable",
]

_TRITON_OPS: ModuleType | None = None


def load_triton_ops(owner: str = "backend='triton'") -> ModuleType:
    """Import :mod:`.triton_ops` once (it registers the custom ops) and return it.

    Called when a block is built with ``backend="triton"``, so that ``forward`` only reads a
    module attribute (which ``torch.compile`` traces) and never imports.
    """
    global _TRITON_OPS
    if _TRITON_OPS is None:
        if not triton_importable():
            raise ImportError(
                f"{owner} needs the triton package (pip install triton; it ships with CUDA "
                "builds of torch on Linux); use backend='auto' otherwise"
            )
        _TRITON_OPS = importlib.import_module(f"{__name__}.triton_ops")
    return _TRITON_OPS
