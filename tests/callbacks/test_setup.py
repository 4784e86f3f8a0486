"""Constructor checks, presets, block discovery, state keys and pickling."""

import dataclasses
import pickle

import pytest
from torch import nn

from lightning_attn.blocks import (
    CoordinateAttention,
    DynamicSpatialAttention,
    find_attention_blocks,
)
from lightning_attn.callbacks import (
    AttentionDiagnostics,
    AttentionMapLogger,
    AttentionSummary,
    MaskHealthMonitor,
    ParameterTrajectoryMonitor,
    RouterEntropyMonitor,
)
from lightning_attn.core import HealthThresholds

from .cb_models import FakeBlock, TinyAttnNet, make_trainer

ALL = [
    RouterEntropyMonitor,
    MaskHealthMonitor,
    ParameterTrajectoryMonitor,
    AttentionSummary,
    AttentionMapLogger,
    AttentionDiagnostics,
]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"log_every_n_steps": -1}, "log_every_n_steps"),
        ({"log_every_n_steps": 1.5}, "log_every_n_steps"),
        ({"histogram_every_n_steps": -5}, "histogram_every_n_steps"),
        ({"on_problem": "shout"}, "on_problem"),
        ({"include": [""]}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"saturation_low": -0.1}, "saturation_low"),
        ({"saturation_high": 1.5}, "saturation_high"),
        ({"saturation_low": 0.6, "saturation_high": 0.4}, "saturation_low"),
        ({"std_threshold": float("nan")}, "std_threshold"),
        ({"saturation_threshold": 2}, "saturation_threshold"),
        ({"router_collapse_threshold": -1}, "router_collapse_threshold"),
        ({"router_indifference_threshold": 1.1}, "indifference_threshold"),
        ({"indifference_warmup_steps": -1}, "indifference_warmup_steps"),
        ({"dead_branch_factor": 3}, "dead_branch_factor"),
        ({"temperature_min": 0.0}, "temperature_min"),
        ({"unit_margin": 2.0}, "unit_margin"),
        ({"temperature_min": 5.0, "temperature_max": 2.0}, "temperature_min"),
        ({"overlay_alpha": 1.5}, "overlay_alpha"),
        ({"num_images": -1}, "num_images"),
        ({"thresholds": {"std_threshold": 0.1}}, "thresholds"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cls(**kwargs)


def test_sections_are_checked_and_presets_fix_theirs():
    with pytest.raises(ValueError, match=r"sections\[1\]"):
        AttentionDiagnostics(sections=["mask", "masks"])
    assert AttentionDiagnostics(sections="mask").sections == ("mask",)
    with pytest.raises(TypeError, match="sections"):
        AttentionDiagnostics(sections=None)
    assert RouterEntropyMonitor().sections == ("router",)
    assert MaskHealthMonitor().sections == ("mask",)
    assert ParameterTrajectoryMonitor().sections == ("param",)
    assert AttentionMapLogger().sections == () and AttentionMapLogger(3).num_images == 3
    summary = AttentionSummary()
    assert not summary.log_statistics and summary.on_problem == "ignore" and summary.summary
    with pytest.raises(TypeError, match="fixes"):
        MaskHealthMonitor(sections=["router"])


def test_flat_thresholds_override_the_thresholds_object_for_one_release():
    base = HealthThresholds(std_threshold=0.1, dead_branch_factor=0.2)
    with pytest.warns(FutureWarning, match=r"thresholds=HealthThresholds\(std_threshold"):
        cb = AttentionDiagnostics(thresholds=base, std_threshold=0.05)
    assert cb.thresholds == HealthThresholds(std_threshold=0.05, dead_branch_factor=0.2)
    assert AttentionDiagnostics().thresholds == HealthThresholds()
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['std'\\]"):
        AttentionDiagnostics(std=0.1)


def test_only_the_old_threshold_keywords_are_deprecated_never_a_new_field():
    from lightning_attn.callbacks.diagnostics import _DEPRECATED

    fields = [f.name for f in dataclasses.fields(HealthThresholds)]
    for name in _DEPRECATED:  # every old keyword still works, with a FutureWarning
        with pytest.warns(FutureWarning, match=f"HealthThresholds\\({name}="):
            AttentionDiagnostics(**{name: getattr(HealthThresholds(), name)})
    newer = [f for f in fields if f not in _DEPRECATED]
    assert "recovery_margin" in newer
    for name in newer:  # a field added since is a field only
        with pytest.raises(TypeError, match=f"unexpected keyword arguments \\['{name}'\\]; "
                           f"{name} go in thresholds=HealthThresholds"):
            AttentionDiagnostics(**{name: getattr(HealthThresholds(), name)})


def test_constructor_is_small_and_booleans_are_booleans():
    import inspect

    params = [p for p in inspect.signature(AttentionDiagnostics).parameters.values()
              if p.kind is not p.VAR_KEYWORD]
    # 12 options, plus the adapters and writers this callback alone uses (state lives in
    # instances, not in process-wide registries)
    assert len(params) <= 14
    for name in ("summary", "eval_statistics", "log_statistics"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            AttentionDiagnostics(**{name: "no"})


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
    names = ["backbone.0", "neck.coord", "user", "sub"]
    assert list(find_attention_blocks(model)[0]) == names
    # A DataParallel wrapper is looked through: no ``module.`` prefix.
    assert list(find_attention_blocks(nn.DataParallel(model))[0]) == names
    blocks, unmatched = find_attention_blocks(model, include=["backbone.*", "neck.*", "head.*"])
    assert list(blocks) == ["backbone.0", "neck.coord"] and unmatched == ["head.*"]
    assert list(find_attention_blocks(model, exclude=["user", "s*"])[0]) == names[:2]


def test_unmatched_pattern_warns_when_fitting(tmp_path):
    with pytest.warns(UserWarning, match=r"'head\.\*' matches no attention block"):
        make_trainer(tmp_path, [AttentionDiagnostics(include=["head.*", "dsa"])],
                     max_steps=1).fit(TinyAttnNet())


def test_block_layouts_come_from_the_protocol(tmp_path):
    cb = AttentionDiagnostics(num_images=0)
    model = _Wrapper()
    blocks, _ = find_attention_blocks(model)
    cb._collector.bind(blocks, "cpu")
    infos = {i.name: i for i in cb._collector.infos}
    dsa = infos["backbone.0"]
    assert (dsa.layout.mask_names, dsa.layout.num_branches, dsa.param_names) == (
        ("mask",), 3, ("temperature",)
    )
    assert dsa.branch_names == ("3x3", "7x7", "7x7 d2")
    coord = infos["neck.coord"]
    assert coord.layout.mask_names == ("mask_h", "mask_w") and coord.layout.num_branches is None
    user = infos["user"]
    assert (user.layout.mask_names, user.layout.num_branches, user.trainable_names) == (
        ("mask",), 3, ("temperature",)
    )
    cb._collector.unbind()
    assert all(b.accumulator is None for b in blocks.values())


def test_state_key_follows_what_is_watched_not_the_thresholds():
    a = MaskHealthMonitor(include=["a*"])
    b = MaskHealthMonitor(include=["b*"])
    assert a.state_key != b.state_key
    assert MaskHealthMonitor().state_key == MaskHealthMonitor(
        thresholds=HealthThresholds(std_threshold=0.5)).state_key
    assert MaskHealthMonitor().state_key != RouterEntropyMonitor().state_key
    assert AttentionDiagnostics().state_key == AttentionDiagnostics(
        log_every_n_steps=7, on_problem="raise", num_images=2).state_key


def test_callbacks_pickle_before_and_after_fit(tmp_path):
    diag = AttentionDiagnostics(log_every_n_steps=1, on_problem="ignore", num_images=2)
    pickle.loads(pickle.dumps(diag))
    model = TinyAttnNet()
    make_trainer(tmp_path, [diag], max_steps=2, limit_val_batches=1).fit(model)
    clone = pickle.loads(pickle.dumps(diag))
    assert clone.num_points == 2 and clone.block_names == []
    assert not clone._collector.is_open and clone.thresholds == diag.thresholds
    # The model pickles too, without recording state.
    model.dsa.configure_recording(diag._collector.config, "cpu")
    model.dsa.start_recording()
    copy = pickle.loads(pickle.dumps(model))
    assert not copy.dsa.recording and copy.dsa.accumulator is None
