"""Adversarial table for ``insert_attention`` / ``remove_attention``: every bad or edge input
tried, with its outcome class (``clear``: an exception naming the argument and value;
``correct``: the right thing happens, checked). None is ``raw`` or ``silent``;
:func:`test_outcome_counts` pins the counts (see tests/blocks/test_adversarial.py for the
blocks' table)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn
from torchvision.models import swin_t

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention, attention_names
from lightning_attn.modules import infer_out_channels, inserted_attention, remove_attention
from lightning_attn.modules import insert_attention as insert

from ..adversarial import Case, assert_outcome, clear, correct
from .surgery_models import ConvNeXtLike, Gate, small_swin


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pair = nn.Identity()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.stem(x)))


X = torch.rand(2, 3, 16, 16)


def _untouched_after(make_error: Callable[[Net], object]) -> Callable[[], object]:
    """Run an insertion that must fail; the model must keep exactly its keys."""

    def run() -> object:
        model = Net()
        keys = list(model.state_dict())
        try:
            return make_error(model)
        finally:
            assert list(model.state_dict()) == keys and inserted_attention(model) == {}

    return run


def _eval_model_blocks_in_eval() -> bool:
    model = insert(Net().eval(), ["layer1"], "coord")
    return not model.layer1_attn.training


def _bf16_model() -> bool:
    model = insert(Net().to(torch.bfloat16), ["layer1"], "coord")
    block = model.layer1_attn
    return block.conv_h.weight.dtype == torch.bfloat16 and model(X.bfloat16()).shape == (2, 5)


def _meta_model() -> bool:
    model = insert(Net().to("meta"), ["layer1"], "dsa")
    return model(X.to("meta")).device.type == "meta"


def _features_only() -> bool:
    model = timm.create_model("resnet18", pretrained=False, features_only=True)
    insert(model, ["layer1", "layer4"], "dsa")
    return list(inserted_attention(model)) == ["layer1", "layer4"] and len(model(X)) == 5


def _container_only_nested() -> bool:
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Conv2d(4, 4, 1))
    insert(seq, ["0"], "coord", channels=4)
    return isinstance(seq[0][1].get_submodule("0_attn"), CoordinateAttention) and len(seq) == 2


def _insert_remove_insert() -> bool:
    model = insert(Net(), ["layer1"], "dsa")
    remove_attention(model)
    insert(model, ["layer1"], "coord", channels=8)
    return isinstance(model.layer1_attn, CoordinateAttention) and model(X).shape == (2, 5)


CASES = [
    clear("model not a module", lambda: insert("resnet", ["layer1"]), TypeError,
          "model must be an nn.Module", "str"),
    clear("after a string", lambda: insert(Net(), "layer1"), TypeError,
          "list of submodule names", "'layer1'"),
    clear("after empty", lambda: insert(Net(), []), TypeError, "list of submodule names"),
    clear("after unknown name", lambda: insert(Net(), ["layer9"]), ValueError,
          "no submodule named 'layer9'", "'layer1'"),
    clear("after the model itself ('')", lambda: insert(Net(), [""]), ValueError,
          "no submodule named ''"),
    clear("after a name twice", lambda: insert(Net(), ["layer1", "layer1"]), ValueError,
          "twice"),
    clear("unknown block name", lambda: insert(Net(), ["layer1"], "se"), ValueError,
          "'se'", "known names"),
    clear("channels=True", lambda: insert(Net(), ["layer1"], channels=True), TypeError,
          "channels must be", "True"),
    clear("channels=4.0", lambda: insert(Net(), ["layer1"], channels=4.0), TypeError,
          "channels must be", "4.0"),
    clear("channels names another target",
          lambda: insert(Net(), ["layer1"], channels={"layer9": 3}), ValueError, "layer9"),
    clear("channels=0", lambda: insert(Net(), ["layer1"], "coord", channels=0), ValueError,
          "channels", "0"),
    clear("channels contradicts example_input",
          lambda: insert(Net(), ["layer1"], channels=4, example_input=X), ValueError,
          "channels['layer1']=4", "8 channels"),
    clear("bool kwarg use_dilated='false' (model untouched)",
          _untouched_after(lambda m: insert(m, ["stem", "layer1"], use_dilated="false")),
          TypeError, "use_dilated must be a bool, got 'false'"),
    clear("bool kwarg per_axis_alpha='no' (model untouched)",
          _untouched_after(lambda m: insert(m, ["layer1"], "coord", per_axis_alpha="no")),
          TypeError, "per_axis_alpha must be a bool, got 'no'"),
    clear("size kwarg kernels=(10**9,) (model untouched)",
          _untouched_after(lambda m: insert(m, ["layer1"], kernels=(10**9,))), ValueError,
          "kernels[0]=1000000000", "MAX_KERNEL_SIZE"),
    clear("unknown kwarg (model untouched)",
          _untouched_after(lambda m: insert(m, ["layer1"], kernelz=3)), TypeError, "kernelz"),
    clear("example_input the model rejects",
          lambda: insert(Net(), ["layer1"], example_input=torch.rand(2, 1, 16, 16)),
          ValueError, "example_input ((2, 1, 16, 16)) failed", "Net", "3 channels"),
    clear("example_input not a tensor",
          lambda: insert(Net(), ["layer1"], example_input=[1, 2]), ValueError,
          "example_input (list) failed"),
    clear("target never called", lambda: insert(Net(), ["pair"], example_input=X),
          ValueError, "'pair' was not called"),
    clear("target output not a feature map",
          lambda: insert(Net(), ["head.2"], example_input=X), ValueError,
          "output of 'head.2' is not a 4-D", "(2, 5)"),
    clear("channels cannot be inferred", lambda: insert(Net(), ["head.1"], "coord"),
          ValueError, "cannot infer the output channels of 'head.1'"),
    clear("inserted twice after one target",
          lambda: insert(insert(Net(), ["layer1"]), ["layer1"]), ValueError,
          "'layer1' already has attention", "remove_attention"),
    clear("attribute name taken", lambda: insert(_with_attr(), ["layer1"]), ValueError,
          "already has an attribute 'layer1_attn'"),
    clear("container-only with no plain module",
          lambda: insert(nn.Sequential(nn.Sequential(), nn.Conv2d(3, 4, 1)), ["0"],
                         channels=4), ValueError, "holds no plain module"),
    clear("forward after the block was deleted", lambda: _deleted_block()(X), RuntimeError,
          "'layer1_attn' inserted after 'layer1' was removed"),
    clear("wrong channels given by hand, at the forward",
          lambda: insert(Net(), ["layer1"], "coord", channels=4)(X), ValueError,
          "(B, 4, H, W)", "(2, 8, 16, 16)"),
    clear("remove where nothing was inserted", lambda: remove_attention(Net(), ["layer1"]),
          ValueError, "no attention was inserted after 'layer1'"),
    clear("remove from a non-module", lambda: remove_attention([1]), TypeError,
          "model must be an nn.Module"),
    correct("eval-mode model: the blocks are in eval mode", _eval_model_blocks_in_eval,
            lambda ok: ok),
    correct("bf16 model: the blocks are bf16 and run", _bf16_model, lambda ok: ok),
    correct("meta model: the blocks are on meta and run", _meta_model, lambda ok: ok),
    correct("timm features_only stages (ModuleDict)", _features_only, lambda ok: ok),
    correct("container inside containers: its last plain module hosts",
            _container_only_nested, lambda ok: ok),
    correct("insert, remove, insert another block", _insert_remove_insert, lambda ok: ok),
    correct("a target called twice runs its block twice",
            lambda: _called_twice(), lambda calls: calls == 2),
]


# -- surgery: layouts and blocks of one's own ---------------------------------------------------
SWIN_X = torch.rand(2, 3, 64, 64)  # small_swin's stages: (2, 16, 16, 24), (2, 8, 8, 48), ...
SQUARE = torch.rand(2, 3, 8, 8)  # ConvNeXtLike's stage: (2, 8, 8, 8), C == H == W



def _swin(*after: str, **kwargs) -> nn.Module:
    return insert(small_swin(), list(after), **kwargs)


def _same_after(make: Callable[[nn.Module], nn.Module]) -> bool:
    """``make(model)`` of a Swin with a channels-last insertion computes what it does."""
    model = _swin("layers.1", name="coord", example_input=SWIN_X, alpha=0.5)
    return torch.equal(make(model)(SWIN_X), model(SWIN_X))


def _removed_restores() -> bool:
    model = small_swin()
    plain = model(SWIN_X)
    insert(model, ["layers.0", "layers.1"], "dsa", example_input=SWIN_X)
    return torch.equal(remove_attention(model)(SWIN_X), plain)


SURGERY_CASES = [
    correct("timm Swin stage (B, H, W, C): a block over C, permuted around it",
            lambda: _swin("layers.0", "layers.1", name="coord", example_input=SWIN_X),
            lambda m: [b.in_channels for b in inserted_attention(m).values()] == [24, 48]
            and m(SWIN_X).shape == (2, 3)),
    correct("torchvision swin_t features (B, H, W, C) read as channels-last",
            lambda: infer_out_channels(swin_t(num_classes=3), ["features.0", "features.3"],
                                       torch.rand(1, 3, 64, 64)),
            lambda chans: chans == {"features.0": 96, "features.3": 192}),
    clear("Swin stage, channels by hand without example_input: the forward names the layout",
          lambda: _swin("layers.0", name="dsa", channels=24)(SWIN_X), ValueError,
          "(2, 16, 16, 24): it looks channels-last", "output_fmt='NHWC'"),
    correct("Swin stage, channels by hand with output_fmt='NHWC'",
            lambda: _swin("layers.0", name="dsa", channels=24, output_fmt="NHWC")(SWIN_X),
            lambda y: y.shape == (2, 3)),
    clear("Swin stage, neither channels nor example_input",
          lambda: _swin("layers.0", name="coord"), ValueError,
          "cannot infer the output channels of 'layers.0' (SwinTransformerStage)"),
    clear("channels=H against a channels-last example",
          lambda: _swin("layers.0", name="coord", channels=16, example_input=SWIN_X),
          ValueError, "channels['layers.0']=16", "has 24 channels (channels-last"),
    clear("output_fmt='nhwc'", lambda: insert(Net(), ["layer1"], output_fmt="nhwc"),
          ValueError, "output_fmt must be 'NCHW' or 'NHWC', got 'nhwc'"),
    clear("output_fmt=1", lambda: insert(Net(), ["layer1"], output_fmt=1), TypeError,
          "output_fmt must be", "got 1"),
    clear("output_fmt names another target",
          lambda: insert(Net(), ["layer1"], output_fmt={"layer9": "NHWC"}), ValueError,
          "output_fmt names ['layer9']"),
    clear("NHWC given for a channels-first output: the forward names the layout",
          lambda: insert(Net(), ["layer1"], "coord", output_fmt="NHWC")(X), ValueError,
          "(2, 8, 16, 16): it looks channels-first", "output_fmt='NCHW'"),
    clear("square map with both layouts inside (C == H == W)",
          lambda: insert(ConvNeXtLike(), ["stage"], "coord", example_input=SQUARE),
          ValueError, "cannot tell the layout of the output of 'stage'", "output_fmt="),
    correct("square map with output_fmt='NCHW' given",
            lambda: insert(ConvNeXtLike(), ["stage"], "coord", example_input=SQUARE,
                           output_fmt="NCHW"),
            lambda m: m.stage_attn.in_channels == 8 and m(SQUARE).shape == (2, 8, 8, 8)),
    correct("channels-last inside, channels-first out (ConvNeXt-like, 16x12)",
            lambda: insert(ConvNeXtLike(), ["stage"], "coord",
                           example_input=torch.rand(2, 3, 16, 12)),
            lambda m: m.stage_attn.in_channels == 8),
    correct("conv stage with C == H == W stays channels-first",
            lambda: insert(Net(), ["layer1"], "coord", example_input=torch.rand(2, 3, 8, 8)),
            lambda m: m.layer1_attn.in_channels == 8 and m(torch.rand(2, 3, 8, 8)).shape
            == (2, 5)),
    correct("deepcopy of a channels-last insertion", lambda: _same_after(copy.deepcopy),
            lambda ok: ok),
    correct("remove_attention after channels-last insertions restores the model",
            _removed_restores, lambda ok: ok),
    correct("a block of one's own for one call (factories=), nothing registered",
            lambda: insert(Net(), ["layer1"], "gate", factories={"gate": Gate}),
            lambda m: isinstance(m.layer1_attn, Gate) and m.layer1_attn.channels == 8
            and "gate" not in attention_names()),
    clear("factories taking a built-in name",
          _untouched_after(lambda m: insert(m, ["layer1"], "dsa", factories={"dsa": Gate})),
          ValueError, "'dsa' is already built in"),
    clear("factories not a mapping", lambda: insert(Net(), ["layer1"], "gate",
                                                    factories=[Gate]),
          TypeError, "factories must be a mapping"),
    clear("unknown name, with the call's factories listed",
          lambda: insert(Net(), ["layer1"], "gat", factories={"gate": Gate}), ValueError,
          "unknown attention 'gat'", "'gate'"),
]
CASES += SURGERY_CASES


def _with_attr() -> Net:
    model = Net()
    model.layer1_attn = nn.Identity()
    return model


def _deleted_block() -> Net:
    model = insert(Net(), ["layer1"])
    del model.layer1_attn
    return model


def _called_twice() -> int:
    model = Net()
    model.forward = lambda x: model.head(model.layer1(model.layer1(model.stem(x))))
    insert(model, ["layer1"], "dsa")
    calls = []
    model.layer1_attn.register_forward_hook(lambda *_: calls.append(1))
    model(X)
    assert isinstance(model.layer1_attn, DynamicSpatialAttention)
    return len(calls)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adversarial_insert(case: Case) -> None:
    assert_outcome(case)


def test_outcome_counts() -> None:
    """The counts the issue's adversarial table reports for insert_attention."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert Counter(c.outcome for c in CASES) == {"clear": 39, "correct": 16}
    assert Counter(c.outcome for c in SURGERY_CASES) == {"clear": 11, "correct": 9}
