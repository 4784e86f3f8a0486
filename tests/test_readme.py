"""The README's stories run as written: "Add it to your Trainer" (and logs the documented
tags) and the pretrained-backbone story of insert_attention."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from setuptools.config.pyprojecttoml import read_configuration
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# lightning and torchmetrics probe for torchvision on import: done here, before a test fakes it
import lightning_attn.modules  # noqa: F401

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Add it to your Trainer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_trainer_example_runs_and_logs_documented_tags(tmp_path, monkeypatch):
    code = _example()
    # Smaller run, same code: fewer samples, fewer epochs.
    code = code.replace("max_epochs=2", "max_epochs=1, enable_progress_bar=False")
    code = code.replace("num_train=1000, num_val=200", "num_train=160, num_val=64, batch_size=16")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})

    (event_file,) = (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file.parent), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "attn/attn/router/entropy", "attn/attn/router/entropy_norm", "attn/attn/router/usage_0",
        "attn/attn/mask/mean", "attn/attn/mask/std", "attn/attn/mask/sat_low",
        "attn/attn/mask/sat_high", "attn/attn/param/temperature",
        "attn/attn/param/temperature_grad_norm",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert acc.Tags()["images"], "the attention-map grid is missing"


def _python_blocks(heading: str) -> list[str]:
    """The python code blocks of the section under ``heading`` (up to the next heading of
    the same or a higher level)."""
    text = README.read_text()
    start = text.index(heading)
    level = heading.split(" ")[0]
    ends = [text.find(f"\n{'#' * n} ", start + 1) for n in range(2, len(level) + 1)]
    end = min([e for e in ends if e != -1], default=len(text))
    section = text[start:end]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _reference_backbones():
    path = Path(__file__).resolve().parent / "modules" / "reference_backbones.py"
    spec = importlib.util.spec_from_file_location("reference_backbones", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_pretrained_backbone_story_runs(tmp_path, monkeypatch):
    """The insert_attention story, with torchvision's resnet18 and timm's create_model
    standing in as the same-layout models of tests/modules/reference_backbones.py."""
    ref = _reference_backbones()
    models = types.ModuleType("torchvision.models")
    models.resnet18 = lambda weights=None: ref.ResNet18(num_classes=1000, width=64)
    models.ResNet18_Weights = types.SimpleNamespace(DEFAULT="IMAGENET1K_V1")
    timm = types.ModuleType("timm")
    timm.create_model = lambda name, pretrained=False: ref.StagedNet(1000, (96, 192, 384, 768))
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.chdir(tmp_path)

    resnet_code, timm_code = _python_blocks("## A pretrained backbone")
    namespace = {"__name__": "readme_insert"}
    exec(compile(resnet_code, str(README), "exec"), namespace)
    model, fresh = namespace["model"], namespace["fresh"]
    assert len(namespace["pretrained"]) == 122 and len(namespace["missing"]) > 0
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    exec(compile(timm_code, str(README), "exec"), namespace)
    assert namespace["model"].stages_2_attn.in_channels == 384


def test_readme_shell_commands_need_no_activated_environment():
    """Every command in the README's bash blocks is a make target or a tool under .venv/bin/
    that the install provides, so it runs from the repository root in a plain shell."""
    root = README.parent
    targets = set(re.findall(r"^([a-z][\w-]*):", (root / "Makefile").read_text(), re.M))
    scripts = set(read_configuration(root / "pyproject.toml")["project"]["scripts"])
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        continued = False
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#") and not continued:
                commands.append(line.split()[0:2])
            continued = line.rstrip().endswith("\\")
    inline = re.findall(r"`(\.venv/bin/[\w-]+)", text)
    assert {"make", ".venv/bin/lightning-attn"} <= {c[0] for c in commands}, commands
    for first, *rest in commands:
        if first == "make":
            assert rest and rest[0] in targets, (first, rest)
        else:
            assert first.startswith(".venv/bin/"), first
    for tool in {c[0] for c in commands} - {"make"} | set(inline):
        assert tool.removeprefix(".venv/bin/") in scripts | {"python"}, tool
    assert "tensorboard" in targets


def test_readme_options_snippet_runs_as_written(tmp_path, monkeypatch):
    (code,) = _python_blocks("### Options")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_options"}
    exec(compile(code, str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    assert "attn/net.features.attn2.block/mask/std" in trainer.callback_metrics
    assert not any("attn/net.features.attn3" in k for k in trainer.callback_metrics)  # excluded
    assert (tmp_path / "logs" / "lightning_logs").exists()


def test_readme_own_block_records_like_the_library_blocks():
    (code,) = _python_blocks("### Your own block")
    namespace = {"__name__": "readme_own_block"}
    exec(compile(code, str(README), "exec"), namespace)
    from lightning_attn import quick_mask_check
    from lightning_attn.blocks import AttentionBlock

    block = namespace["MyGate"](4)
    assert isinstance(block, AttentionBlock)
    stats = quick_mask_check(block, torch.randn(2, 4, 8, 8))
    assert set(stats) == {"mask"} and 0 < stats["mask"].mean < 1


def test_readme_remedies_snippet_runs_as_written(tmp_path, monkeypatch):
    """The Remedies story, with fewer steps and samples: the schedule holds the temperature of
    stages 1 and 2 (not the excluded stage 3) and the router losses are logged."""
    (code,) = _python_blocks("### Remedies")
    code = code.replace("max_epochs=5", "max_steps=3, log_every_n_steps=1, "
                        "enable_progress_bar=False")
    code = code.replace("num_train=4000", "num_train=48, num_val=16, num_test=16, batch_size=16")
    assert "max_steps=3" in code and "num_train=48" in code
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_remedies"}
    exec(compile(code, str(README), "exec"), namespace)
    model, schedule = namespace["model"], namespace["schedule"]
    temps = {n: model.get_submodule(n).temperature.item() for n in model.block_names}
    want = schedule.value_at(2)  # the value of the last step
    assert temps["net.features.attn1.block"] == pytest.approx(want, rel=1e-5)
    assert temps["net.features.attn2.block"] == pytest.approx(want, rel=1e-5)
    assert temps["net.features.attn3.block"] != pytest.approx(want, rel=1e-3)  # excluded
    metrics = namespace["trainer"].callback_metrics
    assert {"train/aux/balance", "train/aux/z_loss", "train/aux/loss"} <= set(metrics)
