"""What the installed environment brings: optional dependencies and known warnings.

Imports nothing but the standard library, so that a command can call it before anything heavy
is imported (the CLI, the demo and the benchmarks do, first thing).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

__all__ = [
    "EXTRAS",
    "KNOWN_WARNINGS",
    "MissingExtraError",
    "ignore_known_warnings",
    "missing_extra",
    "require",
]

#: Optional dependency (import name) -> (distribution, extra of this package that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "report"),
    "sklearn": ("scikit-learn", "data"),
}

#: Warnings third-party packages give in a correct set-up, about their own code, as
#: ``(message regex, category, module regex)``; each filtered exactly (the same package's other
#: warnings still show):
#:
#: * torchvision's Python model code beside a newer torch (what ``scripts/bootstrap.sh``
#:   installs for the tests) cannot load its compiled image codecs and says so on import;
#:   Lightning imports torchvision through torchmetrics' image metrics on every start.
#:   Nothing here uses ``torchvision.io``.
#: * Lightning 2.6 builds ``torch.utils._pytree.LeafSpec``, which torch 2.13 deprecates, on
#:   the first logged value of a fit.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"Failed to load image Python extension", UserWarning, r"torchvision(\.|$)"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     r"lightning\.pytorch\.utilities\._pytree$"),
)


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


def missing_extra(name: str, purpose: str) -> MissingExtraError:
    """The error for optional dependency ``name`` (top-level import name, a key of
    :data:`EXTRAS`) missing: what needs it and the extra that installs it."""
    dist, extra = EXTRAS[name.split(".")[0]]
    return MissingExtraError(
        f"{purpose} needs {dist}, which is not installed: "
        f"pip install 'lightning-attn[{extra}]' (or pip install {dist})"
    )


def require(name: str, purpose: str) -> ModuleType:
    """Import module ``name`` of an optional dependency, or raise :func:`missing_extra`'s
    error."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise missing_extra(name, purpose) from err


def ignore_known_warnings() -> None:
    """Filter exactly the warnings of :data:`KNOWN_WARNINGS`. Call before importing
    Lightning (the first one is given on import)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
