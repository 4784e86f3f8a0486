"""Typed configuration: Literal choices and the blocks' options dataclasses, and
AttentionClassifier built, checkpointed and reloaded from them."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import lightning.pytorch as pl
import pytest
import torch

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention, attention_names
from lightning_attn.data.cluttered_digits import SPLITS, Split
from lightning_attn.modules import AttentionClassifier, CoordOptions, DSAOptions
from lightning_attn.modules.backbone import ACTIVATIONS, DOWNSAMPLING
from lightning_attn.modules.options import (
    CHANNEL_ARGUMENTS,
    DEPRECATED_ARGUMENTS,
    Activation,
    AttentionName,
    Downsample,
)

SMALL = {"stage_widths": (4, 8), "num_classes": 3}


@pytest.mark.parametrize(
    ("options", "block"),
    [(DSAOptions, DynamicSpatialAttention), (CoordOptions, CoordinateAttention)],
)
def test_options_mirror_the_block_constructor(options, block) -> None:
    params = [  # every argument with a default that can be given by position
        p for p in inspect.signature(block.__init__).parameters.values()
        if p.name not in ("self", *DEPRECATED_ARGUMENTS, *CHANNEL_ARGUMENTS)
        and p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    hints = typing.get_type_hints(block.__init__)
    fields = dataclasses.fields(options)
    assert [f.name for f in fields] == [p.name for p in params]  # every keyword, in order
    assert [f.default for f in fields] == [p.default for p in params]
    assert [f.type for f in fields] == [hints[p.name] for p in params]
    # given per stage by the network
    assert not {"channels", "in_channels"} & {f.name for f in fields}


def test_literal_choices_are_what_the_code_accepts() -> None:
    assert typing.get_args(Activation) == tuple(ACTIVATIONS)
    assert typing.get_args(Downsample) == DOWNSAMPLING
    assert sorted(typing.get_args(AttentionName)) == attention_names()
    assert typing.get_args(Split) == SPLITS


def test_classifier_builds_blocks_from_typed_options() -> None:
    model = AttentionClassifier(attention="coord", **SMALL,
                                coord=CoordOptions(reduction=2, min_mid_channels=2))
    blocks = [m for m in model.modules() if isinstance(m, CoordinateAttention)]
    assert [b.mid_channels for b in blocks] == [2, 4]  # max(2, C // 2) for C = 4, 8
    as_dict = AttentionClassifier(attention="coord", **SMALL,
                                  coord={"reduction": 2, "min_mid_channels": 2})
    assert dict(as_dict.hparams) == dict(model.hparams)
    assert model.hparams.coord["reduction"] == 2 and isinstance(model.hparams.dsa, dict)

    # attention_kwargs go over the options; the options of the other block are ignored
    model = AttentionClassifier(attention="dsa", dsa={"kernels": [3]}, **SMALL,
                                attention_kwargs={"learnable_temperature": True},
                                coord={"reduction": 64})
    blocks = [m for m in model.modules() if isinstance(m, DynamicSpatialAttention)]
    assert [b.kernel_sizes for b in blocks] == [(3,), (3,)]
    assert all(isinstance(b.t_raw, torch.nn.Parameter) for b in blocks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dsa": {"kernelz": [3]}}, r"dsa has unknown keys \['kernelz'\]; valid keys: \['kernels'"),
        ({"attention_kwargs": {"kernelz": 3}}, r"attention_kwargs for 'dsa'.*\['kernelz'\]"),
        ({"coord": 8}, "coord must be a CoordOptions or a dict of its fields, got int"),
        ({"dsa": CoordOptions()}, "dsa must be a DSAOptions"),
    ],
)
def test_bad_options_name_the_key(kwargs, match) -> None:
    with pytest.raises(TypeError, match=match):
        AttentionClassifier(**SMALL, **kwargs)


def _save(model: AttentionClassifier, path, hparams: dict) -> None:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pl.__version__}, path)


def test_checkpoint_with_options_reloads_and_older_checkpoints_too(tmp_path) -> None:
    model = AttentionClassifier(attention="coord", coord=CoordOptions(reduction=2, beta=0.5),
                                **SMALL).eval()
    x = torch.rand(2, 1, 16, 16)
    _save(model, tmp_path / "new.ckpt", dict(model.hparams))
    loaded = AttentionClassifier.load_from_checkpoint(tmp_path / "new.ckpt")  # weights_only
    assert dict(loaded.hparams) == dict(model.hparams)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)

    # A 0.1 checkpoint: block arguments in attention_kwargs, no dsa / coord.
    old = {k: v for k, v in model.hparams.items() if k not in ("dsa", "coord")}
    old["attention_kwargs"] = {"reduction": 2, "beta": 0.5}
    _save(model, tmp_path / "old.ckpt", old)
    loaded = AttentionClassifier.load_from_checkpoint(tmp_path / "old.ckpt")
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
