"""Every warning category of lightning-attn, and the error ``on_problem="raise"`` raises.

All categories derive from :class:`AttentionWarning`, so one
``warnings.filterwarnings("ignore", category=AttentionWarning)`` silences them all. Each
problem kind of :mod:`.problems` names its category here; the packages that re-export the
categories take them from :data:`__all__`, which lists every class of this module.
"""

from __future__ import annotations


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
    """A mask, router weight, tracked parameter or its gradient holds NaN or Inf."""


class ParameterDriftWarning(AttentionWarning):
    """A learnable parameter left the range its block declares for it."""


class HeadEntropyCollapseWarning(AttentionWarning):
    """An attention head's normalised entropy fell near 0: its queries attend to one key."""


class LogitGrowthWarning(AttentionWarning):
    """The largest attention logit passed its threshold: the softmax is turning one-hot."""


class UnsupportedAttentionWarning(AttentionWarning):
    """The model holds an attention module the diagnostics cannot measure (named, with why)."""


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


__all__ = sorted(
    name for name, obj in dict(globals()).items()
    if isinstance(obj, type) and obj.__module__ == __name__
)
