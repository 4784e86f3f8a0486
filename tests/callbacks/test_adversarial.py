"""Adversarial table for the diagnostics callback: bad arguments and odd runs, each with its
outcome class (``clear``: an error naming the argument and value; ``correct``: the right
thing happens, checked). ``python scripts/adversarial_table.py`` counts every table."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_attn.callbacks import AttentionDiagnostics, MaskHealthMonitor
from lightning_attn.core import HealthThresholds, MissingStatisticsWarning, NonFiniteWarning

from ..adversarial import Case, assert_outcome, correct
from ..adversarial import clear as _clear
from .cb_models import FakeNet, MemoryLogger, PlainNet, make_data, make_trainer

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


CASES = CONSTRUCTOR + RUNS


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_callback_input(case: Case, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert_outcome(case, tmp_path)


def test_no_raw_and_no_silent_row() -> None:
    assert {c.outcome for c in CASES} <= {"clear", "correct"}
    assert len(CASES) >= 40
