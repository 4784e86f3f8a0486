"""Every warning category of lightning-attn, and the error ``on_problem="raise"`` raises.

All categories derive from :class:`AttentionWarning`, so one
``warnings.filterwarnings("ignore", category=AttentionWarning)`` silences them all. They live
with the blocks (which import nothing else of the package) so that blocks, callbacks and the
report share them.
"""

from __future__ import annotations

__all__ = [
    "AttentionProblemError",
    "AttentionWarning",
    "DeadBranchWarning",
    "MaskCollapseWarning",
    "MaskSaturationWarning",
    "MissingStatisticsWarning",
    "NonFiniteWarning",
    "ParameterDriftWarning",
    "RouterCollapseWarning",
    "RouterIndifferenceWarning",
]


class AttentionWarning(UserWarning):
    """Base category of every warning lightning-attn emits about attention health."""


class MaskCollapseWarning(AttentionWarning):
    """A mask's spread fell below its threshold: the mask is (nearly) constant."""


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


class ParameterDriftWarning(AttentionWarning):
    """A learnable alpha / beta left ``[0, 1]``, or a learnable temperature left its range."""


class MissingStatisticsWarning(AttentionWarning):
    """A watched block recorded nothing during a logging step."""


class AttentionProblemError(RuntimeError):
    """Raised instead of a warning when the diagnostics run with ``on_problem="raise"``.

    Attributes:
        block: qualified name of the block.
        kind: the problem's kind (``"mask_collapse"``, ``"nonfinite"``, ...).
        step: the step it was found at.
    """

    def __init__(self, message: str, block: str, kind: str, step: int) -> None:
        super().__init__(message)
        self.block = block
        self.kind = kind
        self.step = step

    def __reduce__(self):  # picklable across processes despite the extra arguments
        return (type(self), (self.args[0], self.block, self.kind, self.step))
