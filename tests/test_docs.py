"""The README and docs/ run as written: every python snippet runs (here, or in a named test
below that shrinks it or fakes a download), every shell command needs nothing activated, and
the tables that restate a declaration (tags, warnings, verdicts) say what the code declares."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from setuptools.config.pyprojecttoml import read_configuration
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# lightning and torchmetrics probe for torchvision on import: done here, before a test fakes it
import lightning_attn.modules  # noqa: F401
from lightning_attn.callbacks import AttentionDiagnostics

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _sections(page: Path) -> list[tuple[str, str, str]]:
    """``(heading, language, code)`` of every fenced block of ``page``."""
    out, heading = [], ""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line
        if line.startswith("```"):
            language, body = line[3:].strip(), []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((heading, language, "\n".join(body) + "\n"))
        i += 1
    return out


def _python(page: Path, heading: str) -> list[str]:
    return [code for h, lang, code in _sections(page) if lang == "python" and h == heading]


def _run(code: str, page: Path, name: str) -> dict:
    namespace = {"__name__": name}
    exec(compile(code, str(page), "exec"), namespace)
    return namespace


# -- the snippets that a named test runs (shrunk, or with a download faked) -------------------
CLAIMED = {
    (README, "## Add it to your Trainer"): "test_trainer_story_runs_and_logs_documented_tags",
    (README, "## Diagnose the attention already in your timm model"):
        "test_timm_story_diagnoses_the_models_own_attention",
    (README, "## Your own block"): "test_own_block_records_like_the_library_blocks",
    (ROOT / "docs/diagnostics.md", "## Options"): "test_options_snippet_runs_as_written",
    (ROOT / "docs/diagnostics.md", "## Your own block"):
        "test_own_block_records_like_the_library_blocks",
    (ROOT / "docs/diagnostics.md", "## The attention already in your model: adapters"):
        "test_adapter_snippet_joins_a_users_gate",
    (ROOT / "docs/blocks.md", "## A pretrained backbone: `insert_attention`"):
        "test_pretrained_backbone_story_runs",
    (ROOT / "docs/blocks.md", "## Our blocks inside timm models: `attn_layer` / `se_layer`"):
        "test_timm_attn_layer_recipe_runs_with_real_timm",
    (ROOT / "docs/blocks.md", "## A timm or torchvision model in `AttentionClassifier`"):
        "test_backbone_story_trains_a_timm_model_with_diagnostics",
    (ROOT / "docs/report.md", "## Verdicts"): "test_report_snippet_writes_a_page",
    (ROOT / "docs/remedies.md", "## All three in one run"):
        "test_remedies_snippet_runs_as_written",
}


def test_every_python_snippet_runs_or_is_claimed_by_a_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for page in PAGES:
        for heading, language, code in _sections(page):
            if language != "python":
                continue
            claimed = CLAIMED.get((page, heading))
            if claimed is not None:
                assert claimed in globals(), claimed
                continue
            _run(code, page, f"doc_{page.stem}")
            ran += 1
    assert ran >= 3


def test_trainer_story_runs_and_logs_documented_tags(tmp_path, monkeypatch):
    (code,) = _python(README, "## Add it to your Trainer")
    # Smaller run, same code: fewer samples, fewer epochs.
    code = code.replace("max_epochs=2", "max_epochs=1, enable_progress_bar=False")
    code = code.replace("num_train=1000, num_val=200", "num_train=160, num_val=64, batch_size=16")
    monkeypatch.chdir(tmp_path)
    _run(code, README, "readme_example")
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


@pytest.mark.slow  # ~10 s: an EfficientNet-B0 trained for a few steps
def test_timm_story_diagnoses_the_models_own_attention(tmp_path, monkeypatch):
    (code,) = _python(README, "## Diagnose the attention already in your timm model")
    code = code.replace("max_steps=20", "max_steps=5, enable_progress_bar=False")
    code = code.replace("num_train=320", "num_train=64, batch_size=16")
    monkeypatch.chdir(tmp_path)
    namespace = _run(code, README, "readme_timm")
    blocks = namespace["diagnostics"].last_stats.blocks
    se = [name for name in blocks if "mask" in blocks[name].masks]
    assert len(se) == 16 and "net.blocks.1.0.se" in se


def test_our_blocks_in_your_models_recipe_runs_with_real_timm():
    """README's attn_layer / se_layer / insert_attention recipe, with the real timm (random
    init: nothing downloads)."""
    from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

    (code,) = _python(README, "## Our blocks in your models")
    assert "pretrained=True" not in re.sub(r"#.*", "", code)
    namespace = _run(code, README, "readme_blocks")
    count = lambda model, cls: sum(isinstance(m, cls) for m in model.modules())  # noqa: E731
    assert count(namespace["resnet"], CoordinateAttention) == 8
    assert count(namespace["effnet"], CoordinateAttention) == 16
    assert count(namespace["convnext"], CoordinateAttention) == 2
    assert count(namespace["resnet_dsa"], DynamicSpatialAttention) == 8
    assert namespace["convnext"].stages_2_attn.in_channels == 384


def test_timm_attn_layer_recipe_runs_with_real_timm():
    """The attn_layer / se_layer recipe, with the real timm (random init, nothing
    downloads: the snippet builds without pretrained weights)."""
    from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

    page = ROOT / "docs/blocks.md"
    (code,) = _python(page, "## Our blocks inside timm models: `attn_layer` / `se_layer`")
    assert "pretrained=True" not in code
    namespace = _run(code, page, "docs_timm_recipe")
    count = lambda model, cls: sum(isinstance(m, cls) for m in model.modules())  # noqa: E731
    assert count(namespace["resnet"], CoordinateAttention) == 8
    assert count(namespace["effnet"], CoordinateAttention) == 16
    assert count(namespace["resnet_dsa"], DynamicSpatialAttention) == 8
    assert namespace["effnet"].eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def _reference_backbones():
    path = ROOT / "tests" / "modules" / "reference_backbones.py"
    spec = importlib.util.spec_from_file_location("reference_backbones", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrained_backbone_story_runs(tmp_path, monkeypatch):
    """The insert_attention story, with torchvision's resnet18 and timm's create_model
    standing in as the same-layout models of tests/modules/reference_backbones.py (the
    snippet downloads pretrained weights)."""
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

    page = ROOT / "docs/blocks.md"
    resnet_code, timm_code = _python(page, "## A pretrained backbone: `insert_attention`")
    namespace = _run(resnet_code, page, "docs_insert")
    model, fresh = namespace["model"], namespace["fresh"]
    assert len(namespace["pretrained"]) == 122 and len(namespace["missing"]) > 0
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    exec(compile(timm_code, str(page), "exec"), namespace)
    assert namespace["model"].stages_2_attn.in_channels == 384


def test_options_snippet_runs_as_written(tmp_path, monkeypatch):
    page = ROOT / "docs/diagnostics.md"
    (code,) = _python(page, "## Options")
    monkeypatch.chdir(tmp_path)
    namespace = _run(code, page, "docs_options")
    watched = list(namespace["diagnostics"].last_stats.blocks)
    assert "net.features.attn2.block" in watched
    assert not any(name.startswith("net.features.attn3") for name in watched)  # excluded
    assert (tmp_path / "logs" / "lightning_logs").exists()


def test_own_block_records_like_the_library_blocks():
    from lightning_attn.blocks import AttentionBlock, quick_mask_check

    for page in (README, ROOT / "docs/diagnostics.md"):
        (code,) = _python(page, "## Your own block")
        block = _run(code, page, "own_block")["MyGate"](4)
        assert isinstance(block, AttentionBlock)
        stats = quick_mask_check(block, torch.randn(2, 4, 8, 8))
        assert set(stats) == {"mask"} and 0 < stats["mask"].mean < 1


def test_adapter_snippet_joins_a_users_gate():
    from lightning_attn.blocks.adapters import Registration, adapters_in_force
    from lightning_attn.blocks.discovery import find_attention_blocks

    page = ROOT / "docs/diagnostics.md"
    (code,) = _python(page, "## The attention already in your model: adapters")
    before = adapters_in_force()
    namespace = _run(code, page, "docs_adapter")
    try:
        blocks, _ = find_attention_blocks(torch.nn.Sequential(namespace["Gate"](3)),
                                          third_party=True)
        assert list(blocks) == ["0"]
        for recorder in blocks.values():
            recorder.clear_recording()
    finally:
        for value in namespace.values():
            if isinstance(value, Registration):
                value.remove()
    assert adapters_in_force() == before


@pytest.mark.slow  # ~5 s: a resnet18 trained for 5 steps with the diagnostics
def test_backbone_story_trains_a_timm_model_with_diagnostics(tmp_path, monkeypatch):
    page = ROOT / "docs/blocks.md"
    (code,) = _python(page, "## A timm or torchvision model in `AttentionClassifier`")
    # Smaller run, same code.
    code = code.replace("max_steps=20", "max_steps=5, enable_progress_bar=False")
    code = code.replace("num_train=256, num_val=64", "num_train=64, num_val=32, batch_size=16")
    monkeypatch.chdir(tmp_path)
    namespace = _run(code, page, "docs_backbone")
    trainer, model = namespace["trainer"], namespace["model"]
    assert trainer.global_step == 5
    assert model.block_names == ["net.layer2_attn", "net.layer3_attn"]
    (diagnostics,) = [c for c in trainer.callbacks if isinstance(c, AttentionDiagnostics)]
    assert diagnostics.last_stats.blocks["net.layer2_attn"].masks["mask"].std > 0
    assert "val/loc/net.layer3_attn" in trainer.callback_metrics


def test_report_snippet_writes_a_page(tmp_path, monkeypatch):
    from .report.synthetic import write_run

    page = ROOT / "docs/report.md"
    (code,) = _python(page, "## Verdicts")
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "runs" / "demo", std=0.001, other={"val/acc": 0.7})  # as make demo
    files = _run(code, page, "docs_report")["files"]
    assert files.html.exists()
    assert [v.status for run in files.report.runs for v in run.health.verdicts.values()] == [
        "problem"]


def _demo_logdir() -> str:
    """Where ``make demo`` logs: the demo's ``--logdir`` default and its logger's name."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    trainer, _, _ = demo.build(demo.QUICK, demo.parse_args([]).logdir)
    return str(Path(trainer.logger.save_dir) / trainer.logger.name)


def test_every_report_command_names_runs_that_its_page_creates():
    """A LOGDIR in a report command of the docs (a shell line or a ``write_report`` call) is
    written by ``make demo`` or by a ``lightning-attn fit --config`` earlier on the same
    page: a new user can run the pages in order."""
    checked = 0
    for page in PAGES:
        created: set[str] = set()
        for _, language, code in _sections(page):
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split("#")[0]
                if re.search(r"\bmake demo\b", line):
                    created.add(_demo_logdir())
                fit = re.search(r"lightning-attn fit --config (\S+\.yaml)", line)
                if fit and language == "bash":
                    logger = yaml.safe_load((ROOT / fit.group(1)).read_text())["trainer"]["logger"]
                    args = logger["init_args"]
                    created.add(f"{args['save_dir']}/{args['name']}")
                logdirs = []
                if language == "bash" and "lightning-attn report" in line:
                    words = line.split("lightning-attn report", 1)[1].split()
                    logdirs = [w.split("=")[-1] for w in words if not w.startswith("-") and (
                        not words[words.index(w) - 1].startswith("-") or w == words[0])]
                elif language == "python" and "write_report(" in line:
                    logdirs = re.findall(r'"[^"]*": "(runs/[^"]+)"', line)
                for logdir in logdirs:
                    checked += 1
                    assert logdir.rstrip("/") in created or any(
                        logdir.startswith(c + "/") for c in created), (page.name, line)
    assert checked >= 4


def test_remedies_snippet_runs_as_written(tmp_path, monkeypatch):
    """The remedies story, with fewer steps and samples: the schedule holds the temperature of
    stages 1 and 2 (not the excluded stage 3) and the router losses are logged."""
    page = ROOT / "docs/remedies.md"
    (code,) = _python(page, "## All three in one run")
    code = code.replace("max_epochs=5", "max_steps=3, log_every_n_steps=1, "
                        "enable_progress_bar=False")
    code = code.replace("num_train=4000", "num_train=48, num_val=16, num_test=16, batch_size=16")
    assert "max_steps=3" in code and "num_train=48" in code
    monkeypatch.chdir(tmp_path)
    namespace = _run(code, page, "docs_remedies")
    model, schedule = namespace["model"], namespace["schedule"]
    temps = {n: model.get_submodule(n).temperature.item() for n in model.block_names}
    want = schedule.value_at(2)  # the value of the last step
    assert temps["net.features.attn1.block"] == pytest.approx(want, rel=1e-5)
    assert temps["net.features.attn2.block"] == pytest.approx(want, rel=1e-5)
    assert temps["net.features.attn3.block"] != pytest.approx(want, rel=1e-3)  # excluded
    metrics = namespace["trainer"].callback_metrics
    assert {"train/aux/balance", "train/aux/z_loss", "train/aux/loss"} <= set(metrics)


# -- shell commands --------------------------------------------------------------------------
def test_shell_commands_need_no_activatedenvironment():
    """Every command in the bash blocks is a make target or a tool under .venv/bin/ that the
    install provides, so it runs from the repository root in a plain shell."""
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    scripts = set(read_configuration(ROOT / "pyproject.toml")["project"]["scripts"])
    commands, inline = [], []
    for page in PAGES:
        text = page.read_text()
        inline += re.findall(r"`(\.venv/bin/[\w-]+)", text)
        for _, language, block in _sections(page):
            if language != "bash":
                continue
            continued = False
            for line in block.splitlines():
                if line.strip() and not line.lstrip().startswith("#") and not continued:
                    commands.append(line.split()[0:2])
                continued = line.rstrip().endswith("\\")
    assert {"make", ".venv/bin/lightning-attn"} <= {c[0] for c in commands}, commands
    for first, *rest in commands:
        if first == "make":
            assert rest and rest[0] in targets, (first, rest)
        else:
            assert first.startswith(".venv/bin/"), first
    for tool in {c[0] for c in commands} - {"make"} | set(inline):
        assert tool.removeprefix(".venv/bin/") in scripts | {"python"}, tool
    assert {"tensorboard", "test-fast", "gpu-check"} <= targets


# -- tables that restate a declaration -------------------------------------------------------

def _docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts/docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_table_is_fresh():
    tables = _docs_tables()
    assert tables.stale() == [], "run: python scripts/docs_tables.py"
    pages = "".join((ROOT / page).read_text() for page in tables.PAGES)
    for name in tables.TABLES:  # every table is in the docs
        assert f"<!-- generated: {name} (python scripts/docs_tables.py) -->" in pages


def test_a_changed_declaration_makes_its_table_stale(monkeypatch, tmp_path):
    from lightning_attn.core import categories

    tables = _docs_tables()
    for page in tables.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text((ROOT / page).read_text())
    monkeypatch.setattr(categories.DeadBranchWarning, "remedy", "something else")
    assert tables.stale(tmp_path) == ["README.md: warnings-short"]


def test_the_tables_show_every_declaration():
    from lightning_attn.core.problems import PROBLEM_KINDS, VERDICT_WORDS
    from lightning_attn.core.tags import tag_table

    text = (ROOT / "docs/diagnostics.md").read_text() + (ROOT / "docs/report.md").read_text()
    for tag, _ in tag_table():
        assert f"`{tag}`" in text
    for kind in PROBLEM_KINDS.values():
        assert f"`{kind.category.__name__}` | `{kind.name}`" in text
    for word in VERDICT_WORDS:
        assert f"| {word} |" in text
        assert f"**{word}**" in README.read_text()  # the README's prose names each


def test_readme_is_a_storefront_that_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 280
    links = set(re.findall(r"\]\((docs/[\w.-]+\.md)", text))
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= links
    for link in re.findall(r"\]\(([\w./-]+\.(?:md|png))", text):
        assert (ROOT / link).exists(), link
