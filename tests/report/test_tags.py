"""What newer diagnostics write: evaluation tags, mask min/max, stage-prefixed maps,
``attn/config`` thresholds and ``attn/problems`` warnings (written here with a SummaryWriter)."""

from __future__ import annotations

import io

from PIL import Image

from lightning_attn.core.statistics import MaskStats, quantities
from lightning_attn.report import judge_run, load_runs, parse_tags, write_report

from .html_page import read_page
from .synthetic import BLOCK, problem, write_run


def _judge(path):
    (log,) = load_runs(path, progress=False)
    tags = parse_tags(log)
    return log, tags, judge_run(log, tags)


def test_config_thresholds_decide_the_verdict(tmp_path):
    # std 0.2 is healthy by default, collapsed with std_threshold=0.3 from the run's config
    _, _, health = _judge(write_run(tmp_path / "default"))
    assert health.verdicts[BLOCK].status == "healthy"
    assert health.thresholds_source == "defaults (the run has no attn/config)"
    assert health.warnings_source.startswith("recomputed")

    config = {"thresholds": {"std_threshold": 0.3, "from_the_future": 1.0},
              "on_problem": "ignore", "blocks": [{"name": BLOCK, "branches": ["3x3", "7x7",
                                                                               "7x7 d2"]}]}
    _, tags, health = _judge(write_run(tmp_path / "strict", config=config))
    assert health.thresholds.std_threshold == 0.3
    assert health.thresholds_source == "the run's attn/config"
    assert "from_the_future" in health.notes[0]
    v = health.verdicts[BLOCK]
    assert v.status == "problem" and v.kinds == ("mask_collapse",)
    assert v.text == "collapsed (mask std 0.2 < 0.3 at step 30, since step 10)"
    # on_problem="ignore": the callback logged no warning, so they are recomputed
    assert [(p.kind, p.step) for p in health.warnings] == [("mask_collapse", 10)]
    assert tags.branch_label(BLOCK, 2) == "branch 2 (7x7 d2)"


def test_logged_problems_are_the_warnings(tmp_path):
    logged = [problem("parameter_drift", 20), problem("a_kind_from_the_future", 30)]
    _, _, health = _judge(
        write_run(tmp_path / "run", config={"thresholds": {}}, problems=logged)
    )
    assert health.warnings_source == "logged by the callback (attn/problems)"
    assert [(p.kind, p.step, p.value, p.threshold) for p in health.warnings] == [
        ("parameter_drift", 20, 3.5, 2.0), ("a_kind_from_the_future", 30, 3.5, 2.0),
    ]
    # Neither can be measured again here (no parameter ranges in the config, a kind this
    # version does not know): no recovery can be shown, so the block stays "warned".
    assert health.verdicts[BLOCK].status == "warned"
    assert health.verdicts[BLOCK].text.startswith(
        "warned earlier (drifting parameter at step 20, a kind from the future at step 30)"
    )


def test_a_config_without_problems_means_no_warning(tmp_path):
    # the callback writes attn/problems for each warning: none written, none given
    _, _, health = _judge(
        write_run(tmp_path / "run", std=0.001, config={"thresholds": {}, "on_problem": "warn"})
    )
    assert health.warnings == [] and health.warnings_source.startswith("logged")
    assert health.verdicts[BLOCK].status == "problem"  # the last point is still judged


def test_evaluation_tags_min_max_and_the_preferred_map(tmp_path):
    run = write_run(
        tmp_path / "run", evaluation=True, maps=("test/attn/maps", "val/attn/maps"),
        problems=[problem("mask_collapse", 20)],
    )
    log, tags, _ = _judge(run)
    assert set(tags.blocks) == {"train", "val"}
    val = tags.blocks["val"][BLOCK]
    assert val.masks["mask"]["std"].steps == [10, 20, 30]
    assert val.router.get("entropy_norm") is not None
    assert set(tags.train[BLOCK].masks["mask"]) == {
        q.name for q in quantities(MaskStats) if q.tag is not None}
    tag, image = tags.last_map()
    assert tag == "val/attn/maps"
    assert Image.open(io.BytesIO(image.encoded)).getpixel((0, 0))[:3] == (0, 255, 0)

    files = write_report(run, tmp_path / "out", progress=False)
    page = read_page(files.html.read_text())
    assert "val/attn/maps at step 30" in page.text
    assert "a fix" in page.text and "mask_collapse happened" in page.text  # message, remedy
    assert len(page.png_images()) == 2  # the block and the map


def test_an_undefined_std_is_not_measured_not_a_problem(tmp_path):
    # A std logged NaN beside a finite mean is a point of one value (batch 1, 1x1 map): no
    # rule judges it, and it is not a NaN value (the nonfinite rule reads the mean).
    _, _, health = _judge(write_run(tmp_path / "one value", std=float("nan")))
    verdict = health.verdicts[BLOCK]
    assert verdict.status == "healthy", verdict.text
    assert health.warnings == []
