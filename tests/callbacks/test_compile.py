"""The diagnostics see through torch.compile: every way of compiling logs the same tags with
the same values as eager, with one extra graph and no recompile per logging step.

dynamo's graphs and counters are the backend's input, so the ``aot_eager`` backend (the
graphs traced, run eagerly) checks all of it fast; one run through ``inductor`` (generated
C++ on the CPU) is marked slow.
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.modules import OutputOnly

from .cb_models import MemoryLogger, make_data, make_trainer


class Net(LightningModule):
    """conv -> DSA -> CoordinateAttention -> head; ``how`` says what is compiled."""

    def __init__(self, how: str = "eager", backend: str = "aot_eager") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
            OutputOnly(DynamicSpatialAttention(learnable_temperature=True)),
            CoordinateAttention(4, min_mid_channels=4, learnable_alpha=True, alpha=0.5),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )
        if how == "submodule":
            self.net = torch.compile(self.net, backend=backend)
        elif how == "forward":
            self.forward = torch.compile(self.forward, backend=backend)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        # No self.log here: Lightning 2.6's log() cannot be traced by torch >= 2.12 inside a
        # compiled training_step (Lightning-AI/pytorch-lightning#21836), which is what
        # trainer.fit(torch.compile(model)) compiles.
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class GraphCount(Callback):
    """dynamo's unique-graph counter after each training batch."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _run(tmp_path, how: str, backend: str = "aot_eager"):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Net(how, backend)
    memory, tb = MemoryLogger(), TensorBoardLogger(tmp_path, name=how)
    count = GraphCount()
    loader = DataLoader(make_data(48, size=8), batch_size=8)
    trainer = make_trainer(
        tmp_path, [AttentionDiagnostics(num_images=2, summary=False), count], max_steps=6,
        logger=[memory, tb], log_every_n_steps=2, limit_val_batches=1, val_check_interval=3,
    )
    trainer.fit(torch.compile(model, backend=backend) if how == "module" else model, loader,
                loader)
    images = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    images.Reload()
    return memory, count.graphs, len(images.Images("val/attn/maps"))


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("eager"), "eager")


@pytest.mark.parametrize(("how", "backend"), [
    ("submodule", "aot_eager"), ("forward", "aot_eager"), ("module", "aot_eager"),
    pytest.param("submodule", "inductor", marks=pytest.mark.slow),
])
def test_compiled_runs_log_what_eager_logs(how, backend, eager, tmp_path):
    memory, graphs, maps = _run(tmp_path, how, backend)
    want, _, want_maps = eager
    got_points, want_points = memory.attn(), want.attn()
    assert [s for s, _ in got_points] == [s for s, _ in want_points] == [1, 3, 5]
    for (_, got), (_, ref) in zip(got_points, want_points, strict=True):
        assert set(got) == set(ref)  # same tags: no "_orig_mod." in block names
        for tag, value in ref.items():
            assert got[tag] == pytest.approx(value, rel=1e-4, abs=1e-6), tag
    for prefix in ("val/attn/",):
        (_, got), (_, ref) = memory.attn(prefix=prefix)[-1], want.attn(prefix=prefix)[-1]
        assert set(got) == set(ref)
        for tag, value in ref.items():
            assert got[tag] == pytest.approx(value, rel=1e-4, abs=1e-6), tag
    assert maps == want_maps == 2  # attention maps of the compiled model
    assert torch._dynamo.utils.counters["graph_break"] == {}
    # Graphs are created by the first logging step (recording on) and the first validation
    # (recording and capture on), then none: no recompilation per logging step.
    assert graphs[0] < graphs[1] and graphs[3] == graphs[-1] <= graphs[0] + 2
