"""Every reach-in past a library's public API, listed once, each with a canary.

The package uses a few private names of torch, Lightning and TensorBoard where no public API
does the job (or costs far more: docs/design.md says why for each). ``PRIVATE_APIS`` lists
them; ``test_no_unlisted_reach_in`` scans the package's source so that a new one cannot slip
in without a line here, and each canary fails the day a release renames or changes what the
package relies on.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.autograd import Variable
from torch.utils.data import DataLoader, TensorDataset

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_attn"

#: private name -> (whose, where the package uses it, why).
PRIVATE_APIS: dict[str, tuple[str, str, str]] = {
    "_batches_that_stepped": (
        "Lightning fit loop", "schedule.py",
        "the step the module's own self.log values land on (no public counter has it)"),
    "_should_accumulate": (
        "Lightning fit loop", "schedule.py",
        "whether this micro-batch steps the optimizer (a point covers the whole step)"),
    "_modules": (
        "torch nn.Module", "modules/insert.py", "a host's direct children by attribute name"),
    "_forward_hooks": (
        "torch nn.Module", "modules/insert.py",
        "finding and removing the hooks insert_attention added (by their handle id)"),
    "_forward_pre_hooks": (
        "torch nn.Module", "blocks/adapters.py",
        "a copied model removes the adapters' hooks it inherited (by their id)"),
    "_forward_hooks_always_called": (
        "torch nn.Module", "blocks/adapters.py", "the same, for hooks with always_call=True"),
    "_forward_hooks_with_kwargs": (
        "torch nn.Module", "blocks/adapters.py", "the same, for hooks registered with kwargs"),
    "_C": ("torch", "blocks/recording.py", "the C extension holding the autograd engine's state"),
    "_current_graph_task_id": (
        "torch autograd engine", "blocks/recording.py",
        "-1 outside a backward pass: a forward run inside one is checkpointing's "
        "recomputation, which must not record again"),
    "_parameters": (
        "torch nn.Module", "blocks/coordinate.py", "a raw parameter by name, or None"),
    "_trainer": (
        "LightningModule", "modules/classifier.py",
        "whether a Trainer is attached (the public property raises when none is)"),
    "_generate_state_key": (
        "Lightning Callback", "callbacks/diagnostics.py, callbacks/temperature.py",
        "the state key from what identifies the callback (Lightning's helper for it)"),
    "_prefix": (
        "Lightning TensorBoardLogger", "callbacks/writers.py",
        "one event per point: the tag prefix log_metrics would add"),
    "_get_file_writer": (
        "TensorBoard SummaryWriter", "callbacks/writers.py",
        "one event per point (0.20 ms instead of 3.85 ms for 50 scalars)"),
    "_execution_engine": (
        "torch autograd", "blocks/kernels/torch_fused.py",
        "dropping a buffer at the end of a backward pass"),
    "_instantiate_trainer": (
        "LightningCLI", "cli.py (override)", "adding the RichProgressBar unless one is given"),
    "_run_subcommand": (
        "LightningCLI", "cli.py (override)", "checking ckpt_path before anything is built"),
    "_option_string_actions": (
        "argparse ArgumentParser", "_trainer_cli.py",
        "every option of the parser, to name the one a prefix abbreviates"),
    "_actions": ("argparse ArgumentParser", "_trainer_cli.py",
                 "the options, to show the help's short list"),
    "_action_groups": ("argparse ArgumentParser", "_trainer_cli.py",
                       "the help's groups, to show the short list in each"),
    "_group_actions": ("argparse argument group", "_trainer_cli.py",
                       "a group's options, hidden while the short help is formatted"),
    "_has_run": ("Lightning validation loop", "_trainer_cli.py",
                 "whether validation ran, before naming a missing monitored metric"),
    "_save_topk_checkpoint": (
        "Lightning ModelCheckpoint", "_trainer_cli.py (override)",
        "naming a missing monitored metric and its nearest, once, instead of all of them"),
    "_save_monitor_checkpoint": (
        "Lightning ModelCheckpoint", "_trainer_cli.py", "what the override leaves to Lightning"),
    "_qkv_same_embed_dim": (
        "torch nn.MultiheadAttention", "blocks/heads.py",
        "whether q, k and v come from one in_proj_weight (as its own forward decides)"),
    "_get_rel_pos_bias": (
        "timm WindowAttention (Swin)", "blocks/heads.py",
        "the relative position bias its logits add, for the max logit and the entropy"),
    "_local_mapping": (
        "transformers AttentionInterface", "blocks/heads.py",
        "whether 'sdpa' was overridden before ours, to restore exactly what was there"),
    "_async_writer": (
        "TensorBoard EventFileWriter", "callbacks/writers.py",
        "the queue of the run's file: a point's event serialized without protobuf, and the "
        "record writer behind it, to checksum its records in C (2 ms a point)"),
    "_writer": (
        "TensorBoard _AsyncWriter and RecordWriter", "callbacks/writers.py",
        "the record writer, then the file it writes to"),
    "_generator": (
        "TensorBoard EventAccumulator", "report/reading.py (assigned)",
        "the report's own record loader: progress and a note per damaged file"),
}


def _own_private_names() -> set[str]:
    """Private names the package defines itself (functions, classes, attributes it sets)."""
    own: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                name = node.id
            elif isinstance(node, ast.arg):
                name = node.arg
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value if node.value.isidentifier() else None
            if name and name.startswith("_"):
                own.add(name)
    return own - set(PRIVATE_APIS)


def _reach_ins() -> dict[str, set[str]]:
    """Private attribute name -> files that read it, for names the package does not define."""
    own, found = _own_private_names(), {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in own):
                found.setdefault(node.attr, set()).add(str(path.relative_to(PACKAGE)))
    return found


def test_no_unlisted_reach_in():
    found = _reach_ins()
    assert set(found) - set(PRIVATE_APIS) == set(), "list it in PRIVATE_APIS, with a canary"
    assert len(found) >= 8  # the scan sees them


def test_every_listed_name_is_used_and_documented():
    design = (PACKAGE.parent / "docs/design.md").read_text()
    sources = "".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for name in PRIVATE_APIS:
        assert f".{name}" in sources or f"def {name}" in sources, f"{name} is no longer used"
        assert f"`{name}`" in design, f"docs/design.md does not list {name}"


# -- the canaries --------------------------------------------------------------------------


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[tuple[int, bool]] = []

    def training_step(self, batch, batch_idx):
        loop = self.trainer.fit_loop
        self.seen.append((loop.epoch_loop._batches_that_stepped, loop._should_accumulate()))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=2)


def test_lightning_loop_counters(tmp_path):
    model = _Tiny()
    assert model._trainer is None  # no Trainer yet, and the public property would raise
    trainer = Trainer(max_steps=2, accumulate_grad_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model)
    assert model.seen == [(0, True), (0, False), (1, True), (1, False)]
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == trainer.global_step == 2


def test_module_children_hooks_and_parameters():
    host = nn.Sequential(nn.Linear(2, 2))
    host.extra = nn.Identity()
    assert host._modules["extra"] is host.extra and list(host._modules) == ["0", "extra"]
    handle = host.register_forward_hook(lambda m, i, o: None)
    assert handle.id in host._forward_hooks
    del host._forward_hooks[handle.id]
    assert not host._forward_hooks
    assert host[0]._parameters.get("weight") is host[0].weight
    assert host[0]._parameters.get("nothing") is None


def test_module_hook_dicts_hold_each_kind_of_hook_by_id():
    module = nn.Linear(2, 2)
    pre = module.register_forward_pre_hook(lambda m, i: None)
    always = module.register_forward_hook(lambda m, i, o: None, always_call=True)
    kwargs = module.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True)
    assert pre.id in module._forward_pre_hooks
    assert module._forward_hooks_always_called[always.id] is True
    assert module._forward_hooks_with_kwargs[kwargs.id] is True


def test_autograd_graph_task_id_says_whether_a_backward_runs():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(torch._C._current_graph_task_id())
            return grad

    assert torch._C._current_graph_task_id() == -1
    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen and seen[0] != -1


def test_callback_state_key_helper():
    class Mine(Callback):
        @property
        def state_key(self) -> str:
            return self._generate_state_key(sections=("mask",))

    assert Mine().state_key == f"{Mine.__qualname__}{{'sections': ('mask',)}}"


def test_tensorboard_logger_prefix_and_file_writer(tmp_path):
    # tests/callbacks/test_writers.py checks that the one event equals log_metrics' events
    logger = TensorBoardLogger(tmp_path, prefix="fold1")
    assert logger._prefix == "fold1"
    assert callable(logger.experiment._get_file_writer().add_summary)


def test_tensorboard_record_writer_chain(tmp_path):
    # tests/callbacks/test_writers.py checks that the records written in C are TensorBoard's
    from tensorboard.summary.writer.record_writer import RecordWriter

    logger = TensorBoardLogger(tmp_path)
    queue = logger.experiment._get_file_writer().event_writer._async_writer
    records = queue._writer
    assert isinstance(records, RecordWriter) and callable(records._writer.write)
    assert "bytestring" in inspect.signature(queue.write).parameters  # serialized events
    assert "masked_crc32c" in inspect.getsource(RecordWriter.write)  # what the C path replaces


def test_autograd_end_of_backward_callback():
    ran = []

    class Queue(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            Variable._execution_engine.queue_callback(lambda: ran.append("end"))
            return grad * 2

    x = torch.ones(2, requires_grad=True)
    Queue.apply(x).sum().backward()
    assert ran == ["end"]


def test_lightning_cli_hooks_the_package_overrides():
    params = list(inspect.signature(LightningCLI._instantiate_trainer).parameters)
    assert params == ["self", "config", "callbacks"]
    assert list(inspect.signature(LightningCLI._run_subcommand).parameters) == [
        "self", "subcommand"]


def test_argparse_parser_internals():
    import argparse

    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("g")
    action = group.add_argument("--name")
    assert parser._option_string_actions["--name"] is action and action in parser._actions
    assert group in parser._action_groups and group._group_actions == [action]


def test_model_checkpoint_and_loop_internals(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    params = list(inspect.signature(ModelCheckpoint._save_topk_checkpoint).parameters)
    assert params == ["self", "trainer", "monitor_candidates"]
    params = list(inspect.signature(ModelCheckpoint._save_monitor_checkpoint).parameters)
    assert params == ["self", "trainer", "monitor_candidates"]
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    assert trainer.fit_loop.epoch_loop.val_loop._has_run is False


def test_multihead_attention_projection_flag():
    assert nn.MultiheadAttention(8, 2)._qkv_same_embed_dim is True
    assert nn.MultiheadAttention(8, 2, kdim=4, vdim=4)._qkv_same_embed_dim is False


def test_timm_window_attention_relative_position_bias():
    from timm.models.swin_transformer import WindowAttention

    attn = WindowAttention(dim=8, num_heads=2, window_size=(3, 3))
    assert attn._get_rel_pos_bias().shape == (1, 2, 9, 9)


def test_transformers_attention_registry_local_overrides():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping or callable(
        ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"])
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    had = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    try:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = len  # any callable
        assert ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"] is len
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is len
    finally:
        if had:
            ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original


def test_event_accumulator_generator(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    assert hasattr(acc, "_generator")

    class Nothing:
        def Load(self):  # noqa: N802 - tensorboard's name
            return iter(())

    acc._generator = Nothing()
    acc.Reload()
    assert acc.Tags()["scalars"] == []


@pytest.mark.parametrize("name", sorted(PRIVATE_APIS))
def test_each_listed_name_has_a_canary(name):
    canaries = Path(__file__).read_text().split("# -- the canaries", 1)[1]
    assert f".{name}" in canaries
