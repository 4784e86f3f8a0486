"""Constructor checks, block discovery, state keys and pickling."""

import pickle

import pytest
from cb_models import FakeBlock, TinyAttnNet, make_trainer
from torch import nn

from lightning_attn import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.callbacks import (
    AttentionDiagnostics,
    AttentionMapLogger,
    AttentionSummary,
    MaskHealthMonitor,
    ParameterTrajectoryMonitor,
    RouterEntropyMonitor,
    describe_block,
    find_attention_blocks,
)

ALL_STATS = [
    RouterEntropyMonitor,
    MaskHealthMonitor,
    ParameterTrajectoryMonitor,
    AttentionSummary,
    AttentionDiagnostics,
]


@pytest.mark.parametrize("cls", ALL_STATS)
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"log_every_n_steps": -1}, "log_every_n_steps"),
        ({"log_every_n_steps": 1.5}, "log_every_n_steps"),
        ({"on_problem": "shout"}, "on_problem"),
        ({"include": [""]}, "include"),
        ({"exclude": 3}, "exclude"),
    ],
)
def test_common_bad_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (MaskHealthMonitor, {"saturation_low": -0.1}, "saturation_low"),
        (MaskHealthMonitor, {"saturation_high": 1.5}, "saturation_high"),
        (MaskHealthMonitor, {"saturation_low": 0.6, "saturation_high": 0.4}, "saturation_low"),
        (MaskHealthMonitor, {"std_threshold": float("nan")}, "std_threshold"),
        (MaskHealthMonitor, {"saturation_threshold": 2}, "saturation_threshold"),
        (MaskHealthMonitor, {"histogram_every_n_steps": -5}, "histogram_every_n_steps"),
        (RouterEntropyMonitor, {"router_collapse_threshold": -1}, "router_collapse_threshold"),
        (RouterEntropyMonitor, {"router_indifference_threshold": 1.1}, "indifference_threshold"),
        (RouterEntropyMonitor, {"indifference_warmup_steps": -1}, "indifference_warmup_steps"),
        (RouterEntropyMonitor, {"dead_branch_factor": 3}, "dead_branch_factor"),
        (AttentionDiagnostics, {"num_images": -1}, "num_images"),
        (AttentionDiagnostics, {"overlay_alpha": 1.5}, "overlay_alpha"),
        (AttentionMapLogger, {"num_images": 0}, "num_images"),
        (AttentionMapLogger, {"tag": ""}, "tag"),
    ],
)
def test_specific_bad_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(DynamicSpatialAttention(), nn.Identity())
        self.neck = nn.ModuleDict({"coord": CoordinateAttention(8, min_mid_channels=4)})
        self.user = FakeBlock()

        class MyDSA(DynamicSpatialAttention):
            pass

        self.sub = MyDSA()


def test_find_blocks_by_qualified_name_with_patterns():
    model = _Wrapper()
    assert list(find_attention_blocks(model)) == ["backbone.0", "neck.coord", "user", "sub"]
    # A DataParallel wrapper is looked through: no ``module.`` prefix.
    assert list(find_attention_blocks(nn.DataParallel(model))) == list(
        find_attention_blocks(model)
    )
    assert list(find_attention_blocks(model, include=["backbone.*", "neck.*"])) == [
        "backbone.0",
        "neck.coord",
    ]
    assert list(find_attention_blocks(model, exclude=["user", "s*"])) == [
        "backbone.0",
        "neck.coord",
    ]


def test_unmatched_pattern_warns():
    with pytest.warns(UserWarning, match="'head.\\*' matches no attention block"):
        find_attention_blocks(_Wrapper(), include=["head.*"])


def test_describe_block_layouts():
    model = _Wrapper()
    dsa = describe_block("a", model.backbone[0])
    assert (dsa.mask_names, dsa.num_branches, dsa.param_names) == (("mask",), 3, ("temperature",))
    coord = describe_block("c", CoordinateAttention(8, per_axis_alpha=True, learnable_alpha=True))
    assert coord.mask_names == ("mask_h", "mask_w") and coord.num_branches is None
    assert coord.param_names == ("alpha_h", "alpha_w") == coord.trainable_names
    user = describe_block("u", model.user)
    assert (user.mask_names, user.num_branches, user.trainable_names) == (
        ("mask",), 3, ("temperature",)
    )


def test_state_keys_are_distinct():
    a = MaskHealthMonitor(include=["a*"])
    b = MaskHealthMonitor(include=["b*"])
    c = MaskHealthMonitor(log_every_n_steps=5)
    assert len({a.state_key, b.state_key, c.state_key}) == 3
    assert AttentionDiagnostics().state_key != AttentionDiagnostics(num_images=2).state_key
    assert AttentionMapLogger(4).state_key != AttentionMapLogger(8).state_key


def test_callbacks_pickle_before_and_after_fit(tmp_path):
    diag = AttentionDiagnostics(log_every_n_steps=1, on_problem="ignore", num_images=2)
    pickle.loads(pickle.dumps(diag))
    model = TinyAttnNet()
    make_trainer(tmp_path, [diag], max_steps=2, limit_val_batches=1).fit(model)
    clone = pickle.loads(pickle.dumps(diag))
    assert clone.num_points == 2 and clone._collector._handles == []
    assert clone._collector._buffer is None and clone._blocks == {}
    # The model pickles too (observers never travel with it).
    pickle.loads(pickle.dumps(model))
