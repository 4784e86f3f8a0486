"""Cluttered handwritten digits on a large canvas, in the spirit of cluttered-MNIST.

The source is scikit-learn's bundled digits (:func:`sklearn.datasets.load_digits`: 1,797 scanned
8x8 digits, values 0..16), which ships with scikit-learn, so nothing is ever downloaded.

Each sample is one source scan, scaled bilinearly to a random size, pasted at a random position on
an ``S x S`` canvas, plus ``num_clutter`` small crops of *other* scans of the same split (combined
with ``max``) and Gaussian noise, clipped to ``[0, 1]``. The source scans are partitioned into
train / val / test (stratified by class, shuffled with the seed), so no scan appears in two splits,
and clutter for a split is cut only from that split's scans. Every split is pre-rendered in one
vectorised pass from a generator seeded by ``(seed, split)``: identical on every rank and run.

A sample is ``(image, label, box)``: image float32 ``(1, S, S)``, label int64 scalar, box float32
``(4,)`` = ``(x0, y0, x1, y1)`` in pixels (``x1``, ``y1`` exclusive), the tight bounding box of the
pasted digit's non-zero pixels on the canvas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_attn.core.validation import (
    check_bool,
    check_choice,
    check_finite_float,
    check_int,
    check_nonnegative_float,
    check_size_range,
)
from lightning_attn.environment import require

__all__ = [
    "SPLITS",
    "Split",
    "ClutteredDigitsConfig",
    "ClutteredDigitsDataModule",
    "ClutteredDigitsDataset",
    "load_source_digits",
    "split_source_indices",
]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_PARTITION_STREAM = 0  # SeedSequence stream used for the source-scan partition
_NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# argument checks: every error names the argument and the value
# --------------------------------------------------------------------------------------------


def _check_fractions(val_fraction: object, test_fraction: object) -> tuple[float, float]:
    out = []
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        v = check_finite_float(name, value)
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
        out.append(v)
    if out[0] + out[1] >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training scans, got "
            f"val_fraction={val_fraction!r} + test_fraction={test_fraction!r} = {out[0] + out[1]}"
        )
    return out[0], out[1]


@dataclass(frozen=True)
class ClutteredDigitsConfig:
    """How one cluttered sample is rendered; validated (and normalised) on construction.

    Args:
        canvas_size: side ``S`` of the square canvas, ``>= 8``.
        digit_size: ``(min, max)`` side in pixels of the scaled source digit (or one int);
            ``4 <= min <= max <= canvas_size``.
        num_clutter: clutter fragments per sample, ``>= 0``.
        clutter_size: ``(min, max)`` side in pixels of a square clutter crop (or one int);
            ``1 <= min <= max <= digit_size[0]`` (a crop is cut from a scaled digit).
        noise_std: std of the additive Gaussian noise, finite and ``>= 0``.
    """

    canvas_size: int = 64
    digit_size: tuple[int, int] = (16, 28)
    num_clutter: int = 6
    clutter_size: tuple[int, int] = (4, 6)
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        canvas = check_int("canvas_size", self.canvas_size, 8)
        digit = check_size_range("digit_size", self.digit_size, 4)
        if digit[1] > canvas:
            raise ValueError(
                f"canvas_size={canvas} is smaller than the largest digit size {digit[1]} "
                f"(digit_size={self.digit_size!r})"
            )
        clutter_n = check_int("num_clutter", self.num_clutter, 0)
        clutter = check_size_range("clutter_size", self.clutter_size, 1)
        if clutter[1] > digit[0]:
            raise ValueError(
                f"clutter_size={self.clutter_size!r}: the largest clutter crop {clutter[1]} "
                f"exceeds the smallest digit size {digit[0]} it is cut from"
            )
        noise = check_nonnegative_float("noise_std", self.noise_std)
        object.__setattr__(self, "canvas_size", canvas)
        object.__setattr__(self, "digit_size", digit)
        object.__setattr__(self, "num_clutter", clutter_n)
        object.__setattr__(self, "clutter_size", clutter)
        object.__setattr__(self, "noise_std", noise)


# --------------------------------------------------------------------------------------------
# source scans and their partition
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _load_source_digits_cached() -> tuple[Tensor, Tensor]:
    datasets = require("sklearn.datasets", "ClutteredDigitsDataModule (its source digits)")
    digits = datasets.load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def load_source_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 sklearn scans: images float32 ``(1797, 8, 8)`` in ``[0, 1]``, labels int64
    ``(1797,)``. Loaded once per process (no download); returns fresh copies."""
    images, labels = _load_source_digits_cached()
    return images.clone(), labels.clone()


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator whose state is a well-mixed function of ``(seed, stream)``."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def split_source_indices(
    val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, Tensor]:
    """Partition the source scans into disjoint ``train`` / ``val`` / ``test`` index sets.

    Stratified by class: of each class's scans (shuffled with ``seed``), ``floor(fraction * n)``
    (at least 1) go to val and to test, the rest to train. Returns sorted int64 index tensors.
    """
    val_fraction, test_fraction = _check_fractions(val_fraction, test_fraction)
    seed = check_int("seed", seed, 0)
    _, labels = _load_source_digits_cached()
    g = _generator(seed, _PARTITION_STREAM)
    parts: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    for cls in range(_NUM_CLASSES):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n = idx.numel()
        n_val = max(1, int(math.floor(val_fraction * n)))
        n_test = max(1, int(math.floor(test_fraction * n)))
        if n - n_val - n_test < 1:
            raise ValueError(
                f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r} leave no "
                f"training scans for class {cls} ({n} scans)"
            )
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {s: torch.cat(p).sort().values for s, p in parts.items()}


# --------------------------------------------------------------------------------------------
# vectorised renderer
# --------------------------------------------------------------------------------------------


def _uniform_int(g: torch.Generator, high: Tensor) -> Tensor:
    """One integer in ``[0, high)`` per element of ``high`` (int64 tensor, all ``>= 1``)."""
    u = torch.rand(high.shape, generator=g, dtype=torch.float64)
    return torch.minimum((u * high).floor().long(), high - 1)


def _scale(digits: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``(n, 8, 8)`` digits to ``(n, size, size)``."""
    out = F.interpolate(digits[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return out[:, 0].clamp_(0.0, 1.0)


def _render(
    images: Tensor,
    labels: Tensor,
    source_indices: Tensor,
    num_samples: int,
    config: ClutteredDigitsConfig,
    g: torch.Generator,
) -> dict[str, Tensor]:
    """Render ``num_samples`` cluttered samples from the scans ``source_indices``.

    Returns ``images`` ``(N, 1, S, S)``, ``labels`` ``(N,)``, ``boxes`` ``(N, 4)`` (tight ink box),
    ``placements`` ``(N, 4)`` (the pasted square), ``digit_sources`` ``(N,)`` and
    ``clutter_sources`` ``(N, K)`` (scan indices into the sklearn digits).
    """
    n, s_canvas, k = num_samples, config.canvas_size, config.num_clutter
    m = source_indices.numel()
    dmin, dmax = config.digit_size
    cmin, cmax = config.clutter_size

    # -- all random draws up front, in a fixed order ---------------------------------------
    main_local = torch.randint(0, m, (n,), generator=g)
    size = torch.randint(dmin, dmax + 1, (n,), generator=g)
    y = _uniform_int(g, s_canvas - size + 1)
    x = _uniform_int(g, s_canvas - size + 1)
    # clutter: an offset in [1, m) guarantees a scan other than the sample's own digit
    c_local = (main_local[:, None] + torch.randint(1, m, (n, k), generator=g)) % m
    c_scale = torch.randint(dmin, dmax + 1, (n, k), generator=g)
    c_size = torch.randint(cmin, cmax + 1, (n, k), generator=g)
    c_v = _uniform_int(g, c_scale - c_size + 1)
    c_u = _uniform_int(g, c_scale - c_size + 1)
    c_y = _uniform_int(g, s_canvas - c_size + 1)
    c_x = _uniform_int(g, s_canvas - c_size + 1)
    noise = torch.randn((n, 1, s_canvas, s_canvas), generator=g) if config.noise_std > 0 else None

    digit_sources = source_indices[main_local]
    clutter_sources = source_indices[c_local]
    canvas = torch.zeros(n * s_canvas * s_canvas)
    boxes = torch.empty(n, 4)
    sample = torch.arange(n)

    # -- the digit: one bilinear resize per distinct size ----------------------------------
    for s in size.unique().tolist():
        sel = (size == s).nonzero().flatten()
        d = _scale(images[digit_sources[sel]], s)  # (n_s, s, s)
        ar = torch.arange(s)
        rows = y[sel, None, None] + ar[None, :, None]
        cols = x[sel, None, None] + ar[None, None, :]
        flat = sel[:, None, None] * s_canvas * s_canvas + rows * s_canvas + cols
        canvas[flat.reshape(-1)] = d.reshape(-1)
        ink = d > 0
        ink_r, ink_c = ink.any(2).to(torch.uint8), ink.any(1).to(torch.uint8)
        y0 = ink_r.argmax(1)
        y1 = s - ink_r.flip(1).argmax(1)
        x0 = ink_c.argmax(1)
        x1 = s - ink_c.flip(1).argmax(1)
        empty = ~ink.flatten(1).any(1)  # never for sklearn digits; fall back to the square
        y0[empty], x0[empty], y1[empty], x1[empty] = 0, 0, s, s
        boxes[sel] = torch.stack([x[sel] + x0, y[sel] + y0, x[sel] + x1, y[sel] + y1], 1).float()

    # -- clutter: crops of other scaled scans, combined with max ---------------------------
    if k > 0:
        f_sample = sample[:, None].expand(n, k).reshape(-1)
        f_src, f_scale, f_size, f_v, f_u, f_y, f_x = (
            t.reshape(-1) for t in (clutter_sources, c_scale, c_size, c_v, c_u, c_y, c_x)
        )
        ar = torch.arange(cmax)
        for s in f_scale.unique().tolist():
            sel = (f_scale == s).nonzero().flatten()
            d = _scale(images[f_src[sel]], s)  # (n_s, s, s)
            # a cmax x cmax window at (v, u); entries beyond the crop size are masked to 0
            r = (f_v[sel, None] + ar).clamp_(max=s - 1)
            c = (f_u[sel, None] + ar).clamp_(max=s - 1)
            crop = d[torch.arange(sel.numel())[:, None, None], r[:, :, None], c[:, None, :]]
            inside = ar[None, :] < f_size[sel, None]  # (n_s, cmax)
            crop = crop * (inside[:, :, None] & inside[:, None, :])
            rows = (f_y[sel, None] + ar).clamp_(max=s_canvas - 1)
            cols = (f_x[sel, None] + ar).clamp_(max=s_canvas - 1)
            flat = (
                f_sample[sel, None, None] * s_canvas * s_canvas
                + rows[:, :, None] * s_canvas
                + cols[:, None, :]
            )
            # masked entries carry 0 and the canvas is >= 0, so amax leaves their target alone
            canvas.scatter_reduce_(0, flat.reshape(-1), crop.reshape(-1), reduce="amax")

    out = canvas.view(n, 1, s_canvas, s_canvas)
    if noise is not None:
        out.add_(noise.mul_(config.noise_std)).clamp_(0.0, 1.0)
    placements = torch.stack([x, y, x + size, y + size], 1).float()
    return {
        "images": out.contiguous(),
        "labels": labels[digit_sources].clone(),
        "boxes": boxes,
        "placements": placements,
        "digit_sources": digit_sources,
        "clutter_sources": clutter_sources,
    }


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class ClutteredDigitsDataset(Dataset):
    """Pre-rendered cluttered digits drawn from a given set of source scans.

    Args:
        source_indices: indices (into the 1,797 sklearn scans) this split may use, for the digit
            and for clutter; at least 2 distinct scans.
        num_samples: number of samples ``N`` to render, ``>= 1``.
        config: rendering settings (default :class:`ClutteredDigitsConfig`).
        seed: base seed, ``>= 0``; with ``split`` it fixes every sample.
        split: one of ``"train"``, ``"val"``, ``"test"`` (selects the random stream).

    Attributes:
        source_indices: int64 ``(M,)`` sorted scan indices of this split.
        images: float32 ``(N, 1, S, S)`` in ``[0, 1]``.
        labels: int64 ``(N,)``.
        boxes: float32 ``(N, 4)`` tight ``(x0, y0, x1, y1)`` box of the digit's non-zero pixels.
        placements: float32 ``(N, 4)`` the full square the scaled digit was pasted into.
        digit_sources: int64 ``(N,)`` scan index of each sample's digit.
        clutter_sources: int64 ``(N, num_clutter)`` scan indices the clutter was cut from.
    """

    def __init__(
        self,
        source_indices: Sequence[int] | Tensor,
        num_samples: int,
        config: ClutteredDigitsConfig | None = None,
        seed: int = 0,
        split: Split = "train",
    ) -> None:
        num_samples = check_int("num_samples", num_samples, 1)
        seed = check_int("seed", seed, 0)
        split = check_choice("split", split, SPLITS)
        if config is None:
            config = ClutteredDigitsConfig()
        elif not isinstance(config, ClutteredDigitsConfig):
            raise TypeError(f"config must be a ClutteredDigitsConfig, got {type(config).__name__}")
        images, labels = _load_source_digits_cached()
        idx = torch.as_tensor(source_indices)
        if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(
                f"source_indices must be a 1-D sequence of ints, got dtype {idx.dtype} "
                f"and shape {tuple(idx.shape)}"
            )
        idx = idx.long().unique()  # sorted, deduplicated
        if idx.numel() < 2:
            raise ValueError(
                f"source_indices needs at least 2 distinct scans (clutter comes from other "
                f"scans), got {idx.numel()}"
            )
        if idx.min() < 0 or idx.max() >= labels.numel():
            raise ValueError(
                f"source_indices must lie in [0, {labels.numel()}), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        self.config = config
        self.seed = seed
        self.split = split
        self.source_indices = idx
        r = _render(images, labels, idx, num_samples, config, _generator(seed, _SPLIT_IDS[split]))
        self.images: Tensor = r["images"]
        self.labels: Tensor = r["labels"]
        self.boxes: Tensor = r["boxes"]
        self.placements: Tensor = r["placements"]
        self.digit_sources: Tensor = r["digit_sources"]
        self.clutter_sources: Tensor = r["clutter_sources"]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(image (1, S, S) float32, label () int64, box (4,) float32)``."""
        return self.images[index], self.labels[index], self.boxes[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={len(self)}, "
            f"num_sources={self.source_indices.numel()}, seed={self.seed}, config={self.config})"
        )


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class ClutteredDigitsDataModule(pl.LightningDataModule):
    """Cluttered sklearn digits with digit boxes, split by source scan; DDP-ready.

    Batches are ``(images (B, 1, S, S) float32, labels (B,) int64, boxes (B, 4) float32)``.
    Every split is rendered deterministically from ``seed`` in :meth:`setup` (identically on every
    rank, so nothing is rank-zero-only). Plain DataLoaders: Lightning injects the
    ``DistributedSampler`` under DDP; only the train loader shuffles.

    Args:
        canvas_size: side ``S`` of the canvas, ``>= 8``.
        digit_size: ``(min, max)`` side of the scaled digit in pixels (or one int).
        num_clutter: clutter fragments per sample, ``>= 0``.
        clutter_size: ``(min, max)`` side of a square clutter crop (or one int).
        noise_std: std of the additive Gaussian noise, ``>= 0``.
        num_train: rendered training samples, ``>= 1``.
        num_val: rendered validation samples, ``>= 1``.
        num_test: rendered test samples (also used by ``predict``), ``>= 1``.
        val_fraction: fraction of each class's source scans held out for validation, in (0, 1).
        test_fraction: fraction held out for test, in (0, 1); ``val + test < 1``.
        batch_size: per-process batch size, ``>= 1``.
        num_workers: DataLoader workers, ``>= 0`` (persistent when ``> 0``).
        pin_memory: passed to the DataLoaders.
        seed: seed of the scan partition and of every rendered sample, ``>= 0``.
    """

    def __init__(
        self,
        canvas_size: int = 64,
        digit_size: int | tuple[int, int] = (16, 28),
        num_clutter: int = 6,
        clutter_size: int | tuple[int, int] = (4, 6),
        noise_std: float = 0.05,
        num_train: int = 5000,
        num_val: int = 1000,
        num_test: int = 1000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = ClutteredDigitsConfig(
            canvas_size=canvas_size,
            digit_size=digit_size,
            num_clutter=num_clutter,
            clutter_size=clutter_size,
            noise_std=noise_std,
        )
        self.num_samples = {
            "train": check_int("num_train", num_train, 1),
            "val": check_int("num_val", num_val, 1),
            "test": check_int("num_test", num_test, 1),
        }
        self.val_fraction, self.test_fraction = _check_fractions(val_fraction, test_fraction)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.pin_memory = check_bool("pin_memory", pin_memory)
        self.seed = check_int("seed", seed, 0)
        self.save_hyperparameters()
        # cheap (cached sklearn load + per-class shuffle); fails here if a class has no train scan
        self._source_splits = split_source_indices(self.val_fraction, self.test_fraction, self.seed)
        self._datasets: dict[str, ClutteredDigitsDataset] = {}

    # -- info ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of digit classes (10)."""
        return _NUM_CLASSES

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(1, S, S)`` of one image."""
        return (1, self.config.canvas_size, self.config.canvas_size)

    @property
    def source_splits(self) -> dict[str, Tensor]:
        """Disjoint sorted scan indices per split (``train`` / ``val`` / ``test``)."""
        return self._source_splits

    def dataset(self, split: Split) -> ClutteredDigitsDataset:
        """The rendered dataset of ``split`` (rendered on first use, then cached)."""
        split = check_choice("split", split, SPLITS)
        if split not in self._datasets:
            self._datasets[split] = ClutteredDigitsDataset(
                self.source_splits[split],
                self.num_samples[split],
                config=self.config,
                seed=self.seed,
                split=split,
            )
        return self._datasets[split]

    # -- Lightning hooks -------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to do: the digits ship with scikit-learn (no download, no rank-zero work)."""

    def setup(self, stage: str | None = None) -> None:
        """Render the splits ``stage`` needs (``fit``: train + val; ``validate``: val;
        ``test`` / ``predict``: test; ``None``: all). Idempotent."""
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
            None: SPLITS,
        }
        if stage not in needed:
            raise ValueError(f"stage must be one of {list(needed)}, got {stage!r}")
        for split in needed[stage]:
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, unshuffled."""
        return self._loader("test", shuffle=False)
