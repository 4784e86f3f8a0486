"""Warning categories and the exception the diagnostics callbacks use for attention problems.

Every category derives from :class:`~lightning_attn.blocks.warnings.AttentionWarning`, so one
``warnings.filterwarnings("ignore", category=AttentionWarning)`` silences them all.
"""

from __future__ import annotations

from ..blocks.warnings import AttentionWarning, MaskCollapseWarning

__all__ = [
    "AttentionProblemError",
    "AttentionWarning",
    "DeadBranchWarning",
    "MaskCollapseWarning",
    "MaskSaturationWarning",
    "NonFiniteWarning",
    "RouterCollapseWarning",
    "RouterIndifferenceWarning",
]


class MaskSaturationWarning(AttentionWarning):
    """Most mask values sit below the low or above the high saturation threshold."""


class RouterCollapseWarning(AttentionWarning):
    """The router's normalised entropy is near 0: one branch takes (almost) all the weight."""


class RouterIndifferenceWarning(AttentionWarning):
    """The router's normalised entropy stays near 1 after warm-up: it does not route."""


class DeadBranchWarning(AttentionWarning):
    """A branch's mean router weight is below ``dead_branch_factor / K``."""


class NonFiniteWarning(AttentionWarning):
    """A mask, router weight or tracked parameter holds NaN or Inf."""


class AttentionProblemError(RuntimeError):
    """Raised instead of a warning when a callback is built with ``on_problem="raise"``.

    Attributes:
        block: qualified name of the block.
        kind: the problem's kind (``"mask_collapse"``, ``"nonfinite"``, ...).
        step: the ``trainer.global_step`` it was found at.
    """

    def __init__(self, message: str, block: str, kind: str, step: int) -> None:
        super().__init__(message)
        self.block = block
        self.kind = kind
        self.step = step

    def __reduce__(self):  # picklable across processes despite the extra arguments
        return (type(self), (self.args[0], self.block, self.kind, self.step))
