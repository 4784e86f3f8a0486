"""What lands in TensorBoard and CSV files: tags, histograms, images, the custom layout."""

import csv
import logging

import pytest
import torch
from cb_models import TinyAttnNet, make_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_attn.callbacks import (
    AttentionDiagnostics,
    AttentionMapLogger,
    MaskHealthMonitor,
    RouterEntropyMonitor,
)

EXPECTED_SCALARS = {
    "attn/dsa/router/entropy", "attn/dsa/router/entropy_norm",
    "attn/dsa/router/usage_0", "attn/dsa/router/usage_1",
    *(f"attn/dsa/mask/{s}" for s in ("mean", "std", "sat_low", "sat_high")),
    *(f"attn/coord/{m}/{s}" for m in ("mask_h", "mask_w")
      for s in ("mean", "std", "sat_low", "sat_high")),
    "attn/dsa/param/temperature", "attn/dsa/param/temperature_grad_norm",
    "attn/coord/param/alpha_h", "attn/coord/param/alpha_h_grad_norm",
    "attn/coord/param/alpha_w", "attn/coord/param/alpha_w_grad_norm",
    "attn/coord/param/beta",
}


def _events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> dict[str, dict[str, list[str]]]:
    (event,) = acc.Tensors("custom_scalars__config__")
    proto = layout_pb2.Layout()
    proto.ParseFromString(event.tensor_proto.string_val[0])
    return {
        c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart}
        for c in proto.category
    }


def test_tensorboard_holds_tags_histograms_images_and_layout(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = AttentionDiagnostics(
        log_every_n_steps=2, histogram_every_n_steps=4, num_images=3, on_problem="ignore",
        summary=False,
    )
    trainer = make_trainer(
        tmp_path, [cb], max_steps=8, logger=tb, limit_val_batches=2, val_check_interval=4,
        num_sanity_val_steps=1,
    )
    trainer.fit(TinyAttnNet(per_axis_alpha=True))
    acc = _events(tb.log_dir)
    tags = acc.Tags()
    assert EXPECTED_SCALARS <= set(tags["scalars"])
    assert {e.step for e in acc.Scalars("attn/dsa/router/entropy")} == {2, 4, 6, 8}
    assert set(tags["histograms"]) == {
        "attn/dsa/mask/hist", "attn/dsa/router/weights_hist",
        "attn/coord/mask_h/hist", "attn/coord/mask_w/hist",
    }
    hist = acc.Histograms("attn/dsa/mask/hist")
    assert [h.step for h in hist] == [4, 8]
    assert hist[0].histogram_value.num == 8 * 8 * 8  # B*H*W values of one batch
    images = acc.Images("attn/maps")
    assert [i.step for i in images] == [4, 8]  # once per validation epoch, not sanity check
    # 3 rows (images) x 3 columns (input, dsa, coord) of 8x8 tiles, 2 px padding
    assert (images[0].height, images[0].width) == (3 * 10 + 2, 3 * 10 + 2)

    layout = _layout(acc)
    assert set(layout) == {"attn/dsa", "attn/coord"}
    usage = layout["attn/dsa"]["branch usage"]
    assert usage == ["^attn/dsa/router/usage_0$", "^attn/dsa/router/usage_1$"]
    assert layout["attn/coord"]["mask_h saturation"] == [
        "^attn/coord/mask_h/sat_low$", "^attn/coord/mask_h/sat_high$"
    ]
    assert layout["attn/coord"]["alpha_h / alpha_w"] == [
        "^attn/coord/param/alpha_h$", "^attn/coord/param/alpha_w$"
    ]


def test_two_monitors_share_one_merged_layout(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [RouterEntropyMonitor(log_every_n_steps=1), MaskHealthMonitor(log_every_n_steps=1)]
    with pytest.warns(UserWarning):  # the tiny net's DSA mask starts nearly constant
        make_trainer(tmp_path, callbacks, max_steps=2, logger=tb).fit(TinyAttnNet())
    layout = _layout(_events(tb.log_dir))  # exactly one layout event
    assert {"router entropy", "branch usage", "mask mean / std", "mask saturation"} <= set(
        layout["attn/dsa"]
    )


def test_scalars_go_to_csv_and_missing_tensorboard_is_one_info(tmp_path, caplog):
    csv_logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionDiagnostics(log_every_n_steps=2, on_problem="ignore", summary=False)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [cb], max_steps=4, logger=csv_logger).fit(TinyAttnNet())
    infos = [r for r in caplog.records if "no TensorBoardLogger" in r.getMessage()]
    assert len(infos) == 1
    with open(csv_logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("attn/dsa/mask/std")]
    assert [int(r["step"]) for r in rows] == [2, 4]


def test_map_logger_keeps_the_same_images_and_restores_them(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    maps = AttentionMapLogger(num_images=5)
    model = TinyAttnNet()
    trainer = make_trainer(
        tmp_path, [maps], max_steps=8, logger=tb, limit_val_batches=2, val_check_interval=4
    )
    trainer.fit(model)
    first_val_batch = next(iter(model.val_dataloader()))[0]
    assert torch.equal(maps.images, first_val_batch[:5])  # the first 5 validation images
    assert len(_events(tb.log_dir).Images("attn/maps")) == 2

    restored = AttentionMapLogger(num_images=5)
    restored.load_state_dict(maps.state_dict())
    assert torch.equal(restored.images, maps.images) and restored._frozen
    restored._bind({"dsa": model.dsa, "coord": model.coord})
    model.train()
    grid = restored.render(trainer, model)
    assert grid.shape == (3, 5 * 10 + 2, 3 * 10 + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    assert model.training  # mode restored
    assert not model.dsa.has_observers and not model.coord.has_observers


def test_tensorboard_prefix_is_respected(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", prefix="run")
    cb = MaskHealthMonitor(log_every_n_steps=1, on_problem="ignore")
    make_trainer(tmp_path, [cb], max_steps=2, logger=tb).fit(TinyAttnNet())
    scalars = _events(tb.log_dir).Tags()["scalars"]
    assert "run-attn/dsa/mask/std" in scalars and "attn/dsa/mask/std" not in scalars
