"""LightningModules and model surgery around the attention blocks.

- :class:`AttentionClassifier`: LightningModule (small CNN + attention after each stage).
- :class:`AttentionCNN`: the same network as a plain ``nn.Module``.
- :func:`insert_attention`: add attention blocks after named submodules of any model,
  keeping its state-dict keys (:func:`remove_attention`, :func:`inserted_attention`).
- :class:`OutputOnly` / :class:`AttentionAfter`: wrappers that keep only ``y``.
- :class:`DSAOptions` / :class:`CoordOptions`: the blocks' constructor arguments as typed
  dataclasses (generated from the constructors) for configs and the CLI.
"""

from .backbone import AttentionCNN, ConvBNAct
from .classifier import AttentionClassifier
from .insert import infer_out_channels, insert_attention, inserted_attention, remove_attention
from .options import CoordOptions, DSAOptions
from .wrappers import AttentionAfter, OutputOnly, first_tensor

__all__ = [
    "AttentionAfter",
    "AttentionCNN",
    "AttentionClassifier",
    "ConvBNAct",
    "CoordOptions",
    "DSAOptions",
    "OutputOnly",
    "first_tensor",
    "infer_out_channels",
    "insert_attention",
    "inserted_attention",
    "remove_attention",
]
