"""torchmetrics ``Metric`` s for attention masks (distributed-correct: sums and counts)."""

from .localisation import LocalisationScore, localisation_ratio

__all__ = ["LocalisationScore", "localisation_ratio"]
