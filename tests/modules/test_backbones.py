"""Real backbones in the Lightning layer, with the real timm and torchvision model code
(random init, nothing downloads): ``AttentionClassifier(backbone=...)`` fits, checkpoints and
reloads; ``insert_attention`` works on timm's ``features_only`` models."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.blocks import (
    CoordinateAttention,
    DynamicSpatialAttention,
    find_attention_blocks,
)
from lightning_attn.modules import (
    AttentionClassifier,
    insert_attention,
    inserted_attention,
    remove_attention,
)

S = 32


def _loader(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, S, S, generator=g)
    y = torch.arange(n) % 3
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0]]).repeat(n, 1)
    return DataLoader(TensorDataset(x, y, boxes), batch_size=4)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path, **kwargs,
    )


def _fit_two_steps(model: AttentionClassifier, tmp_path) -> pl.Trainer:
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = _trainer(tmp_path)
    trainer.fit(model, _loader(), _loader())
    assert trainer.global_step == 2
    changed = [k for k, v in model.net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "two optimizer steps changed nothing"
    assert "val/acc" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    return trainer


@pytest.mark.slow  # 2.5-4 s: a fit, a checkpoint and two reloads
def test_timm_resnet18_with_inserted_blocks_fits_checkpoints_and_reloads(tmp_path) -> None:
    def make() -> nn.Module:
        net = timm.create_model("resnet18", pretrained=False, num_classes=3)
        return insert_attention(net, after=["layer2"], name="dsa")

    model = AttentionClassifier(num_classes=3, backbone=make())
    assert model.block_names == ["net.layer2_attn"]
    assert "backbone" not in model.hparams and model.hparams.num_classes == 3
    trainer = _fit_two_steps(model, tmp_path)
    # the inserted DSA's spatial mask is scored for localisation on validation
    assert "val/loc/net.layer2_attn" in trainer.callback_metrics

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"timm.models.resnet.ResNet backbone.*backbone="):
        AttentionClassifier.load_from_checkpoint(path)  # the module is not in the hparams
    loaded = AttentionClassifier.load_from_checkpoint(path, backbone=make())
    assert dict(loaded.hparams) == dict(model.hparams)
    x = _loader().dataset.tensors[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_timm_model_with_our_blocks_as_attn_layer_fits(tmp_path) -> None:
    net = timm.create_model("resnet18", pretrained=False, num_classes=3,
                            block_args=dict(attn_layer=CoordinateAttention))
    model = AttentionClassifier(num_classes=3, backbone=net)
    assert len(model.block_names) == 8  # every BasicBlock's CoordinateAttention
    _fit_two_steps(model, tmp_path)


def test_torchvision_model_assigned_as_net_fits(tmp_path) -> None:
    """The reported failure: ``clf.net = resnet`` ('ResNet' object has no attribute
    'check_input'); the blocks are found again when the network is replaced."""
    model = AttentionClassifier(num_classes=3)
    model.net = torchvision.models.mobilenet_v3_small(num_classes=3)
    _fit_two_steps(model, tmp_path)
    assert model.block_names == [] and len(model.val_loc) == 0


def test_torchvision_model_as_backbone_predicts(tmp_path) -> None:
    net = torchvision.models.resnet18(num_classes=3)
    insert_attention(net, after=["layer1"], name="coord", reduction=4)
    model = AttentionClassifier(num_classes=3, backbone=net)
    assert model.block_names == ["net.layer1_attn"]
    probs = torch.cat(_trainer(tmp_path).predict(model, _loader()))
    assert probs.shape == (8, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"stage_widths": (4, 8)}, ValueError, r"replaces the built-in AttentionCNN.*stage_widths"),
    ({"attention": "coord", "dropout": 0.5}, ValueError, r"attention='coord', dropout=0.5"),
    ({"dsa": {"kernels": [3]}}, ValueError, "dsa="),
    ({"num_classes": 1}, ValueError, "num_classes must be >= 2"),
])
def test_backbone_with_arguments_of_the_builtin_network_is_an_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        AttentionClassifier(backbone=nn.Conv2d(3, 3, 1), **kwargs)
    # the defaults, as LightningCLI passes them (lists from a config), are fine
    AttentionClassifier(backbone=nn.Conv2d(3, 3, 1), stage_widths=[16, 32, 64])


def test_backbone_must_be_a_module_and_return_logits() -> None:
    with pytest.raises(TypeError, match="backbone must be an nn.Module or None, got str"):
        AttentionClassifier(backbone="resnet18")
    model = AttentionClassifier(num_classes=5,
                                backbone=timm.create_model("resnet18", num_classes=3))
    batch = (torch.rand(2, 3, S, S), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 5\).*got shape \(2, 3\)"):
        model.training_step(batch, 0)
    with pytest.raises(ValueError, match=r"images as a float tensor of shape \(B, C, H, W\)"):
        model.training_step((torch.rand(2, 3, S), batch[1]), 0)
    with pytest.raises(TypeError, match="got dtype torch.uint8"):
        model.training_step((torch.zeros(2, 3, S, S, dtype=torch.uint8), batch[1]), 0)


# -- insert_attention on timm features_only models ------------------------------------------


@pytest.mark.parametrize("name", ["dsa", "coord"])
def test_insert_attention_into_a_timm_features_only_model(name) -> None:
    model = timm.create_model("resnet18", pretrained=False, features_only=True).eval()
    assert isinstance(model, nn.ModuleDict)  # FeatureListNet: runs every child in order
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    original = copy.deepcopy(model)

    insert_attention(model, after=["layer1", "layer3"], name=name, example_input=x)
    # the blocks live inside the stages' last BasicBlocks, outside the ModuleDict's own
    # children, so FeatureListNet does not run them as extra layers
    assert list(model.keys()) == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2",
                                  "layer3", "layer4"]
    assert list(find_attention_blocks(model)[0]) == ["layer1.1.layer1_attn",
                                                     "layer3.1.layer3_attn"]
    assert set(inserted_attention(model)) == {"layer1", "layer3"}
    features = model(x)
    assert [f.shape for f in features] == [f.shape for f in plain]
    assert torch.equal(features[0], plain[0])  # before layer1: unchanged
    block = model.layer1[1].layer1_attn
    assert isinstance(block, (DynamicSpatialAttention, CoordinateAttention))
    with torch.no_grad():  # the second feature map is block(layer1(stem(x))), from the copy
        stem = original.maxpool(original.act1(original.bn1(original.conv1(x))))
        out = block.eval()(original.layer1(stem))
    torch.testing.assert_close(features[1], out[0] if isinstance(out, tuple) else out,
                               rtol=0, atol=0)

    result = model.load_state_dict(pretrained, strict=False)  # keys kept: weights load
    assert result.unexpected_keys == [] and all("_attn." in k for k in result.missing_keys)
    remove_attention(model)
    assert [torch.equal(a, b) for a, b in zip(model(x), plain, strict=True)] == [True] * 5
