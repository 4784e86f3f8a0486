"""Datasets and LightningDataModules of lightning-attn (no downloads: data ships with deps)."""

from lightning_attn.data.cluttered_digits import (
    ClutteredDigitsConfig,
    ClutteredDigitsDataModule,
    ClutteredDigitsDataset,
    load_source_digits,
    split_source_indices,
)

__all__ = [
    "ClutteredDigitsConfig",
    "ClutteredDigitsDataModule",
    "ClutteredDigitsDataset",
    "load_source_digits",
    "split_source_indices",
]
