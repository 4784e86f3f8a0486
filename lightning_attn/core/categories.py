"""Every warning category of lightning-attn, and the error ``on_problem="raise"`` raises.

All categories derive from :class:`AttentionWarning`, so one
``warnings.filterwarnings("ignore", category=AttentionWarning)`` silences them all. Each
problem kind of :mod:`.problems` names its category here; the packages that re-export the
categories take them from :data:`__all__`, which lists every class of this module.
"""

from __future__ import annotations

from typing import ClassVar


class AttentionWarning(UserWarning):
    """Base category of every warning lightning-attn emits about attention health.

    Each category's docstring says what it means (its first paragraph, in a few words; the
    README's table) and :attr:`remedy` what to try (the warning itself gives the full hint of
    its problem kind).
    """

    remedy: ClassVar[str] = ""


class MaskCollapseWarning(AttentionWarning):
    """A mask is (nearly) constant: it no longer selects."""

    remedy = ("a lower temperature (DSA; a lower `start=` of `TemperatureSchedule`); features "
              "that vary (common at initialisation; warned again only if it returns)")


class MaskSaturationWarning(AttentionWarning):
    """Most mask values are near 0 or 1: the gate passes (almost) no gradient."""

    remedy = ('`TemperatureSchedule(start=4.0, end=1.0)`, `learnable_temperature=True`, '
              '`gate="hardsigmoid"`')


class RouterCollapseWarning(AttentionWarning):
    """Every sample goes (almost) entirely to one branch.

    The router's normalised entropy is near 0."""

    remedy = ('`aux_loss={"balance": 0.01}` or `attention_aux_loss(self, balance=0.01)`, less '
              "weight decay on the router")


class RouterIndifferenceWarning(AttentionWarning):
    """The router weighs all branches (nearly) equally for every input.

    After the warm-up, its normalised entropy stays near 1: it does not route."""

    remedy = "lower router-loss weights, a larger `router_hidden`, a higher router learning rate"


class DeadBranchWarning(AttentionWarning):
    """A branch is (almost) never used.

    Its mean router weight is below ``dead_branch_factor / K``."""

    remedy = '`aux_loss={"balance": 0.01}`, or fewer `kernels` / `use_dilated=False`'


class NonFiniteWarning(AttentionWarning):
    """NaN or Inf in a mask, router weight, tracked parameter or its gradient."""

    remedy = ('gradient clipping, float32, `aux_loss={"z_loss": 1e-3}`; find the first step it '
              "appears")


class ParameterDriftWarning(AttentionWarning):
    """A learnable alpha / beta / temperature left the range its block declares for it.

    Alpha or beta outside ``[0, 1]``: the attention is amplified or inverted; a temperature
    outside its range: the gate turns into a step, or flat."""

    remedy = ('`CoordinateAttention(bounded=True)`, `TemperatureSchedule(handoff="fixed")`, a '
              "fixed value")


class HeadEntropyCollapseWarning(AttentionWarning):
    """An attention head attends to (nearly) one key per query.

    Its normalised entropy fell near 0 (Zhai et al. 2023: entropy collapse comes with
    unstable training); a head that looks at one key by design (a previous-token head) sits
    there too: lower ``head_entropy_threshold`` for such models."""

    remedy = "`qk_norm=True` (timm), `lightning_attn.callbacks.QKClip`, a lower learning rate"


class LogitGrowthWarning(AttentionWarning):
    """An attention logit passed its threshold: the softmax is turning one-hot.

    Growing logits precede the loss spikes of large transformers (Dehghani et al. 2023, the
    reason for QK-norm); Kimi K2's QK-clip caps them at 100."""

    remedy = "`lightning_attn.callbacks.QKClip`, `qk_norm=True` (timm)"


class UnsupportedAttentionWarning(AttentionWarning):
    """The model holds attention the diagnostics cannot measure.

    The warning names each such class and why (docs/coverage.md lists every class)."""

    remedy = ("an adapter of your own (`attention_adapter(...)`), or `exclude=[...]` to say it "
              "is not meant to be watched")


class MissingStatisticsWarning(AttentionWarning):
    """A watched block recorded nothing in a logging step.

    A block compiled and run before the diagnostics attached, or run by
    ``torch.jit``/``torch.export``/ONNX/TensorRT, cannot be seen."""

    remedy = "check that it runs in training, or `exclude=[...]` it"


class DiagnosticsStateWarning(AttentionWarning):
    """A checkpoint held no diagnostics state this callback can use: the run continues under a
    new ``run_id``.

    The state is missing (saved without the callback, or by one with other settings),
    unreadable, or of an earlier release; the warning names the checkpoint and the new run."""

    remedy = ("resume with the same callback settings (the report then joins the runs), or "
              "read on: the curves start again under the new run")


class RecordingContractWarning(AttentionWarning):
    """A block recorded masks outside ``[0, 1]`` or router weights off the simplex.

    Its ``record()`` contract rules them out (negative weights, or rows not summing to 1:
    logits in place of softmax weights); the histograms leave such values out."""

    remedy = "record the gate's output after its sigmoid / softmax"


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
