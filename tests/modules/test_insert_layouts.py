"""``insert_attention`` after stages whose output is channels-last ``(B, H, W, C)``: the real
timm and torchvision Swin (random init, nothing downloads), and the layout rules on small
models whose layout is known."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torchvision.models import swin_t

from lightning_attn.blocks import attention_names
from lightning_attn.modules import (
    infer_out_channels,
    insert_attention,
    inserted_attention,
    remove_attention,
)

from .surgery_models import ConvNeXtLike, small_swin

X = torch.randn(2, 3, 64, 64)


def _stage_io(model: nn.Module, before: str, after: str, x: torch.Tensor):
    """The output of ``before`` (before any inserted block) and the input of ``after`` on one
    forward."""
    seen = {}
    model.get_submodule(before).register_forward_hook(
        lambda m, i, o: seen.setdefault("out", o), prepend=True)
    model.get_submodule(after).register_forward_pre_hook(
        lambda m, i: seen.setdefault("in", i[0]))
    model(x)
    return seen["out"], seen["in"]


@pytest.mark.parametrize("name", ["coord", "dsa"])
def test_timm_swin_stages_get_blocks_over_their_channels(name: str) -> None:
    model = small_swin()
    insert_attention(model, ["layers.0", "layers.1"], name, example_input=X)
    blocks = inserted_attention(model)
    if name == "coord":  # C, not H: the channels-last stage gives (B, 16, 16, 24)
        assert [b.in_channels for b in blocks.values()] == [24, 48]
    out, nxt = _stage_io(model, "layers.0", "layers.1", X)
    assert out.shape == (2, 16, 16, 24)  # the stage itself is unchanged
    with torch.no_grad():  # the block saw (B, C, H, W); the next stage gets (B, H, W, C)
        y = blocks["layers.0"](out.permute(0, 3, 1, 2))
        y = y[0] if isinstance(y, tuple) else y
    torch.testing.assert_close(nxt, y.permute(0, 2, 3, 1), rtol=0, atol=0)
    assert nxt.is_contiguous()  # timm's window partition views it
    assert model(X).shape == (2, 3)


def test_torchvision_swin_features_are_read_as_channels_last() -> None:
    torch.manual_seed(0)
    model = swin_t(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = {"features.0": 96, "features.1": 96, "features.3": 192}
    assert infer_out_channels(model, list(expected), x) == expected
    insert_attention(model, list(expected), "coord", example_input=x)
    assert {t: b.in_channels for t, b in inserted_attention(model).items()} == expected
    out, nxt = _stage_io(model, "features.1", "features.2", x)
    block = model.features_1_attn
    with torch.no_grad():
        torch.testing.assert_close(nxt, block(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    assert model(x).shape == (1, 3)


def test_a_channels_last_stage_without_example_input_fails_at_the_first_forward() -> None:
    """By hand (channels=24, no example_input) the layout is not read: the forward says
    which layout it saw instead of running a block over H."""
    model = insert_attention(small_swin(), ["layers.0"], "dsa", channels=24)
    with pytest.raises(ValueError, match=r"\(2, 16, 16, 24\): it looks channels-last.*"
                                         r"output_fmt='NHWC'"):
        model(X)
    model = insert_attention(small_swin(), ["layers.0"], "dsa", channels=24,
                             output_fmt="NHWC")
    assert model(X).shape == (2, 3)


def test_layout_hooks_survive_deepcopy_and_removal() -> None:
    model = small_swin()
    plain = model(X)
    insert_attention(model, ["layers.1"], "coord", example_input=X, alpha=0.5)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(X), model(X), rtol=0, atol=0)
    remove_attention(model)
    torch.testing.assert_close(model(X), plain, rtol=0, atol=0)


def test_a_permuted_interior_is_not_mistaken_for_a_channels_last_output() -> None:
    # Only the depthwise conv's output has the stage's (B, 8, 16, 12) shape: channels-first.
    x = torch.randn(2, 3, 16, 12)
    model = insert_attention(ConvNeXtLike(), ["stage"], "coord", example_input=x)
    assert model.stage_attn.in_channels == 8 and model(x).shape == (2, 8, 16, 12)


def test_a_square_map_with_both_kinds_inside_asks_for_output_fmt() -> None:
    square = torch.randn(2, 3, 8, 8)  # C = H = W = 8: the LayerNorm's output fits too
    with pytest.raises(ValueError, match=r"cannot tell the layout of the output of 'stage' "
                                         r"\(shape \(2, 8, 8, 8\)\).*output_fmt="):
        insert_attention(ConvNeXtLike(), ["stage"], "coord", example_input=square)
    model = insert_attention(ConvNeXtLike(), ["stage"], "coord", example_input=square,
                             output_fmt="NCHW")
    assert model.stage_attn.in_channels == 8 and model(square).shape == (2, 8, 8, 8)


def test_resnet_stages_stay_channels_first_when_c_equals_w() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 256, 256)  # layer1: (1, 64, 64, 64)
    insert_attention(model, ["layer1"], "coord", example_input=x)
    assert model.layer1_attn.in_channels == 64
    assert model(x).shape == (1, 3)


def test_blocks_from_factories_for_one_call() -> None:
    class Scale(nn.Module):
        def __init__(self, channels: int, scale: float = 1.0) -> None:
            super().__init__()
            self.channels, self.scale = channels, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    model = small_swin()
    insert_attention(model, ["layers.2"], "gate", example_input=X, factories={"gate": Scale},
                     scale=0.5)
    block = model.layers_2_attn
    assert isinstance(block, Scale) and block.channels == 96 and block.scale == 0.5
    with pytest.raises(ValueError, match=r"unknown attention 'gate'; known names: \['coord'"):
        insert_attention(small_swin(), ["layers.2"], "gate")
    assert "gate" not in attention_names()  # nothing registered for the process


def test_the_docs_swin_example_runs_as_written(capsys) -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "blocks.md"
    section = page.read_text(encoding="utf-8").split("### Channels-last stages: Swin")[1]
    (code,) = re.findall(r"^```python\n(.*?)^```", section.split("\n## ")[0], re.S | re.M)
    assert "pretrained=True" not in code
    exec(compile(code, str(page), "exec"), {})
    assert capsys.readouterr().out.split() == ["192", "384"]
