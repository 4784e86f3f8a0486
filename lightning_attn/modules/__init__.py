"""LightningModules and model surgery around the attention blocks.

- :class:`AttentionClassifier`: LightningModule (small CNN + attention after each stage).
- :class:`AttentionCNN`: the same network as a plain ``nn.Module``.
- :func:`insert_attention`: add attention blocks after named submodules of any model.
- :class:`OutputOnly` / :class:`AttentionAfter`: wrappers that keep only ``y``.
"""

from .backbone import AttentionCNN, ConvBNAct
from .classifier import AttentionClassifier
from .insert import infer_out_channels, insert_attention
from .wrappers import AttentionAfter, OutputOnly, first_tensor

__all__ = [
    "AttentionAfter",
    "AttentionCNN",
    "AttentionClassifier",
    "ConvBNAct",
    "OutputOnly",
    "first_tensor",
    "infer_out_channels",
    "insert_attention",
]
