"""What lands in TensorBoard and CSV files: tags, histograms, images, texts, the layout."""

import csv
import json
import logging

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_attn.callbacks import (
    AttentionDiagnostics,
    AttentionMapLogger,
    MaskHealthMonitor,
    RouterEntropyMonitor,
)
from lightning_attn.callbacks.maps import MIN_TILE_WIDTH
from lightning_attn.core.statistics import MaskStats, RouterStats, quantities

from .cb_models import FakeNet, TinyAttnNet, make_trainer

_MASK_LEAVES = [q.tag for q in quantities(MaskStats) if q.tag is not None]
_ROUTER_LEAVES = [q.tag.format(branch=k) for q in quantities(RouterStats) if q.tag is not None
                  for k in (range(2) if q.per_branch else (None,))]
EXPECTED_SCALARS = {  # TinyAttnNet: a 2-branch DSA and a CoordinateAttention
    *(f"attn/dsa/router/{leaf}" for leaf in _ROUTER_LEAVES),
    *(f"attn/dsa/mask/{leaf}" for leaf in _MASK_LEAVES),
    *(f"attn/coord/{m}/{leaf}" for m in ("mask_h", "mask_w") for leaf in _MASK_LEAVES),
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
    event = acc.Tensors("custom_scalars__config__")[-1]
    proto = layout_pb2.Layout()
    proto.ParseFromString(event.tensor_proto.string_val[0])
    return {
        c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart}
        for c in proto.category
    }


def _texts(acc: EventAccumulator, tag: str) -> list[tuple[int, dict]]:
    return [
        (e.step, json.loads(e.tensor_proto.string_val[0].decode()))
        for e in acc.Tensors(f"{tag}/text_summary")
    ]


def test_tensorboard_holds_tags_histograms_images_texts_and_layout(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = AttentionDiagnostics(
        histogram_every_n_steps=4, num_images=3, on_problem="ignore", summary=False,
    )
    trainer = make_trainer(
        tmp_path, [cb], max_steps=8, logger=tb, limit_val_batches=2, val_check_interval=4,
        num_sanity_val_steps=1, log_every_n_steps=2,
    )
    trainer.fit(TinyAttnNet(per_axis_alpha=True))
    acc = _events(tb.log_dir)
    tags = acc.Tags()
    assert EXPECTED_SCALARS <= set(tags["scalars"])
    assert {e.step for e in acc.Scalars("attn/dsa/router/entropy")} == {1, 3, 5, 7}
    assert {e.step for e in acc.Scalars("val/attn/dsa/mask/std")} == {3, 7}  # per val epoch
    assert set(tags["histograms"]) == {
        "attn/dsa/mask/hist", "attn/dsa/router/weights_hist",
        "attn/coord/mask_h/hist", "attn/coord/mask_w/hist",
    }
    hist = acc.Histograms("attn/dsa/mask/hist")
    assert [h.step for h in hist] == [3, 7]
    assert hist[0].histogram_value.num == 8 * 8 * 8  # B*H*W values of one batch
    images = acc.Images("val/attn/maps")
    assert [i.step for i in images] == [3, 7]  # once per validation epoch, not sanity check
    # a 16 px label row, then 3 rows (images) x 3 columns (input, dsa, coord) of tiles
    # enlarged from 8x8 to 96x96, 2 px padding, then the 30 px colour scale
    tile = MIN_TILE_WIDTH
    assert (images[0].height, images[0].width) == (
        16 + 3 * (tile + 2) + 2 + 30, 3 * (tile + 2) + 2)

    layout = _layout(acc)
    assert set(layout) == {"attn/dsa", "attn/coord"}
    assert all(len(tags) == 1 for charts in layout.values() for tags in charts.values())
    assert layout["attn/dsa"]["usage of branch 1 (7x7 d2)"] == ["^attn/dsa/router/usage_1$"]
    assert layout["attn/coord"]["mask_h share above saturation_high"] == [
        "^attn/coord/mask_h/sat_high$"
    ]
    assert layout["attn/coord"]["alpha_w gradient norm"] == [
        "^attn/coord/param/alpha_w_grad_norm$"
    ]
    ((step, config),) = _texts(acc, "attn/config")
    assert config["thresholds"]["std_threshold"] == 0.02 and step == 0
    assert [b["name"] for b in config["blocks"]] == ["dsa", "coord"]
    assert config["blocks"][0]["branches"] == ["3x3", "7x7 d2"]


def test_problems_are_written_as_json_texts(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = MaskHealthMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="std"):
        make_trainer(tmp_path, [cb], max_steps=3, logger=tb).fit(
            FakeNet(transform=lambda x: x * 0 + 0.5)
        )
    ((step, problems),) = _texts(_events(tb.log_dir), "attn/problems")  # one record a point
    (problem,) = problems
    assert step == 0 and problem["block"] == "block" and problem["kind"] == "mask_collapse"
    assert problem["threshold"] == 0.02 and "Try:" in problem["message"]


def test_two_monitors_share_one_merged_layout(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [RouterEntropyMonitor(log_every_n_steps=1), MaskHealthMonitor(log_every_n_steps=1)]
    with pytest.warns(UserWarning):  # the tiny net's DSA mask starts nearly constant
        make_trainer(tmp_path, callbacks, max_steps=2, logger=tb).fit(TinyAttnNet())
    layout = _layout(_events(tb.log_dir))  # the last layout written holds both
    assert {"router entropy", "usage of branch 0 (3x3)", "mask mean", "mask std"} <= set(
        layout["attn/dsa"]
    )


def test_scalars_go_to_csv_and_missing_tensorboard_is_one_info(tmp_path):
    csv_logger = CSVLogger(tmp_path, name="csv")
    cb = AttentionDiagnostics(on_problem="ignore", summary=False)
    # Lightning's logger may not propagate to the root (it depends on import order), so the
    # records are caught on it directly.
    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.INFO)
    catcher.emit = records.append
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(catcher)
    try:
        make_trainer(tmp_path, [cb], max_steps=4, logger=csv_logger, log_every_n_steps=2).fit(
            TinyAttnNet()
        )
    finally:
        lightning_logger.removeHandler(catcher)
    infos = [r for r in records if "TensorBoardLogger does" in r.getMessage()]
    assert len(infos) == 1
    with open(csv_logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("attn/dsa/mask/std")]
    assert [int(r["step"]) for r in rows] == [1, 3]


def test_map_logger_uses_the_first_validation_images_every_epoch(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    model = TinyAttnNet()
    trainer = make_trainer(
        tmp_path, [AttentionMapLogger(num_images=5)], max_steps=8, logger=tb,
        limit_val_batches=2, val_check_interval=4,
    )
    trainer.fit(model)
    images = _events(tb.log_dir).Images("val/attn/maps")
    assert len(images) == 2
    tile = MIN_TILE_WIDTH
    assert (images[0].height, images[0].width) == (16 + 5 * (tile + 2) + 2 + 30,  # + scale
                                                  3 * (tile + 2) + 2)
    assert not model.dsa.capture and not model.coord.capture


def test_tensorboard_prefix_is_respected(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", prefix="run")
    cb = MaskHealthMonitor(log_every_n_steps=1, on_problem="ignore")
    make_trainer(tmp_path, [cb], max_steps=2, logger=tb).fit(TinyAttnNet())
    scalars = _events(tb.log_dir).Tags()["scalars"]
    assert "run-attn/dsa/mask/std" in scalars and "attn/dsa/mask/std" not in scalars


def test_config_and_problems_read_as_code_blocks_in_tensorboards_text_tab(tmp_path):
    """TensorBoard's Text tab renders its texts as Markdown: the JSON documents are one code
    block, a key per line, not one paragraph; the report still reads them as JSON."""
    from tensorboard import plugin_util

    tb = TensorBoardLogger(tmp_path, name="tb")
    with pytest.warns(UserWarning, match="std"):
        make_trainer(tmp_path, [AttentionDiagnostics(log_every_n_steps=1, summary=False)],
                     max_steps=2, logger=tb).fit(FakeNet(transform=lambda x: x * 0 + 0.5))
    acc = _events(tb.log_dir)
    for tag in ("attn/config", "attn/problems"):
        text = acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()
        html = plugin_util.markdown_to_safe_html(text)
        assert html.startswith("<pre><code>" + ("{" if tag == "attn/config" else "[")) and (
            html.count("\n") > 5), html[:200]
        # the configuration is one object; a point's problems one list of objects
        assert isinstance(json.loads(text), dict if tag == "attn/config" else list)
