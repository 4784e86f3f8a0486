"""The observation point, attention parameters, last_mask_stats and quick_mask_check."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import lightning_attn
from lightning_attn import (
    AttentionObservation,
    CoordinateAttention,
    DynamicSpatialAttention,
    MaskCollapseWarning,
    ObservableAttention,
    quick_mask_check,
)

from . import seed_reference as seed
from ._util import (
    BACKENDS,
    COORD_C,
    COORD_CASES,
    assert_close,
    lib_coord_from,
    run_block,
    seed_coord,
)

EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)


class Recorder:
    def __init__(self):
        self.calls: list[tuple[nn.Module, AttentionObservation]] = []

    def __call__(self, block, obs):
        self.calls.append((block, obs))


def _all_tensors(obs: AttentionObservation):
    yield from obs.masks.values()
    if obs.router_weights is not None:
        yield obs.router_weights
    yield from obs.parameters.values()


# --------------------------------------------------------------------------------------
# What an observer receives
# --------------------------------------------------------------------------------------


@EACH_BACKEND
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed_T", "learnable_T"])
def test_dsa_observation(backend, learnable):
    block = DynamicSpatialAttention(
        temperature=1.7, learnable_temperature=learnable, return_router_weights=True,
        backend=backend,
    )
    rec = Recorder()
    block.attach_observer(rec)
    x = torch.randn(3, 5, 6, 7, requires_grad=True)
    y, mask, rw = block(x)
    assert len(rec.calls) == 1
    who, obs = rec.calls[0]
    assert who is block
    assert isinstance(obs, AttentionObservation)
    assert set(obs.masks) == {"mask"}
    assert torch.equal(obs.masks["mask"], mask.detach())
    assert torch.equal(obs.router_weights, rw.detach())
    assert set(obs.parameters) == {"temperature"}
    assert obs.parameters["temperature"].dim() == 0
    assert abs(float(obs.parameters["temperature"]) - 1.7) < 1e-6
    for t in _all_tensors(obs):
        assert not t.requires_grad and t.grad_fn is None
    # the returned tensors keep their graph
    assert mask.requires_grad and rw.requires_grad


def test_dsa_observation_has_router_weights_when_not_returned():
    block = DynamicSpatialAttention()
    rec = Recorder()
    block.attach_observer(rec)
    x = torch.randn(2, 4, 6, 6)
    out = block(x)
    assert len(out) == 2
    block.return_router_weights = True
    _, _, rw = block(x)
    assert rec.calls[0][1].router_weights.shape == (2, 3)
    assert torch.equal(rec.calls[0][1].router_weights, rw.detach())


@EACH_BACKEND
@pytest.mark.parametrize(
    "case, names",
    [("base", {"alpha"}), ("alpha_0.7_learnable", {"alpha"}),
     ("per_axis_alpha", {"alpha_h", "alpha_w"}), ("beta", {"alpha", "beta"}),
     ("all", {"alpha_h", "alpha_w", "beta"})],
)
def test_coord_observation(case, names, backend):
    lib_kw, seed_kw = COORD_CASES[case]
    ref = seed_coord(seed_kw)
    block = lib_coord_from(ref, lib_kw, backend)
    rec = Recorder()
    block.attach_observer(rec)
    x = torch.randn(2, COORD_C, 6, 7, requires_grad=True)
    block(x)
    ref(x)
    assert len(rec.calls) == 1
    who, obs = rec.calls[0]
    assert who is block
    assert set(obs.masks) == {"mask_h", "mask_w"}
    assert obs.masks["mask_h"].shape == (2, COORD_C, 6, 1)
    assert obs.masks["mask_w"].shape == (2, COORD_C, 1, 7)
    assert torch.equal(obs.masks["mask_h"], block._last_ah)
    assert torch.equal(obs.masks["mask_w"], block._last_aw)
    assert_close(obs.masks["mask_h"], ref._last_ah, 1e-6, "a_h vs seed")
    assert_close(obs.masks["mask_w"], ref._last_aw, 1e-6, "a_w vs seed")
    assert obs.router_weights is None
    assert set(obs.parameters) == names
    for name in names:
        assert float(obs.parameters[name]) == float(torch.as_tensor(getattr(block, name)).detach())
    for t in _all_tensors(obs):
        assert not t.requires_grad and t.grad_fn is None


@pytest.mark.parametrize(
    "make",
    [lambda f: DynamicSpatialAttention(learnable_temperature=True, backend=f,
                                       return_router_weights=True),
     lambda f: CoordinateAttention(COORD_C, **COORD_CASES["all"][0], backend=f)],
    ids=["dsa", "coord_all"],
)
@EACH_BACKEND
def test_observers_do_not_change_outputs_or_gradients(make, backend):
    torch.manual_seed(5)
    block = make(backend)
    watched = copy.deepcopy(block)
    seen = []
    watched.attach_observer(lambda b, o: seen.append(o.masks))
    watched.attach_observer(lambda b, o: [m.sum() for m in o.masks.values()])
    x = torch.randn(2, COORD_C, 6, 7)
    a = run_block(block, x)
    b = run_block(watched, x)
    assert len(seen) == 1
    for oa, ob in zip(a[0], b[0], strict=True):
        assert torch.equal(oa, ob)
    assert torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


@pytest.mark.parametrize(
    "make", [lambda: DynamicSpatialAttention(), lambda: CoordinateAttention(COORD_C)],
    ids=["dsa", "coord"],
)
def test_attach_remove_repeatedly(make):
    block = make()
    x = torch.randn(2, COORD_C, 5, 5)
    first, second = Recorder(), Recorder()
    for round_ in range(4):
        h1 = block.attach_observer(first)
        block(x)
        h2 = block.attach_observer(second)
        block(x)
        assert block.has_observers
        h1.remove()
        block(x)
        h2.remove()
        assert not block.has_observers
        block(x)
        assert len(first.calls) == 2 * (round_ + 1)
        assert len(second.calls) == 2 * (round_ + 1)
    h = block.attach_observer(first)
    h.remove()
    h.remove()  # removing twice is harmless
    block(x)
    assert len(first.calls) == 8


def test_observers_called_in_attach_order():
    block = DynamicSpatialAttention()
    order = []
    block.attach_observer(lambda b, o: order.append("a"))
    block.attach_observer(lambda b, o: order.append("b"))
    block(torch.randn(1, 3, 4, 4))
    assert order == ["a", "b"]


def test_attach_non_callable_raises():
    with pytest.raises(TypeError, match="observer"):
        DynamicSpatialAttention().attach_observer(42)


@pytest.mark.parametrize(
    "make", [lambda: DynamicSpatialAttention(), lambda: CoordinateAttention(COORD_C)],
    ids=["dsa", "coord"],
)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_observers_do_not_survive_copy(make, how):
    block = make()
    calls = []

    def observer(b, o):  # a closure: not picklable
        calls.append(b)

    block.attach_observer(observer)
    clone = copy.deepcopy(block) if how == "deepcopy" else pickle.loads(pickle.dumps(block))
    assert not clone.has_observers
    # the clone carries the original's state
    for (k, v), (k2, v2) in zip(block.state_dict().items(), clone.state_dict().items(),
                                strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(2, COORD_C, 5, 5)
    clone(x)
    assert calls == []
    block(x)
    assert calls == [block]  # the original keeps its observer
    # the clone is a working observable block of its own
    rec = Recorder()
    clone.attach_observer(rec)
    clone(x)
    assert len(rec.calls) == 1 and rec.calls[0][0] is clone
    assert len(calls) == 1


def test_observers_not_in_state_dict():
    block = CoordinateAttention(COORD_C)
    block.attach_observer(lambda b, o: None)
    assert not any("observer" in k for k in block.state_dict())


# --------------------------------------------------------------------------------------
# attention_parameters / trainable_attention_parameters
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
    assert isinstance(DynamicSpatialAttention(), ObservableAttention)
    assert isinstance(CoordinateAttention(8), ObservableAttention)
    assert not isinstance(nn.Conv2d(1, 1, 1), ObservableAttention)


# --------------------------------------------------------------------------------------
# quick_mask_check
# --------------------------------------------------------------------------------------


def _collapse_warnings(record):
    return [w for w in record if issubclass(w.category, MaskCollapseWarning)]


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_quick_mask_check_coord_healthy(mode):
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
    assert set(stats) == {"a_h", "a_w"}
    for axis in ("a_h", "a_w"):
        assert stats[axis]["std"] >= 0.02
        for key, value in want[axis].items():
            assert abs(stats[axis][key] - value) <= 1e-6, (axis, key)
    assert not block.has_observers  # its temporary observer is gone


def test_quick_mask_check_coord_collapsed_warns():
    block = CoordinateAttention(COORD_C).train()
    with torch.no_grad():
        block.conv_h.weight.zero_()
        block.conv_h.bias.zero_()  # a_h = sigmoid(0) = 0.5 everywhere
    x = torch.randn(2, COORD_C, 6, 7)
    with pytest.warns(MaskCollapseWarning) as record:
        stats = quick_mask_check(block, x)
    assert stats["a_h"]["std"] == 0.0 and stats["a_h"]["mean"] == 0.5
    messages = [str(w.message) for w in record if issubclass(w.category, MaskCollapseWarning)]
    assert any("a_h" in m for m in messages)
    assert not any("a_w" in m for m in messages)
    assert block.training
    assert issubclass(MaskCollapseWarning, lightning_attn.AttentionWarning)
    assert issubclass(MaskCollapseWarning, UserWarning)


def test_quick_mask_check_dsa():
    block = DynamicSpatialAttention().train()
    x = 3 * torch.randn(2, 6, 9, 9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = quick_mask_check(block, x)
    assert _collapse_warnings(record) == []
    assert set(stats) == {"mask"} and block.training
    _, mask = block(x)
    assert abs(stats["mask"]["std"] - float(mask.detach().std())) < 1e-6
    assert abs(stats["mask"]["mean"] - float(mask.detach().mean())) < 1e-6
    with torch.no_grad():
        for br in block.branches:
            br.weight.zero_()
    with pytest.warns(MaskCollapseWarning, match="mask"):
        stats = quick_mask_check(block, x)
    assert stats["mask"]["std"] == 0.0


def test_quick_mask_check_threshold_and_bad_module():
    block = CoordinateAttention(COORD_C)
    x = torch.randn(2, COORD_C, 6, 7)
    with pytest.warns(MaskCollapseWarning):
        quick_mask_check(block, x, std_threshold=10.0)
    with pytest.raises(TypeError):
        quick_mask_check(nn.Conv2d(COORD_C, COORD_C, 1), x)
    with pytest.raises(ValueError, match="std_threshold"):
        quick_mask_check(block, x, std_threshold=-1.0)
