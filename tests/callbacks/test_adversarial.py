"""Adversarial table for the diagnostics callback: bad arguments and odd runs, each with its
outcome class (``clear``: an error naming the argument and value; ``correct``: the right
thing happens, checked). ``python scripts/adversarial_table.py`` counts every table."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from rich.console import Console
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

from lightning_attn.blocks import attention_adapter
from lightning_attn.callbacks import AttentionDiagnostics, MaskHealthMonitor
from lightning_attn.callbacks.diagnostics import check_distinct
from lightning_attn.callbacks.summary import render_summary
from lightning_attn.core import (
    AttentionWarning,
    DiagnosticsStateWarning,
    HealthThresholds,
    MaskCollapseWarning,
    MissingStatisticsWarning,
    NonFiniteWarning,
    RecordingContractWarning,
)
from lightning_attn.core.tags import ScalarTag

from ..adversarial import Case, assert_outcome, correct
from ..adversarial import clear as _clear
from .cb_models import (
    GATE,
    FakeBlock,
    FakeNet,
    GatedNet,
    MemoryLogger,
    PlainNet,
    ValidatedNet,
    make_data,
    make_trainer,
)

NAN = float("nan")


def clear(id, run, error, *needles):
    return _clear(id, lambda tmp: run(), error, *needles)


def _fit(tmp, model=None, callbacks=None, **kwargs):
    cb = callbacks or AttentionDiagnostics(log_every_n_steps=1, num_images=0, summary=False)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp, cb if isinstance(cb, list) else [cb], max_steps=2, logger=logger,
                     **kwargs).fit(model or FakeNet())
    return cb, logger, [w for w in caught]


def _warned(category):
    return lambda result: any(issubclass(w.category, category) for w in result[2])


A, H = AttentionDiagnostics, HealthThresholds

CONSTRUCTOR = [
    clear("include=5", lambda: A(include=5), ValueError, "include", "5"),
    clear("include=['']", lambda: A(include=[""]), ValueError, "include"),
    clear("exclude=[None]", lambda: A(exclude=[None]), ValueError, "exclude", "None"),
    clear("log_every_n_steps=-1", lambda: A(log_every_n_steps=-1), ValueError,
          "log_every_n_steps", "-1"),
    clear("log_every_n_steps=1.5", lambda: A(log_every_n_steps=1.5), TypeError,
          "log_every_n_steps", "1.5"),
    clear("log_every_n_steps=True", lambda: A(log_every_n_steps=True), TypeError,
          "log_every_n_steps", "True"),
    clear("histogram_every_n_steps=-2", lambda: A(histogram_every_n_steps=-2), ValueError,
          "histogram_every_n_steps", "-2"),
    clear("thresholds as a dict", lambda: A(thresholds={"std_threshold": 0.1}), TypeError,
          "thresholds", "dict"),
    clear("std_threshold=2", lambda: H(std_threshold=2), ValueError, "std_threshold", "2"),
    clear("std_threshold=nan", lambda: H(std_threshold=NAN), ValueError, "std_threshold",
          "nan"),
    clear("std_threshold='0.1'", lambda: H(std_threshold="0.1"), ValueError, "std_threshold",
          "'0.1'"),
    clear("saturation_low above saturation_high", lambda: H(saturation_low=0.9,
                                                           saturation_high=0.1),
          ValueError, "saturation_low", "saturation_high"),
    clear("temperature_min=0", lambda: H(temperature_min=0), ValueError, "temperature_min"),
    clear("temperature_max=inf", lambda: H(temperature_max=math.inf), ValueError,
          "temperature_max", "inf"),
    clear("temperature_min above temperature_max", lambda: H(temperature_min=5,
                                                            temperature_max=1),
          ValueError, "temperature_min"),
    clear("indifference_warmup_steps=-1", lambda: H(indifference_warmup_steps=-1), ValueError,
          "indifference_warmup_steps", "-1"),
    clear("recovery_margin=1.5", lambda: H(recovery_margin=1.5), ValueError, "recovery_margin",
          "1.5"),
    clear("on_problem='explode'", lambda: A(on_problem="explode"), ValueError, "on_problem",
          "explode"),
    clear("on_problem=None", lambda: A(on_problem=None), ValueError, "on_problem", "None"),
    clear("sections=['masks']", lambda: A(sections=["masks"]), ValueError, "sections[0]",
          "masks"),
    clear("sections=5", lambda: A(sections=5), TypeError, "sections", "5"),
    clear("num_images=-1", lambda: A(num_images=-1), ValueError, "num_images", "-1"),
    clear("num_images=2.5", lambda: A(num_images=2.5), TypeError, "num_images", "2.5"),
    clear("overlay_alpha=1.5", lambda: A(overlay_alpha=1.5), ValueError, "overlay_alpha",
          "1.5"),
    clear("overlay_alpha=nan", lambda: A(overlay_alpha=NAN), ValueError, "overlay_alpha"),
    clear("summary='no'", lambda: A(summary="no"), TypeError, "summary", "'no'"),
    clear("eval_statistics=1", lambda: A(eval_statistics=1), TypeError, "eval_statistics"),
    clear("log_statistics=None", lambda: A(log_statistics=None), TypeError, "log_statistics"),
    clear("an unknown keyword", lambda: A(std=0.1), TypeError, "std"),
    clear("a preset's fixed argument", lambda: MaskHealthMonitor(sections=["router"]),
          TypeError, "fixes", "sections"),
    correct("sections='mask' (one string)", lambda tmp: A(sections="mask"),
            lambda cb: cb.sections == ("mask",)),
    correct("sections=[] (maps only)", lambda tmp: A(sections=[]), lambda cb: cb.sections == ()),
    correct("a deprecated threshold keyword", lambda tmp: A(std_threshold=0.1),
            lambda cb: cb.thresholds.std_threshold == 0.1),
]


class NaNMask(FakeNet):
    def __init__(self):
        super().__init__(transform=lambda x: torch.full_like(x, NAN))


class Skipper(FakeNet):
    """The block does not run in training steps."""

    def forward(self, x):
        return self.head(x.flatten(1))


def _double_net() -> FakeNet:
    data = make_data(32)
    data = TensorDataset(data.tensors[0].double(), data.tensors[1])
    return FakeNet(data=data).double()


RUNS = [
    correct("a model without attention blocks", lambda tmp: _fit(tmp, PlainNet()),
            lambda r: r[1].attn() == [] and any("no attention block" in str(w.message)
                                                 for w in r[2])),
    correct("include that matches nothing", lambda tmp: _fit(
        tmp, callbacks=A(include=["nothing.*"], log_every_n_steps=1, summary=False)),
            lambda r: any("matches no attention block" in str(w.message) for w in r[2])),
    correct("NaN masks", lambda tmp: _fit(tmp, NaNMask()), _warned(NonFiniteWarning)),
    correct("a block that never runs", lambda tmp: _fit(tmp, Skipper()),
            _warned(MissingStatisticsWarning)),
    correct("log_every_n_steps=0", lambda tmp: _fit(
        tmp, callbacks=A(log_every_n_steps=0, summary=False)),
            lambda r: r[1].attn() == [] and any("log_every_n_steps is 0" in str(w.message)
                                                 for w in r[2])),
    correct("no logger at all", lambda tmp: make_trainer(
        tmp, [A(log_every_n_steps=1, summary=False)], max_steps=2, logger=False).fit(FakeNet()),
            lambda r: True),
    correct("a float64 model", lambda tmp: _fit(tmp, _double_net()),
            lambda r: r[0].last_stats is not None and r[1].attn() != []),
    correct("a batch smaller than the others", lambda tmp: _fit(
        tmp, FakeNet(data=make_data(9), batch_size=8)),
            lambda r: r[0].last_stats.blocks["block"].masks["mask"].count == 64),
    clear("two callbacks that disagree on saturation", lambda: _fit_two(), ValueError,
          "same saturation thresholds"),
    correct("an interval longer than the run", lambda tmp: _fit(
        tmp, callbacks=A(log_every_n_steps=1000, summary=False)),
            lambda r: r[0].last_stats is None and r[1].attn() == []),
]


def _fit_two():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _fit(tmp, callbacks=[A(log_every_n_steps=1, summary=False),
                             MaskHealthMonitor(thresholds=H(saturation_low=0.2),
                                               log_every_n_steps=1)])


# -- lifecycles: a run is one fit ---------------------------------------------------------------
def _collapsing() -> FakeNet:
    return FakeNet(transform=lambda x: torch.full_like(x, 0.5))


def _fits(tmp, *steps, callback=None, models=None):
    """Fits of one callback (a sweep): each fit's (run_id, num_points, warnings)."""
    cb = callback or A(log_every_n_steps=1, num_images=0, summary=False)
    out = []
    for i, n in enumerate(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp, [cb], max_steps=n).fit(models[i] if models else _collapsing())
        out.append((cb.run_id, cb.num_points, caught))
    return out


def _kinds(caught, category) -> int:
    return sum(issubclass(w.category, category) for w in caught)


class Evaluated(FakeNet):
    def validation_step(self, batch, batch_idx):
        self(batch[0])

    test_step = validation_step

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def val_dataloader(self):
        return self.train_dataloader()

    test_dataloader = predict_dataloader = val_dataloader


def _then(tmp, first: str, second: str, ckpt: bool = False):
    """Two stages on one Trainer (and callback): the run_id after each, and the warnings."""
    cb = A(log_every_n_steps=1, num_images=0, summary=False)
    trainer = make_trainer(tmp, [cb], max_steps=2, limit_val_batches=1, limit_test_batches=1,
                           enable_checkpointing=ckpt)
    model = Evaluated(transform=lambda x: torch.full_like(x, 0.5))
    ids = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stage in (first, second):
            getattr(trainer, stage)(model)
            ids.append(cb.run_id)
    return ids, caught


def _crash_then_fit(tmp):
    cb = A(log_every_n_steps=1, num_images=0, summary=False)

    class Crashes(FakeNet):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("planned")

    with pytest.raises(RuntimeError, match="planned"):
        make_trainer(tmp, [cb], max_steps=2).fit(Crashes())
    crashed = cb.run_id
    return crashed, _fits(tmp, 2, callback=cb)[0]


def _copy_then_fit(tmp):
    import copy

    cb = A(log_every_n_steps=1, num_images=0, summary=False)
    first = _fits(tmp, 2, callback=cb)[0]
    return first, _fits(tmp, 3, callback=copy.deepcopy(cb))[0]


def _presets_share(tmp):
    cbs = [MaskHealthMonitor(log_every_n_steps=1), A(sections=["router"], log_every_n_steps=1,
                                                    num_images=0, summary=False)]
    _fit(tmp, callbacks=cbs)
    return cbs


def _checkpointed(tmp, callbacks, edit=None):
    """A fit's checkpoint (its callbacks' states edited by ``edit``)."""
    trainer = make_trainer(tmp, callbacks, max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_collapsing())
    path = f"{tmp}/first.ckpt"
    trainer.save_checkpoint(path)
    if edit is not None:
        checkpoint = torch.load(path, weights_only=False)
        edit(checkpoint["callbacks"])
        torch.save(checkpoint, path)
    return path


def _resumed(tmp, before, edit=None, stage="fit"):
    """The callback resumed (or evaluating) from a checkpoint of ``before``, and what it said."""
    ckpt = _checkpointed(tmp, before, edit)
    cb = A(log_every_n_steps=1, num_images=0, summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp, [cb], max_steps=4, limit_val_batches=1,
                               limit_test_batches=1)
        getattr(trainer, stage)(Evaluated(transform=lambda x: torch.full_like(x, 0.5)),
                                ckpt_path=ckpt)
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticsStateWarning)]
    return cb, said, before


def _said_once_naming(result, *needles):
    cb, said, _ = result
    return len(said) == 1 and cb.run_id in said[0] and all(n in said[0] for n in needles)


def _state_of(key_of, state):
    return lambda states: states.__setitem__(key_of(), state)


def _default_key():
    return A().state_key


LIFECYCLES = [
    correct("a second fit of one callback warns about its own model",
            lambda tmp: _fits(tmp, 2, 2),
            lambda r: [_kinds(c, MaskCollapseWarning) for _, _, c in r] == [1, 1]),
    correct("three fits of one callback are three runs",
            lambda tmp: _fits(tmp, 2, 2, 2), lambda r: len({i for i, _, _ in r}) == 3),
    correct("points are counted per fit", lambda tmp: _fits(tmp, 2, 3),
            lambda r: [n for _, n, _ in r] == [2, 3]),
    correct("a healthy fit, then a collapsing one: only the second warns",
            lambda tmp: _fits(tmp, 2, 2, models=[FakeNet(), _collapsing()]),
            lambda r: [_kinds(c, MaskCollapseWarning) for _, _, c in r] == [0, 1]),
    correct("validate before fit: the fit is a run of its own",
            lambda tmp: _then(tmp, "validate", "fit"),
            lambda r: r[0][0] is not None and r[0][1] not in (None, r[0][0])),
    correct("validate after fit carries the fit's run_id",
            lambda tmp: _then(tmp, "fit", "validate"), lambda r: r[0][0] == r[0][1]),
    correct("test after fit carries the fit's run_id",
            lambda tmp: _then(tmp, "fit", "test"), lambda r: r[0][0] == r[0][1]),
    correct("predict between stages leaves the run_id",
            lambda tmp: _then(tmp, "fit", "predict"), lambda r: r[0][0] == r[0][1]),
    correct("a fit after a crashed fit is a new run", _crash_then_fit,
            lambda r: r[1][0] not in (None, r[0]) and _kinds(r[1][2], MaskCollapseWarning)),
    correct("a deep copy of a used callback starts its own run", _copy_then_fit,
            lambda r: r[1][0] != r[0][0] and r[1][1] == 3),
    correct("the callbacks of one Trainer share the run_id", _presets_share,
            lambda cbs: cbs[0].run_id == cbs[1].run_id is not None),
    correct("resume without the callback's state: said once, naming the run",
            lambda tmp: _resumed(tmp, []), lambda r: _said_once_naming(r, "written without")),
    correct("resume from another configuration's state: said, naming it",
            lambda tmp: _resumed(tmp, [A(sections=["mask"], log_every_n_steps=1)]),
            lambda r: _said_once_naming(r, "'sections': ('mask',)")),
    correct("resume with the state continues the run silently",
            lambda tmp: _resumed(tmp, [A(log_every_n_steps=1)]),
            lambda r: r[1] == [] and r[0].run_id == r[2][0].run_id and r[0].num_points == 4),
    correct("validate a checkpoint without the state: said, naming the run",
            lambda tmp: _resumed(tmp, [], stage="validate"),
            lambda r: _said_once_naming(r, "evaluating")),
    correct("test a checkpoint with the state: the fit's run_id",
            lambda tmp: _resumed(tmp, [A(log_every_n_steps=1)], stage="test"),
            lambda r: r[1] == [] and r[0].run_id == r[2][0].run_id),
]


# -- names: any module name is a tag that parses back ---------------------------------------
class Named(FakeNet):
    """FakeNet whose block sits in a ModuleDict under ``name``."""

    def __init__(self, name: str, block=None):
        super().__init__()
        self.blocks = torch.nn.ModuleDict({name: block or FakeBlock()})
        del self.block

    def forward(self, x):
        return self.head(next(iter(self.blocks.values()))(x).flatten(1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])


def _tags_of(tmp, name, block=None):
    cb, logger, _ = _fit(tmp, Named(name, block))
    return {ScalarTag.parse(t) for _, m in logger.attn() for t in m} - {None}, cb


def _round_trip(name, mask="mask", param="temperature"):
    def check(result):
        tags, cb = result
        block = f"blocks.{name}"
        return (block in cb.last_stats.blocks
                and {t.block for t in tags} == {block}
                and mask in {t.group for t in tags}
                and param in {t.param for t in tags if t.param})
    return check


class OddMask(FakeBlock):
    mask_names = ("m%2F 1",)

    def forward(self, x):
        self.record(masks={"m%2F 1": self.mask_of(x)}, router_weights=self.router_of(x))
        return x * self.gain


class OddParam(FakeBlock):
    def attention_parameters(self):
        return {"t/1%": self.gain.detach()}

    def trainable_attention_parameters(self):
        return {"t/1%": self.gain}

    def attention_parameter_specs(self):
        return {}


class BadMask(FakeBlock):
    def __init__(self, name):
        super().__init__()
        self.mask_names = (name,)


NAMES = [
    correct(f"block named {name!r}", lambda tmp, n=name: _tags_of(tmp, n), _round_trip(name))
    for name in ("res/3x3", "a%2Fb", "注意力🙂", "new\nline", "attn", "<b>x</b>", "back`tick")
] + [
    correct("mask named 'm%2F 1'", lambda tmp: _tags_of(tmp, "b", OddMask()),
            _round_trip("b", mask="m%2F 1")),
    correct("parameter named 't/1%'", lambda tmp: _tags_of(tmp, "b", OddParam()),
            _round_trip("b", param="t/1%")),
    clear("mask named 'router'", lambda: BadMask("router").statistics_layout, ValueError,
          "mask_names", "router"),
    clear("mask named 'a/b'", lambda: BadMask("a/b").statistics_layout, ValueError,
          "mask_names", "a/b"),
]


# -- faults: checkpoints this version cannot read, two callbacks alike ---------------------
BAD_STATES = [
    (["a", "list"], "a list, not a mapping"),
    ({"num_points": "many"}, "num_points is 'many'"),
    ({"num_points": -3}, "num_points is -3"),
    ({"num_points": True}, "num_points is True"),
    ({"layout_dirs": 5}, "layout_dirs is 5"),
    ({"layout_dirs": [1]}, "layout_dirs is [1]"),
    ({"run_id": 7}, "run_id is 7"),
    ({"run_id": ""}, "run_id is ''"),
    ({"reported": [1, 2]}, "reported is a list"),
    ({"reported": {"block|mask_collapse": "x"}}, "'block|mask_collapse': 'x'"),
    ({"reported": {"no-bar": 1}}, "'no-bar': 1"),
    ({"reported": {"reported": {"b|k": 1}, "active": ["c|k"]}}, "active keys"),
]

FAULTS = [
    correct(f"a checkpointed state where {said}",
            lambda tmp, s=state: _resumed(tmp, [A(log_every_n_steps=1)],
                                          _state_of(_default_key, s)),
            lambda r, n=said: _said_once_naming(r, "unreadable", n) and r[0].num_points == 2)
    for state, said in BAD_STATES
] + [
    correct("an earlier release's state (no run_id): resumed, the new run named",
            lambda tmp: _resumed(tmp, [A(log_every_n_steps=1)], _state_of(
                _default_key, {"reported": {"block|mask_collapse": 1}, "num_points": 2})),
            lambda r: _said_once_naming(r, "earlier release") and r[0].num_points == 4),
    correct("an earlier release's reporter state ({key: step})",
            lambda tmp: _resumed(tmp, [A(log_every_n_steps=1)], _state_of(
                _default_key, {"reported": {"block|mask_collapse": 1}, "num_points": 2,
                               "run_id": "abc"})),
            lambda r: r[1] == [] and r[0].run_id == "abc"
            and r[0]._reporter.active == {"block|mask_collapse"}),
    correct("a future release's extra fields are ignored",
            lambda tmp: _resumed(tmp, [A(log_every_n_steps=1)], lambda states: states[
                _default_key()].update(future={"x": 1})),
            lambda r: r[1] == [] and r[0].run_id == r[2][0].run_id),
    clear("two AttentionDiagnostics alike in one Trainer",
          lambda: check_distinct([A(), A(on_problem="stop")]), ValueError,
          "include=/exclude=", "sections=", "adapters=", "differ only in on_problem"),
    clear("two presets alike in one Trainer",
          lambda: check_distinct([MaskHealthMonitor(), MaskHealthMonitor()]), ValueError,
          "MaskHealthMonitor", "identical: one is enough"),
    correct("two callbacks told apart by their adapters share a Trainer",
            lambda tmp: _fit(tmp, callbacks=[
                A(log_every_n_steps=1, summary=False),
                A(log_every_n_steps=1, summary=False, adapters=[attention_adapter(
                    torch.nn.Sigmoid, masks={"mask": ""})])]),
            lambda r: r[1].attn() != []),
]


# -- execution patterns: a recording belongs to the module and the forward that ran -----------
class Checkpointed(FakeNet):
    """FakeNet whose block runs under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reentrant = reentrant

    def forward(self, x):
        x = x.requires_grad_()  # the reentrant variant needs an input that requires grad
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant).flatten(1))


class CalledTwice(FakeNet):
    def forward(self, x):
        return self.head((self.block(x) + self.block(1 - x)).flatten(1))


class UsedParameters(FakeNet):
    """FakeNet that keeps the gain every forward uses (a forward per micro-batch)."""

    def forward(self, x):
        self.gains_used.append((self.global_step, self.block.gain.item()))
        return super().forward(x)


def _histograms(tmp, model):
    cb = A(log_every_n_steps=1, histogram_every_n_steps=1, num_images=0, summary=False)
    _, logger, _ = _fit(tmp, model, cb)
    return cb.last_stats.blocks["block"], logger.attn()


def _as_without_checkpointing(tmp, reentrant: bool) -> bool:
    torch.manual_seed(0)
    got, got_log = _histograms(tmp / "checkpointed", Checkpointed(reentrant))
    torch.manual_seed(0)
    want, want_log = _histograms(tmp / "plain", FakeNet())
    assert got.forwards == want.forwards == 1 and got.histograms == want.histograms
    assert got.masks["mask"].count == want.masks["mask"].count
    for (step, g), (ref_step, w) in zip(got_log, want_log, strict=True):
        assert step == ref_step and g.keys() == w.keys()
        assert all(g[t] == pytest.approx(w[t], rel=1e-6, abs=1e-9) for t in w), step
    return True


def _own_forwards_only(tmp, kind: str) -> bool:
    """A teacher copy made when training starts never records into the original, and keeps
    no live hook once the fit is over."""
    model = GatedNet("teacher", kind)
    cb, _, _ = _fit(tmp, model, A(log_every_n_steps=1, num_images=0, summary=False,
                                  adapters=[GATE]))
    got = cb.last_stats.blocks["net.1"]
    (mask,) = [m for s, m in model.gate_masks if s == 1]
    assert got.forwards == 1 and got.masks["mask"].count == mask.numel()
    assert got.masks["mask"].mean == pytest.approx(mask.double().mean().item(), rel=1e-6)
    teacher = model.teacher[0].module
    teacher(torch.rand(1, 1, 6, 6))
    return not any(m._forward_hooks for m in teacher.modules())


def _validated_average(tmp, kind: str) -> bool:
    """An averaged copy held as a submodule from the start and validated: its blocks log
    their validation points under their own names, and are not missing from training."""
    model = GatedNet("validated", kind)
    cb, logger, caught = _fit(tmp, model, A(log_every_n_steps=1, num_images=0, summary=False,
                                            adapters=[GATE]),
                              limit_val_batches=1, val_check_interval=2)
    assert not _warned(MissingStatisticsWarning)((cb, logger, caught))
    x = next(iter(model.val_dataloader()))[0]
    with torch.no_grad():
        gate = model.ema.module[1]
        mask = torch.sigmoid(gate.conv(model.ema.module[0](x))).double()
    (_, val), = logger.attn(prefix="val/attn/")
    assert val["val/attn/ema.module.1/mask/mean"] == pytest.approx(mask.mean().item(), rel=1e-6)
    assert val["val/attn/ema.module.1/mask/std"] == pytest.approx(mask.std().item(), rel=1e-5)
    return not any("val/attn/net.1/" in t for t in val)  # the model did not run in validation


def _weight_averaging(tmp) -> bool:
    """Lightning's EMAWeightAveraging validates with the averaged weights: the validation
    point's parameters are those (read while validation runs, whatever the callbacks'
    order)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    model = ValidatedNet(lr=5.0)
    cb = A(log_every_n_steps=1, num_images=0, summary=False)
    _, logger, _ = _fit(tmp, model, [EMAWeightAveraging(decay=0.5), cb], limit_val_batches=1,
                        val_check_interval=2)
    (_, val), = logger.attn(prefix="val/attn/")
    # on_train_end copies the average into the model: the gain validation ran with
    return val["val/attn/block/param/temperature"] == pytest.approx(model.block.gain.item())


def _parameters_the_forwards_used(tmp, **kwargs) -> bool:
    model = UsedParameters(lr=20.0)
    _, logger, _ = _fit(tmp, model, **kwargs)
    used = dict(model.gains_used)  # the last forward of each step (micro-batches: the same)
    logged = {s: r["attn/block/param/temperature"]
              for s, r in logger.attn("attn/block/param/temperature")}
    assert len(logged) == 2 and len(set(logged.values())) == 2  # the lr moves it
    return all(v == pytest.approx(used[s], rel=1e-6) for s, v in logged.items())


EXECUTION = [
    correct("a block under torch.utils.checkpoint (reentrant)",
            lambda tmp: _as_without_checkpointing(tmp, True), bool),
    correct("a block under torch.utils.checkpoint (non-reentrant)",
            lambda tmp: _as_without_checkpointing(tmp, False), bool),
    correct("a block called twice in each forward", lambda tmp: _fit(tmp, CalledTwice()),
            lambda r: (r[0].last_stats.blocks["block"].forwards == 2
                       and r[0].last_stats.blocks["block"].masks["mask"].count == 2 * 8 * 64)),
    correct("timm ModelEmaV3 teacher made when training starts",
            lambda tmp: _own_forwards_only(tmp, "ModelEmaV3"), bool),
    correct("torch AveragedModel teacher made when training starts",
            lambda tmp: _own_forwards_only(tmp, "AveragedModel"), bool),
    correct("timm ModelEmaV3 submodule validated",
            lambda tmp: _validated_average(tmp, "ModelEmaV3"), bool),
    correct("torch AveragedModel submodule validated",
            lambda tmp: _validated_average(tmp, "AveragedModel"), bool),
    correct("Lightning's EMAWeightAveraging before the diagnostics", _weight_averaging, bool),
    correct("a large learning rate: parameters as the forward used them",
            _parameters_the_forwards_used, bool),
    correct("a large learning rate with gradient accumulation",
            lambda tmp: _parameters_the_forwards_used(tmp, accumulate_grad_batches=2), bool),
]


# -- degenerate numbers: undefined is not a problem, outside the contract is named ----------
def _contract(category):
    def check(result) -> bool:
        caught = [w for w in result[2] if issubclass(w.category, category)]
        assert len(caught) == 1, [str(w.message) for w in caught]  # once, over two points
        return "'block'" in str(caught[0].message)
    return check


def _one_value_points(tmp):
    cb, logger, caught = _fit(tmp, FakeNet(data=make_data(4, size=1), batch_size=1,
                                          num_branches=1))
    stds = [r["attn/block/mask/std"] for _, r in logger.attn("attn/block/mask/std")]
    table = Console(width=100, record=True)
    table.print(render_summary(cb.last_stats, cb.last_problems, {}, []))
    return stds, caught, table.export_text()


def _logits_net() -> FakeNet:
    model = FakeNet()
    model.block.router_of = lambda x: 4 * x[:, 0, 0, :3]  # logits, no softmax
    return model


DEGENERATE = [
    correct("points of one mask value (batch 1, 1x1 map)", _one_value_points,
            lambda r: (len(r[0]) == 2 and all(math.isnan(s) for s in r[0])
                       and not any(issubclass(w.category, AttentionWarning) for w in r[1])
                       and "±n/a" in r[2])),
    correct("masks outside [0, 1] (3x - 1)", lambda tmp: _fit(tmp, FakeNet(
        transform=lambda x: 3 * x - 1)), _contract(RecordingContractWarning)),
    correct("router logits in place of weights", lambda tmp: _fit(tmp, _logits_net()),
            _contract(RecordingContractWarning)),
    correct("NaN masks are no contract breach", lambda tmp: _fit(tmp, NaNMask()),
            lambda r: not _warned(RecordingContractWarning)(r)),
    correct("masks in [0, 1] are no contract breach", lambda tmp: _fit(tmp, FakeNet()),
            lambda r: not _warned(RecordingContractWarning)(r)),
]

CASES = CONSTRUCTOR + RUNS + LIFECYCLES + NAMES + FAULTS + EXECUTION + DEGENERATE


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_callback_input(case: Case, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert_outcome(case, tmp_path)


def test_no_raw_and_no_silent_row() -> None:
    assert {c.outcome for c in CASES} <= {"clear", "correct"}
    assert len(CASES) >= 80
