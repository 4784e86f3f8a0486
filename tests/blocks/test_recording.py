"""The recording protocol: what blocks record, that it changes nothing, holders, copies, compile."""

import copy
import pickle
import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_attn.core
from lightning_attn.blocks import (
    AttentionBlock,
    CoordinateAttention,
    DynamicSpatialAttention,
    RecordingMixin,
    quick_mask_check,
    spatial_map,
)
from lightning_attn.core import MaskCollapseWarning, RecordingConfig
from lightning_attn.core.statistics import MaskStats, block_stats, quantities

from . import seed_reference as seed
from ._util import (
    BACKENDS,
    COORD_C,
    COORD_CASES,
    DSA_CASES,
    assert_runs_match,
    lib_coord_from,
    run_block,
    seed_coord,
)

EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)
CONFIG = RecordingConfig(histogram_bins=10)


def _record(block, *xs):
    """Run ``block`` on each ``x`` with recording on; return its BlockStats."""
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    for x in xs:
        block(x)
    stats = block_stats(block.statistics_layout, block.recorded_statistics().tolist())
    block.stop_recording()
    return stats


def _check_mask(got, mask):
    m = mask.detach().double().flatten()
    assert got.count == m.numel()
    assert got.mean == pytest.approx(m.mean().item(), abs=1e-7)
    assert got.std == pytest.approx(m.std().item(), abs=1e-7)
    assert (got.min, got.max) == (pytest.approx(m.min().item()), pytest.approx(m.max().item()))
    assert got.sat_low == pytest.approx((m < 0.05).double().mean().item())


@EACH_BACKEND
def test_dsa_records_its_mask_and_router(backend):
    torch.manual_seed(0)
    block = DynamicSpatialAttention(backend=backend, return_router_weights=True).eval()
    xs = [3 * torch.randn(2, 6, 9, 7), 3 * torch.randn(3, 6, 9, 7)]
    stats = _record(block, *xs)
    outs = [block(x) for x in xs]
    mask = torch.cat([o[1] for o in outs])
    rw = torch.cat([o[2] for o in outs]).double()
    assert stats.forwards == 2
    _check_mask(stats.masks["mask"], mask)
    ent = -(rw * rw.log()).sum(1).mean().item()
    assert stats.router.entropy == pytest.approx(ent, abs=1e-6)
    assert stats.router.usage == pytest.approx(tuple(rw.mean(0).tolist()), abs=1e-6)
    assert sum(stats.histograms["mask"]) == mask.numel()
    assert sum(stats.histograms["router"]) == rw.numel()


@EACH_BACKEND
def test_coord_records_both_axis_masks(backend):
    torch.manual_seed(0)
    block = CoordinateAttention(COORD_C, **COORD_CASES["all"][0], backend=backend).eval()
    x = torch.randn(3, COORD_C, 7, 5)
    stats = _record(block, x)
    a_h, a_w = block._masks(x, "plain", None)
    assert set(stats.masks) == {"mask_h", "mask_w"} and stats.router is None
    _check_mask(stats.masks["mask_h"], a_h)
    _check_mask(stats.masks["mask_w"], a_w)


@pytest.mark.parametrize(
    "make",
    [lambda b: DynamicSpatialAttention(learnable_temperature=True, backend=b,
                                       return_router_weights=True),
     lambda b: CoordinateAttention(COORD_C, **COORD_CASES["all"][0], backend=b)],
    ids=["dsa", "coord"],
)
@EACH_BACKEND
def test_recording_changes_no_output_or_gradient(make, backend):
    torch.manual_seed(1)
    block = make(backend)
    twin = copy.deepcopy(block)
    x = torch.randn(2, COORD_C, 6, 5)
    plain = run_block(twin, x)
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    block.start_capture()
    recorded = run_block(block, x)
    assert_runs_match(recorded, plain, 0.0, "recording")


def test_off_by_default_and_never_in_the_state_dict():
    block = DynamicSpatialAttention()
    assert not block.recording and not block.capture and block.accumulator is None
    block(torch.randn(1, 2, 4, 4))  # record() without configuration is a no-op
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    block(torch.randn(1, 2, 4, 4))
    assert set(block.state_dict()) == set(DynamicSpatialAttention().state_dict())
    assert not any(t is block.accumulator.values for t in block.buffers())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_recording_state_does_not_travel_with_copies(how):
    block = CoordinateAttention(8)
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    block.start_capture()
    block(torch.randn(2, 8, 4, 4))
    clone = copy.deepcopy(block) if how == "deepcopy" else pickle.loads(pickle.dumps(block))
    assert not clone.recording and not clone.capture
    assert clone.accumulator is None and clone.captured_map is None
    assert block.recording and block.captured_map is not None


def test_holders_share_one_window_and_the_first_empties_it():
    block = DynamicSpatialAttention()
    x = torch.rand(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="configure_recording"):
        block.start_recording()
    block.configure_recording(CONFIG, "cpu")
    assert block.start_recording("a") is True
    block(x)
    assert block.start_recording("b") is False  # joins the open window: nothing emptied
    block(x)
    assert block.recorded_statistics()[0] == 2
    block.stop_recording("a")
    assert block.recording
    block.stop_recording("b")
    assert not block.recording and block.recorded_statistics()[0] == 2  # kept until next window
    block(x)
    assert block.recorded_statistics()[0] == 2  # off: nothing added
    assert block.start_recording("a") is True  # the first holder of a new window
    assert block.recorded_statistics()[0] == 0
    with pytest.raises(RuntimeError, match="reconfigured"):  # wider, while recording
        block.configure_recording(RecordingConfig(histogram_bins=20), "cpu")
    with pytest.raises(ValueError, match="same saturation thresholds"):
        block.configure_recording(RecordingConfig(saturation_low=0.1), "cpu")
    block.configure_recording(RecordingConfig(histogram_bins=0), "cpu")  # narrower: kept
    assert block.statistics_layout.histogram_bins == 10


def test_capture_keeps_the_spatial_map_while_held():
    block = CoordinateAttention(8).eval()
    x = torch.randn(3, 8, 5, 6)
    block.start_capture("maps")
    block.start_capture("metric")
    block(x)
    a_h, a_w = block._masks(x, "plain", None)
    want = (a_h * a_w).mean(dim=1, keepdim=True)
    torch.testing.assert_close(block.captured_map, want)
    assert block.captured_map.shape == (3, 1, 5, 6) and not block.captured_map.requires_grad
    block.stop_capture("metric")
    assert block.captured_map is not None
    block.stop_capture("maps")
    assert not block.capture and block.captured_map is None


def test_spatial_map():
    dsa = torch.rand(2, 1, 4, 5)
    assert torch.equal(spatial_map({"mask": dsa}), dsa)
    a_h, a_w = torch.rand(2, 3, 4, 1), torch.rand(2, 3, 1, 5)
    torch.testing.assert_close(spatial_map({"mask_h": a_h, "mask_w": a_w}),
                               (a_h * a_w).mean(1, keepdim=True))
    assert spatial_map({"v": torch.rand(2, 3)}) is None and spatial_map({}) is None


# --------------------------------------------------------------------------------------
# attention_parameters / trainable_attention_parameters / the protocol
# --------------------------------------------------------------------------------------


def test_trainable_attention_parameters_dsa():
    learn = DynamicSpatialAttention(learnable_temperature=True, temperature=3.0)
    tap = learn.trainable_attention_parameters()
    assert set(tap) == {"temperature"} and tap["temperature"] is learn.t_raw
    assert isinstance(tap["temperature"], nn.Parameter)
    assert DynamicSpatialAttention().trainable_attention_parameters() == {}
    params = learn.attention_parameters()
    assert set(params) == {"temperature"} and not params["temperature"].requires_grad
    assert abs(float(params["temperature"]) - 3.0) < 1e-5


@pytest.mark.parametrize(
    "kwargs, expected",
    [({}, set()), ({"learnable_alpha": True}, {"alpha"}),
     ({"per_axis_alpha": True}, set()),
     ({"per_axis_alpha": True, "learnable_alpha": True}, {"alpha_h", "alpha_w"}),
     ({"beta": 0.5}, set()), ({"beta": 0.5, "learnable_beta": True}, {"beta"}),
     ({"beta": 0.5, "learnable_beta": True, "learnable_alpha": True}, {"alpha", "beta"})],
)
def test_trainable_attention_parameters_coord(kwargs, expected):
    block = CoordinateAttention(COORD_C, **kwargs)
    tap = block.trainable_attention_parameters()
    assert set(tap) == expected
    for name, p in tap.items():
        assert p is getattr(block, name) and isinstance(p, nn.Parameter)
    for name, t in block.attention_parameters().items():
        assert t.dim() == 0 and not t.requires_grad, name


def test_blocks_speak_the_protocol():
    assert isinstance(DynamicSpatialAttention(), AttentionBlock)
    assert isinstance(CoordinateAttention(8), AttentionBlock)
    assert not isinstance(nn.Conv2d(1, 1, 1), AttentionBlock)
    assert DynamicSpatialAttention(kernels=(5,), use_dilated=False).branch_names == ("5x5",)


# --------------------------------------------------------------------------------------
# A user's own block, compiled
# --------------------------------------------------------------------------------------


class UserGate(RecordingMixin, nn.Module):
    """The README's example of a user's block."""

    mask_names = ("mask",)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        mask = torch.sigmoid(self.conv(x))
        self.record(masks={"mask": mask})
        return x * mask


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor",
                                                                 marks=pytest.mark.slow)])
def test_user_block_records_the_same_compiled_with_one_extra_graph(dynamo_reset, backend):
    torch.manual_seed(0)
    block = UserGate(3)
    x = torch.randn(4, 3, 8, 8)
    eager = _record(block, x).masks["mask"]
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    block.configure_recording(CONFIG, "cpu")
    values = []
    for step in range(6):  # a logging step every other step
        on = step % 2 == 1
        if on:
            block.start_recording()
        compiled(x).sum().backward()
        if on:
            values.append(block_stats(block.statistics_layout,
                                      block.recorded_statistics().tolist()).masks["mask"])
            block.stop_recording()
    assert counter.frame_count == 2  # one graph without recording, one with: no recompile
    assert torch._dynamo.utils.counters["graph_break"] == {}
    for got in values:
        assert got.count == eager.count
        assert got.mean == pytest.approx(eager.mean, rel=1e-4)
        assert got.std == pytest.approx(eager.std, rel=1e-4)


# --------------------------------------------------------------------------------------
# quick_mask_check
# --------------------------------------------------------------------------------------


def _collapse_warnings(record):
    return [w for w in record if issubclass(w.category, MaskCollapseWarning)]


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_quick_mask_check_coord_matches_the_seed(mode):
    ref = seed_coord({})
    block = lib_coord_from(ref, {}, backend="torch").train(mode)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = 3 * torch.randn(4, COORD_C, 8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = quick_mask_check(block, x)
    assert _collapse_warnings(record) == []
    assert block.training is mode  # mode restored
    for k, v in block.state_dict().items():  # ran in eval: BN statistics untouched
        assert torch.equal(v, before[k]), k
    seed.quick_mask_check(ref, x)  # the seed's own check (prints)
    want = ref.last_mask_stats()
    assert set(stats) == {"mask_h", "mask_w"}  # the seed's a_h, a_w
    for name, axis in (("mask_h", "a_h"), ("mask_w", "a_w")):
        for key in ("min", "mean", "max", "std"):
            assert abs(getattr(stats[name], key) - want[axis][key]) <= 1e-6, (axis, key)
    assert not block.recording and block.accumulator is None


def test_quick_mask_check_coord_collapsed_warns():
    block = CoordinateAttention(COORD_C).train()
    with torch.no_grad():
        block.conv_h.weight.zero_()
        block.conv_h.bias.zero_()  # a_h = sigmoid(0) = 0.5 everywhere
    x = torch.randn(2, COORD_C, 6, 7)
    with pytest.warns(MaskCollapseWarning) as record:
        stats = quick_mask_check(block, x)
    assert stats["mask_h"].std == 0.0 and stats["mask_h"].mean == 0.5
    messages = [str(w.message) for w in record if issubclass(w.category, MaskCollapseWarning)]
    assert any("mask_h" in m for m in messages)
    assert not any("mask_w" in m for m in messages)
    assert block.training
    assert issubclass(MaskCollapseWarning, lightning_attn.core.AttentionWarning)
    assert issubclass(MaskCollapseWarning, UserWarning)


def test_quick_mask_check_dsa_keeps_a_running_recording():
    block = DynamicSpatialAttention().train()
    x = 3 * torch.randn(2, 6, 9, 9)
    block.configure_recording(CONFIG, "cpu")
    block.start_recording("callback")
    block(x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = quick_mask_check(block, x)
    assert _collapse_warnings(record) == []
    assert set(stats) == {"mask"} and block.training
    # the callback's window is untouched: still recording, still one forward
    assert block.recording and block.recorded_statistics()[0] == 1
    _, mask = block(x)
    assert abs(stats["mask"].std - float(mask.detach().std())) < 1e-6
    with torch.no_grad():
        for br in block.branches:
            br.weight.zero_()
    with pytest.warns(MaskCollapseWarning, match="mask"):
        stats = quick_mask_check(block, x)
    assert stats["mask"].std == 0.0


def test_quick_mask_check_threshold_and_bad_module():
    block = CoordinateAttention(COORD_C)
    x = torch.randn(2, COORD_C, 5, 5)
    with pytest.warns(MaskCollapseWarning):
        quick_mask_check(block, x, std_threshold=0.99)
    with pytest.raises(ValueError, match="std_threshold"):
        quick_mask_check(block, x, std_threshold=-1)
    with pytest.raises(TypeError, match="records no masks"):
        quick_mask_check(nn.Conv2d(COORD_C, COORD_C, 1), x)


@pytest.mark.parametrize(
    "make",
    [lambda: DynamicSpatialAttention(**DSA_CASES["all"]),
     lambda: CoordinateAttention(COORD_C, **COORD_CASES["all"][0])],
    ids=["dsa_all", "coord_all"],
)
def test_blocks_record_the_same_compiled(make, dynamo_reset):
    """Both blocks under torch.compile(fullgraph=True) through AOTAutograd (input mutation of
    the accumulator, functionalised): the same statistics as eager, no graph break."""
    torch.manual_seed(3)
    block = make()
    eager = copy.deepcopy(block)
    x = torch.randn(3, COORD_C, 6, 7)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    out = compiled(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    got = block_stats(block.statistics_layout, block.recorded_statistics().tolist())
    want = _record(eager, x)
    assert counter.frame_count == 1 and torch._dynamo.utils.counters["graph_break"] == {}
    assert got.forwards == want.forwards == 1
    for name, m in want.masks.items():
        for field in (q.name for q in quantities(MaskStats) if q.value is not None):
            assert getattr(got.masks[name], field) == pytest.approx(getattr(m, field), rel=1e-5)
    if want.router is not None:
        assert got.router.usage == pytest.approx(want.router.usage, rel=1e-5)
        assert got.router.entropy == pytest.approx(want.router.entropy, rel=1e-5)
    assert got.histograms == want.histograms


def test_compiled_forwards_count_histograms_only_when_asked_in_one_graph(dynamo_reset):
    """The histogram counts of a compiled forward are decided as the graph runs: zeros at a
    point that writes none, eager's counts at one that does, and no recompilation between."""
    torch.manual_seed(4)
    block = DynamicSpatialAttention(**DSA_CASES["all"])
    eager = copy.deepcopy(block)
    x = torch.randn(3, COORD_C, 6, 7)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    block.configure_recording(CONFIG, "cpu")
    seen = []
    for histograms in (False, True, False):
        block.start_recording(histograms=histograms)
        compiled(x)
        seen.append(block_stats(block.statistics_layout,
                                block.recorded_statistics().tolist()).histograms)
        block.stop_recording()
    want = _record(eager, x).histograms
    assert sum(want["mask"]) == x.shape[0] * 6 * 7 and sum(want["router"]) > 0
    assert seen[1] == want
    for point in (seen[0], seen[2]):
        assert set(point) == set(want) and all(sum(c) == 0 for c in point.values())
    assert counter.frame_count == 1


def test_recording_what_was_not_declared_is_a_clear_error():
    block = UserGate(3)
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    with pytest.raises(ValueError, match=r"masks \['other'\].*mask_names=\('mask',\)"):
        block.record(masks={"other": torch.rand(2, 1, 4, 4)})
    with pytest.raises(ValueError, match="num_branches=None"):
        block.record(masks={}, router_weights=torch.rand(2, 3))
    block.stop_recording()
    block.record(masks={"other": torch.rand(2, 1, 4, 4)})  # not recording: nothing checked


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_under_bf16_autocast(backend):
    torch.manual_seed(2)
    block = DynamicSpatialAttention(backend=backend)
    x = torch.randn(2, 6, 8, 8)
    block.configure_recording(CONFIG, "cpu")
    block.start_recording()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mask = block(x)
    got = block_stats(block.statistics_layout, block.recorded_statistics().tolist())
    _check_mask(got.masks["mask"], mask)


# --------------------------------------------------------------------------------------
# Recomputation: activation checkpointing records each forward once, compiled too
# --------------------------------------------------------------------------------------


class Checkpointed(nn.Module):
    """A UserGate run under torch.utils.checkpoint; ``gate`` may be the gate compiled alone."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block = UserGate(3)
        self.gate = self.block
        self.reentrant = reentrant

    def forward(self, x):
        return checkpoint(self.gate, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor",
                                                                 marks=pytest.mark.slow)])
@pytest.mark.parametrize("compiled", ["model", "gate alone"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_records_each_forward_once_compiled(reentrant, compiled, backend,
                                                           dynamo_reset):
    # "model": checkpointing inside the compiled graph (its backward recomputes from the
    # graph); "gate alone": a compiled block called by an eager checkpoint, whose graph runs
    # again in backward (the recording asks, when the graph runs, whether it is a rerun).
    model = Checkpointed(reentrant)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    want = _record(model.block, x).masks["mask"]
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    if compiled == "model":
        run = torch.compile(model, backend=counter, fullgraph=True)
    else:
        model.gate, run = torch.compile(model.block, backend=counter, fullgraph=True), model
    model.block.configure_recording(CONFIG, "cpu")
    frames = []
    for step in range(6):  # a logging step every other step
        on = step % 2 == 1
        if on:
            model.block.start_recording()
        run(x).sum().backward()
        if on:
            got = block_stats(model.block.statistics_layout,
                              model.block.recorded_statistics().tolist())
            model.block.stop_recording()
            assert got.forwards == 1
            assert got.masks["mask"].count == want.count
            assert got.masks["mask"].std == pytest.approx(want.std, rel=1e-4)
            assert got.histograms["mask"] == _record(model.block, x).histograms["mask"]
        frames.append(counter.frame_count)
    assert torch._dynamo.utils.counters["graph_break"] == {}
    assert frames[1] == frames[-1]  # graphs made by the first logging step, none after
