"""Tests of the cluttered sklearn-digits Dataset / LightningDataModule (small and fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from lightning_attn.data import (
    ClutteredDigitsConfig,
    ClutteredDigitsDataModule,
    ClutteredDigitsDataset,
    load_source_digits,
    split_source_indices,
)

SMALL = {"num_train": 64, "num_val": 32, "num_test": 48, "batch_size": 16}


def make_dm(**kwargs: object) -> ClutteredDigitsDataModule:
    return ClutteredDigitsDataModule(**{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def dm() -> ClutteredDigitsDataModule:
    m = make_dm(seed=3)
    m.setup()
    return m


@pytest.fixture(scope="module")
def clean() -> ClutteredDigitsDataset:
    """Only the digit: no clutter, no noise."""
    m = make_dm(num_clutter=0, noise_std=0.0, num_train=128, seed=5)
    m.setup("fit")
    return m.dataset("train")


# -- source data and partition ---------------------------------------------------------------


def test_source_digits_match_sklearn() -> None:
    images, labels = load_source_digits()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.from_numpy(ref.target).long())
    torch.testing.assert_close(images * 16, torch.from_numpy(ref.images).float())


def test_splits_are_disjoint_and_cover_every_scan(dm: ClutteredDigitsDataModule) -> None:
    sets = {s: set(dm.dataset(s).source_indices.tolist()) for s in ("train", "val", "test")}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert len(sets["train"] | sets["val"] | sets["test"]) == 1797
    # the dataset's source set is exactly the module's partition
    for s, idx in dm.source_splits.items():
        assert torch.equal(dm.dataset(s).source_indices, idx)


def test_split_sizes_follow_fractions_and_are_stratified() -> None:
    parts = split_source_indices(val_fraction=0.1, test_fraction=0.25, seed=0)
    _, labels = load_source_digits()
    assert abs(parts["val"].numel() - 0.1 * 1797) <= 10
    assert abs(parts["test"].numel() - 0.25 * 1797) <= 10
    for s in ("train", "val", "test"):
        assert set(labels[parts[s]].tolist()) == set(range(10)), s
    # shuffled with the seed: another seed gives another partition
    other = split_source_indices(val_fraction=0.1, test_fraction=0.25, seed=1)
    assert not torch.equal(parts["val"], other["val"])


def test_samples_and_clutter_come_only_from_their_split(dm: ClutteredDigitsDataModule) -> None:
    for s in ("train", "val", "test"):
        ds = dm.dataset(s)
        allowed = set(ds.source_indices.tolist())
        assert set(ds.digit_sources.tolist()) <= allowed
        assert ds.clutter_sources.shape == (len(ds), 6)
        assert set(ds.clutter_sources.flatten().tolist()) <= allowed
        # clutter is cut from scans other than the sample's own digit
        assert (ds.clutter_sources != ds.digit_sources[:, None]).all()


def test_clutter_is_never_cut_from_the_samples_own_scan() -> None:
    # with two scans, every fragment must come from the other one
    ds = ClutteredDigitsDataset([10, 20], 64, config=ClutteredDigitsConfig(num_clutter=6))
    assert set(ds.digit_sources.tolist()) == {10, 20}
    assert torch.equal(ds.clutter_sources, (30 - ds.digit_sources)[:, None].expand(64, 6))


# -- determinism -----------------------------------------------------------------------------


def _tensors(m: ClutteredDigitsDataModule) -> list[torch.Tensor]:
    m.setup()
    out = []
    for s in ("train", "val", "test"):
        ds = m.dataset(s)
        out += [ds.images, ds.labels, ds.boxes, ds.source_indices]
    return out


def test_same_seed_gives_identical_tensors() -> None:
    a, b = _tensors(make_dm(seed=11)), _tensors(make_dm(seed=11))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_different_seed_gives_different_tensors() -> None:
    a, b = _tensors(make_dm(seed=11)), _tensors(make_dm(seed=12))
    for i in range(3):  # images of each split
        assert not torch.equal(a[4 * i], b[4 * i])
    assert not torch.equal(a[2], b[2])  # boxes
    assert not torch.equal(a[3], b[3])  # partition


def test_splits_use_different_streams_and_setup_order_is_irrelevant() -> None:
    m1 = make_dm(seed=2, num_train=32, num_val=32, num_test=32)
    m1.setup("test")  # test alone, first
    m2 = make_dm(seed=2, num_train=32, num_val=32, num_test=32)
    m2.setup()
    assert torch.equal(m1.dataset("test").images, m2.dataset("test").images)
    # same scans, same seed: the split name alone selects another random stream
    idx = split_source_indices()["train"]
    a = ClutteredDigitsDataset(idx, 16, seed=2, split="train")
    b = ClutteredDigitsDataset(idx, 16, seed=2, split="val")
    c = ClutteredDigitsDataset(idx, 16, seed=2, split="val")
    assert torch.equal(b.images, c.images)
    assert not torch.equal(a.images, b.images)
    assert not torch.equal(a.digit_sources, b.digit_sources)


# -- sample content --------------------------------------------------------------------------


def test_shapes_dtypes_and_value_range(dm: ClutteredDigitsDataModule) -> None:
    for s, n in (("train", 64), ("val", 32), ("test", 48)):
        ds = dm.dataset(s)
        assert len(ds) == n
        image, label, box = ds[0]
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32
        assert label.shape == () and label.dtype == torch.int64
        assert box.shape == (4,) and box.dtype == torch.float32
        assert ds.images.min() >= 0 and ds.images.max() <= 1
        assert torch.isfinite(ds.images).all()
    assert dm.num_classes == 10
    assert dm.image_shape == (1, 64, 64)
    assert make_dm(canvas_size=40).image_shape == (1, 40, 40)


def test_labels_match_source_labels(dm: ClutteredDigitsDataModule) -> None:
    _, labels = load_source_digits()
    for s in ("train", "val", "test"):
        ds = dm.dataset(s)
        assert torch.equal(ds.labels, labels[ds.digit_sources])
        assert all(int(ds[i][1]) == int(labels[ds.digit_sources[i]]) for i in range(len(ds)))
    assert set(dm.dataset("train").labels.tolist()) == set(range(10))


def test_pasted_digit_is_the_scaled_source_scan(clean: ClutteredDigitsDataset) -> None:
    images, _ = load_source_digits()
    sizes = set()
    for i in range(len(clean)):
        x0, y0, x1, y1 = (int(v) for v in clean.placements[i])
        s = x1 - x0
        assert y1 - y0 == s and 16 <= s <= 28
        sizes.add(s)
        src = images[clean.digit_sources[i]][None, None]
        ref = F.interpolate(src, size=(s, s), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(clean.images[i][:, y0:y1, x0:x1], ref.clamp(0, 1))
        # nothing else on a clutter-free, noise-free canvas
        rest = clean.images[i].clone()
        rest[:, y0:y1, x0:x1] = 0
        assert rest.max() == 0
    assert len(sizes) > 5  # sizes are random over the range


def test_boxes_contain_all_digit_pixels_and_are_tight(clean: ClutteredDigitsDataset) -> None:
    for i in range(len(clean)):
        img = clean.images[i, 0]
        x0, y0, x1, y1 = (int(v) for v in clean.boxes[i])
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        px0, py0, px1, py1 = (int(v) for v in clean.placements[i])
        assert px0 <= x0 and py0 <= y0 and x1 <= px1 and y1 <= py1
        ys, xs = (img > 0).nonzero(as_tuple=True)
        assert ys.numel() > 0
        # every non-zero pixel lies inside the box (x1, y1 exclusive) ...
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        # ... and the box is tight: ink touches each of its four edges
        assert int(xs.min()) == x0 and int(xs.max()) == x1 - 1
        assert int(ys.min()) == y0 and int(ys.max()) == y1 - 1


def test_positions_vary_over_the_canvas(clean: ClutteredDigitsDataset) -> None:
    p = clean.placements
    assert p[:, 0].unique().numel() > 10 and p[:, 1].unique().numel() > 10
    assert p.min() >= 0 and p[:, 2:].max() <= 64


def test_clutter_and_noise_are_added() -> None:
    m = make_dm(noise_std=0.0, num_clutter=8, seed=4)
    m.setup("fit")
    ds = m.dataset("train")
    outside = ds.images.clone()
    for i in range(len(ds)):
        x0, y0, x1, y1 = (int(v) for v in ds.placements[i])
        outside[i, :, y0:y1, x0:x1] = 0
    has_clutter = (outside.flatten(1) > 0).any(1)
    assert has_clutter.float().mean() > 0.8  # most canvases show clutter off the digit
    # clutter pieces are small: none of them is a whole digit
    assert (outside.flatten(1) > 0).sum(1).max() <= 8 * 6 * 6

    noisy = make_dm(noise_std=0.2, num_clutter=0, seed=4)
    noisy.setup("fit")
    nds = noisy.dataset("train")
    bg = nds.images.clone()
    for i in range(len(nds)):
        x0, y0, x1, y1 = (int(v) for v in nds.placements[i])
        bg[i, :, y0:y1, x0:x1] = float("nan")
    bg = bg[~bg.isnan()]
    # background is clip(N(0, 0.2), 0, 1): about half the pixels positive, mean 0.2/sqrt(2 pi)
    assert 0.4 < (bg > 0).float().mean() < 0.6
    assert abs(bg.mean().item() - 0.2 / math.sqrt(2 * math.pi)) < 0.01


def test_config_sizes_are_respected() -> None:
    m = make_dm(canvas_size=32, digit_size=(8, 10), clutter_size=3, num_clutter=2, seed=1)
    m.setup("fit")
    ds = m.dataset("train")
    assert ds.images.shape == (64, 1, 32, 32)
    side = ds.placements[:, 2] - ds.placements[:, 0]
    assert side.min() >= 8 and side.max() <= 10
    assert ds.placements[:, 2:].max() <= 32
    assert m.config == ClutteredDigitsConfig(32, (8, 10), 2, (3, 3), 0.05)


# -- DataLoaders -----------------------------------------------------------------------------


def test_dataloader_batches(dm: ClutteredDigitsDataModule) -> None:
    loaders = {
        "train": dm.train_dataloader(),
        "val": dm.val_dataloader(),
        "test": dm.test_dataloader(),
        "predict": dm.predict_dataloader(),
    }
    for name, loader in loaders.items():
        assert isinstance(loader, DataLoader)
        assert loader.num_workers == 0 and not loader.persistent_workers
        images, labels, boxes = next(iter(loader))
        assert images.shape == (16, 1, 64, 64) and images.dtype == torch.float32, name
        assert labels.shape == (16,) and labels.dtype == torch.int64, name
        assert boxes.shape == (16, 4) and boxes.dtype == torch.float32, name
    # only train shuffles; predict serves the test split in order
    assert isinstance(loaders["train"].sampler, torch.utils.data.RandomSampler)
    for name in ("val", "test", "predict"):
        assert isinstance(loaders[name].sampler, torch.utils.data.SequentialSampler), name
    assert loaders["predict"].dataset is dm.dataset("test")
    images, _, _ = next(iter(loaders["predict"]))
    assert torch.equal(images, dm.dataset("test").images[:16])


def test_workers_make_loaders_persistent() -> None:
    m = make_dm(num_workers=2)
    m.setup("fit")
    loader = m.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers


def test_hyperparameters_are_saved() -> None:
    m = make_dm(canvas_size=48, digit_size=(10, 20), noise_std=0.1, seed=9)
    hp = m.hparams
    assert hp["canvas_size"] == 48 and tuple(hp["digit_size"]) == (10, 20)
    assert hp["noise_std"] == 0.1 and hp["seed"] == 9 and hp["num_train"] == 64
    assert {"num_clutter", "clutter_size", "val_fraction", "test_fraction", "num_workers"} <= set(
        hp
    )


def test_setup_is_idempotent_and_rejects_unknown_stage(dm: ClutteredDigitsDataModule) -> None:
    before = dm.dataset("train")
    dm.setup("fit")
    assert dm.dataset("train") is before
    with pytest.raises(ValueError, match="stage"):
        dm.setup("training")


# -- argument validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canvas_size": 4}, r"canvas_size must be >= 8, got 4"),
        ({"canvas_size": 32, "digit_size": (16, 40)}, r"canvas_size=32 is smaller.*40"),
        ({"digit_size": (20, 16)}, r"digit_size minimum 20 is larger than its maximum 16"),
        ({"digit_size": (3, 16)}, r"digit_size minimum must be >= 4.*\(3, 16\)"),
        ({"digit_size": 2}, r"digit_size minimum must be >= 4.*digit_size=2"),
        ({"num_clutter": -1}, r"num_clutter must be >= 0, got -1"),
        ({"clutter_size": (6, 4)}, r"clutter_size minimum 6 is larger than its maximum 4"),
        ({"clutter_size": (0, 4)}, r"clutter_size minimum must be >= 1"),
        ({"clutter_size": (4, 20)}, r"clutter_size=\(4, 20\).*smallest digit size 16"),
        ({"noise_std": -0.1}, r"noise_std must be .*>= 0, got -0.1"),
        ({"noise_std": float("nan")}, r"noise_std must be a finite.*nan"),
        ({"noise_std": float("inf")}, r"noise_std must be a finite.*inf"),
        ({"num_train": 0}, r"num_train must be >= 1, got 0"),
        ({"num_val": 0}, r"num_val must be >= 1, got 0"),
        ({"num_test": -3}, r"num_test must be >= 1, got -3"),
        ({"val_fraction": 0.0}, r"val_fraction must be in the open interval \(0, 1\), got 0.0"),
        ({"val_fraction": 1.0}, r"val_fraction must be in the open interval \(0, 1\), got 1.0"),
        ({"test_fraction": -0.2}, r"test_fraction must be in .*got -0.2"),
        ({"test_fraction": float("nan")}, r"test_fraction must be a finite number, got nan"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            r"val_fraction \+ test_fraction must be < 1.*val_fraction=0.5.*test_fraction=0.5",
        ),
        (
            {"val_fraction": 0.001, "test_fraction": 0.998},
            r"val_fraction=0.001 and test_fraction=0.998 leave no training scans",
        ),
        ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),
        ({"num_workers": -1}, r"num_workers must be >= 0, got -1"),
        ({"seed": -1}, r"seed must be >= 0, got -1"),
    ],
)
def test_bad_values_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_dm(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canvas_size": 64.0}, r"canvas_size must be an int, got 64.0"),
        ({"canvas_size": True}, r"canvas_size must be an int"),
        ({"digit_size": "16"}, r"digit_size must be an int or a pair"),
        ({"digit_size": (16, 20, 24)}, r"digit_size must be an int or a pair"),
        ({"digit_size": (16.0, 20)}, r"digit_size must be an int or a pair"),
        ({"clutter_size": None}, r"clutter_size must be an int or a pair"),
        ({"num_clutter": 1.5}, r"num_clutter must be an int"),
        ({"noise_std": "0.1"}, r"noise_std must be a number"),
        ({"num_train": 10.0}, r"num_train must be an int"),
        ({"val_fraction": "0.1"}, r"val_fraction must be a number"),
        ({"batch_size": None}, r"batch_size must be an int"),
        ({"num_workers": 1.0}, r"num_workers must be an int"),
        ({"pin_memory": 1}, r"pin_memory must be a bool"),
        ({"seed": "0"}, r"seed must be an int"),
    ],
)
def test_bad_types_raise_type_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make_dm(**kwargs)


def test_dataset_argument_checks() -> None:
    parts = split_source_indices()
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        ClutteredDigitsDataset(parts["train"], 0)
    with pytest.raises(ValueError, match="split must be one of"):
        ClutteredDigitsDataset(parts["train"], 4, split="training")
    with pytest.raises(ValueError, match="source_indices needs at least 2"):
        ClutteredDigitsDataset([5, 5], 4)
    with pytest.raises(ValueError, match=r"source_indices must lie in \[0, 1797\)"):
        ClutteredDigitsDataset([0, 1797], 4)
    with pytest.raises(TypeError, match="source_indices must be a 1-D sequence of ints"):
        ClutteredDigitsDataset([0.5, 1.5], 4)
    with pytest.raises(TypeError, match="config must be a ClutteredDigitsConfig"):
        ClutteredDigitsDataset(parts["train"], 4, config={"canvas_size": 64})  # type: ignore[arg-type]
    ds = ClutteredDigitsDataset(parts["val"], 5, seed=1, split="val")
    assert len(ds) == 5 and ds.images.shape == (5, 1, 64, 64)


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_trainer_fit_test_predict_smoke(tmp_path: pytest.TempPathFactory) -> None:
    """The module drives a real Trainer through fit / test / predict unchanged."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 10 + 4))

        def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            x, y, box = batch
            out = self.net(x)
            return F.cross_entropy(out[:, :10], y) + F.mse_loss(out[:, 10:], box / 64)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self._loss(batch)

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.log("val_loss", self._loss(batch))

        def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.log("test_loss", self._loss(batch))

        def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return self.net(batch[0])[:, :10].argmax(1)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    m = make_dm(seed=0)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = Tiny()
    trainer.fit(model, datamodule=m)
    assert trainer.datamodule.hparams["num_train"] == 64
    assert "test_loss" in trainer.test(model, datamodule=m, verbose=False)[0]
    preds = trainer.predict(model, datamodule=m)
    assert sum(p.numel() for p in preds) == 48
