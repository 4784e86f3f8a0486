"""lightning-attn: attention blocks for CNNs and Lightning callbacks that diagnose them.

Each public name has one home, in the subpackage that defines it:

- :mod:`lightning_attn.blocks` (pure torch): ``DynamicSpatialAttention``,
  ``CoordinateAttention``, ``create_attention``, ``RecordingMixin``, the adapters for timm's
  and torchvision's attention, the router losses.
- :mod:`lightning_attn.callbacks` (Lightning): ``AttentionDiagnostics``,
  ``TemperatureSchedule`` and the writers.
- :mod:`lightning_attn.core` (no Lightning, mostly no torch): what is measured and judged —
  statistics, ``HealthThresholds``, problem kinds, tags, warning categories.
- :mod:`lightning_attn.modules`, :mod:`lightning_attn.data`, :mod:`lightning_attn.metrics`,
  :mod:`lightning_attn.report` (offline: no Lightning, no torch).

Importing this package imports none of them: ``import lightning_attn.report`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

#: Names this package used to re-export, and their home: asking the package for one is an
#: ``AttributeError`` that names the import to use (not a warning on every access: tools such
#: as jsonargparse probe packages for names, and a correct set-up must start without one).
_MOVED = {
    **dict.fromkeys(
        ("AttentionBlock", "AuxLossWeights", "CoordinateAtt", "CoordinateAttention",
         "DynamicSpatialAttention", "IdentityAttention", "RecordingMixin", "attention_aux_loss",
         "attention_names", "create_attention", "quick_mask_check", "register_attention",
         "register_attention_adapter"),
        "lightning_attn.blocks"),
    **dict.fromkeys(("AttentionWarning", "HealthThresholds", "MaskCollapseWarning",
                     "RecordingConfig"), "lightning_attn.core"),
    "TemperatureSchedule": "lightning_attn.callbacks",
}


def __getattr__(name: str):
    home = _MOVED.get(name)
    where = f": import it from its home, `from {home} import {name}`" if home else ""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}{where}")
