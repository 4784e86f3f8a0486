"""insert_attention on a user's own backbones: keys kept, pretrained weights load, outputs
are block(original(x)), and the model stays an ordinary module (compile, copy, pickle)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lightning_attn.blocks import (
    CoordinateAttention,
    DynamicSpatialAttention,
    find_attention_blocks,
)
from lightning_attn.modules import (
    first_tensor,
    infer_out_channels,
    insert_attention,
    inserted_attention,
    remove_attention,
)

from .reference_backbones import ResNet18, StagedNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (stride, cin) != (1, cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.skip is None else self.skip(x)))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


X = torch.rand(2, 3, 16, 16)
IMG = torch.rand(2, 3, 64, 64)


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    return find_attention_blocks(model)[0]  # what the diagnostics watch


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Different, non-default values in every parameter and BatchNorm statistic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model.eval()


# -- the state dict --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "after", "name", "hosts"),
    [
        (ResNet18, ["layer1", "layer2", "layer3"], "dsa",
         ["layer1_attn", "layer2_attn", "layer3_attn"]),
        (ResNet18, ["layer2", "layer3"], "coord", ["layer2_attn", "layer3_attn"]),
        (StagedNet, ["stages.1", "stages.2"], "coord", ["stages_1_attn", "stages_2_attn"]),
        (StagedNet, ["stages.0", "stages.1", "stages.2"], "dsa",
         ["stages_0_attn", "stages_1_attn", "stages_2_attn"]),
    ],
)
def test_pretrained_weights_load_after_insertion(make, after, name, hosts) -> None:
    pretrained = _randomise(make(), seed=0).state_dict()
    if make is ResNet18:
        assert len(pretrained) == 122  # as torchvision's resnet18

    model = insert_attention(make(), after=after, name=name)
    keys = list(model.state_dict())
    assert keys[: len(pretrained)] == list(pretrained)  # every key kept, in its place
    new = keys[len(pretrained):]
    assert new and all(k.split(".")[0] in hosts for k in new)
    assert list(_blocks(model)) == hosts  # named_modules (the diagnostics) find them

    result = model.load_state_dict(pretrained, strict=False)
    assert result.unexpected_keys == []
    # (BatchNorm fills a missing num_batches_tracked itself, so it is never listed)
    assert sorted(result.missing_keys) == sorted(
        k for k in new if not k.endswith("num_batches_tracked")
    )
    for key, value in pretrained.items():
        assert torch.equal(model.state_dict()[key], value), key

    # The reverse order: a checkpoint of the inserted model loads strictly into a fresh
    # model after the same insertion, and drops only its blocks' keys into a plain one.
    trained = _randomise(model, seed=1).state_dict()
    again = insert_attention(make(), after=after, name=name)
    again.load_state_dict(trained, strict=True)
    assert torch.equal(again.eval()(IMG), model(IMG))
    result = make().load_state_dict(trained, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(new)


def test_resnet18_output_is_block_of_original_output() -> None:
    original = _randomise(ResNet18(), seed=0)
    model = insert_attention(copy.deepcopy(original), after=["layer1", "layer2", "layer3"],
                             name="dsa", learnable_temperature=True)
    model.layer3.register_forward_hook(lambda *_: None)  # a user's own hook keeps working
    model.eval()
    h = original.stem(IMG)
    for i in (1, 2, 3):
        h = first_tensor(getattr(model, f"layer{i}_attn")(getattr(original, f"layer{i}")(h)))
    h = original.layer4(h)
    expected = original.fc(torch.flatten(original.avgpool(h), 1))
    torch.testing.assert_close(model(IMG), expected, rtol=0, atol=0)
    assert not torch.allclose(original(IMG), expected)  # the blocks do change the output


def test_staged_net_output_is_block_of_original_output() -> None:
    original = _randomise(StagedNet(), seed=0)
    model = insert_attention(copy.deepcopy(original), after=["stages.1", "stages.2"],
                             name="coord", reduction=4)
    model.eval()
    h = original.stages[0](original.stem(IMG))
    h = model.stages_1_attn(original.stages[1](h))
    h = model.stages_2_attn(original.stages[2](h))
    expected = original.forward_head(original.stages[3](h))
    torch.testing.assert_close(model(IMG), expected, rtol=0, atol=0)
    model.train()
    model(IMG).sum().backward()
    assert model.stages_1_attn.conv_h.weight.grad is not None


# -- where the blocks live -------------------------------------------------------------------


def test_block_lives_beside_its_target_outside_containers() -> None:
    model = insert_attention(
        ResNet18(), after=["layer1.0.bn2", "layer2.1", "layer3", "layer3.0"], name="dsa"
    )
    assert isinstance(model.layer1[0].bn2_attn, DynamicSpatialAttention)  # plain parent
    assert isinstance(model.layer2_1_attn, DynamicSpatialAttention)  # parent is a Sequential
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 2  # no extra layer
    assert set(inserted_attention(model)) == {"layer1.0.bn2", "layer2.1", "layer3", "layer3.0"}
    assert model(IMG).shape == (2, 10)

    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    insert_attention(seq, after=["1"], name="coord", channels=4)
    assert isinstance(seq[1].output_attn, CoordinateAttention) and len(seq) == 3
    assert seq(X).shape == (2, 4, 1, 1)

    # A container inside containers only: its last plain module holds the block.
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.ReLU())
    insert_attention(nested, after=["0"], channels=4)
    assert isinstance(nested[0][0].get_submodule("0_attn"), DynamicSpatialAttention)
    assert len(nested) == 2 and len(nested[0]) == 1 and nested(X).shape == (2, 4, 14, 14)
    empty = nn.Sequential(nn.Sequential(), nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"after '0'.*containers.*holds no plain module"):
        insert_attention(empty, after=["0"], channels=4)


def test_insert_dsa_after_layers() -> None:
    model = ResNetLike()
    out = insert_attention(model, after=["layer1", "layer2"], name="dsa", kernels=(3,))
    assert out is model
    assert isinstance(model.layer2_attn, DynamicSpatialAttention)
    assert model.layer2_attn.kernel_sizes == (3,)
    assert list(_blocks(model)) == ["layer1_attn", "layer2_attn"]
    assert model(X).shape == (2, 5)
    model(X).sum().backward()
    assert model.layer1_attn.branches[0].weight.grad is not None


# -- an ordinary module: compile, copy, pickle, remove ----------------------------------------


def test_compiles_with_no_graph_break() -> None:
    model = insert_attention(ResNetLike(), after=["layer1", "layer2"], name="dsa").eval()
    expected = model(X)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # raises on a break
    torch.testing.assert_close(compiled(X), expected)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_run_their_own_blocks(clone) -> None:
    model = insert_attention(ResNetLike(), after=["layer1"], name="coord", reduction=4).eval()
    twin = clone(model)
    torch.testing.assert_close(twin(X), model(X))
    assert twin.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        twin.layer1_attn.conv_h.bias.fill_(-30.0)  # the copy's block masks almost everything
    assert not torch.allclose(twin(X), model(X))
    remove_attention(twin)
    assert inserted_attention(model) == {"layer1": model.layer1_attn}


def test_remove_attention_restores_the_model() -> None:
    original = _randomise(ResNetLike(), seed=0)
    model = insert_attention(copy.deepcopy(original), after=["layer1", "layer2"], name="dsa")
    assert remove_attention(model, ["layer1"]) is model
    assert list(inserted_attention(model)) == ["layer2"]
    remove_attention(model)
    assert model.state_dict().keys() == original.state_dict().keys()
    torch.testing.assert_close(model(X), original(X), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no attention was inserted after 'layer1'"):
        remove_attention(model, ["layer1"])


def test_double_insertion_and_deleted_block_are_clear_errors() -> None:
    model = insert_attention(ResNetLike(), after=["layer1"], name="dsa")
    with pytest.raises(ValueError, match=r"'layer1' already has attention.*remove_attention"):
        insert_attention(model, after=["layer1"], name="coord", channels=8)
    del model.layer1_attn
    with pytest.raises(RuntimeError, match=r"'layer1_attn' inserted after 'layer1' was removed"):
        model(X)
    model.layer1_attn = nn.Identity()  # a user's attribute of that name is never overwritten
    model2 = ResNetLike()
    model2.layer1_attn = nn.Identity()
    with pytest.raises(ValueError, match=r"already has an attribute 'layer1_attn'"):
        insert_attention(model2, after=["layer1"])


def test_bad_keyword_leaves_the_model_untouched() -> None:
    model = ResNetLike()
    keys = list(model.state_dict())
    with pytest.raises(TypeError, match="kernelz"):
        insert_attention(model, after=["layer1", "layer2"], name="dsa", kernelz=3)
    assert list(model.state_dict()) == keys and inserted_attention(model) == {}


# -- channels --------------------------------------------------------------------------------


def test_insert_coord_infers_channels_every_way() -> None:
    model = ResNetLike()
    # stem: own out_channels; layer2: last submodule with num_features (bn2 = 16);
    # "layer1.0": from a forward hook on example_input.
    assert infer_out_channels(model, ["stem", "layer2"]) == {"stem": 8, "layer2": 16}
    assert infer_out_channels(model, ["layer1.0"], X) == {"layer1.0": 8}
    insert_attention(model, after=["stem", "layer1.0", "layer2"], name="coord",
                     example_input=X, reduction=4)
    chans = {n: b.in_channels for n, b in _blocks(model).items()}
    assert chans == {"stem_attn": 8, "layer1_0_attn": 8, "layer2_attn": 16}
    assert model.training  # the dummy pass restored train mode
    assert model(X).shape == (2, 5)


def test_explicit_channels() -> None:
    model = insert_attention(ResNetLike(), after=["layer1"], name="coord", channels={"layer1": 8})
    assert model.layer1_attn.in_channels == 8
    model = insert_attention(ResNetLike(), after=["layer2"], name="coord", channels=16)
    assert model(X).shape == (2, 5)


def test_non_feature_map_output_names_its_shape() -> None:
    with pytest.raises(ValueError, match=r"output of 'fc' is not a 4-D \(B, C, H, W\) feature "
                                         r"map: got shape \(2, 10\)"):
        insert_attention(ResNet18(), after=["fc"], example_input=IMG)
    model = ResNetLike()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match=r"'unused' was not called during the forward pass"):
        insert_attention(model, after=["unused"], example_input=X)
    model.pair = nn.Identity()
    model.forward = lambda x: model.head(model.layer2(model.pair((model.stem(x), x))[0]))
    with pytest.raises(ValueError, match=r"output of 'pair' is not .* an output of type tuple"):
        insert_attention(model, after=["pair"], example_input=X)
    with pytest.raises(ValueError, match=r"channels\['layer1'\]=4 but the output of 'layer1'.* 8"):
        insert_attention(ResNetLike(), after=["layer1"], channels=4, example_input=X)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"no submodule named 'layer3'.*'layer1'.*'layer2'"):
        insert_attention(ResNetLike(), after=["layer1", "layer3"])


@pytest.mark.parametrize(
    ("after", "kwargs", "error", "match"),
    [
        (["layer1"], {"name": "se"}, ValueError, "known names"),
        ("layer1", {}, TypeError, "list of submodule names"),
        ([], {}, TypeError, "list of submodule names"),
        (["layer1", "layer1"], {}, ValueError, "twice"),
        (["layer1"], {"channels": {"layer9": 3}}, ValueError, "layer9"),
        (["head.1"], {"name": "coord"}, ValueError, "cannot infer"),
        (["layer1"], {"channels": 4.0}, TypeError, "channels must be"),
        (["layer1"], {"channels": True}, TypeError, "channels must be"),
    ],
)
def test_bad_arguments(after, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        insert_attention(ResNetLike(), after=after, **kwargs)
