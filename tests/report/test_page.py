"""The report of a real (tiny) training run: every block named, figures present, verdicts
and warnings matching the planted problems and the callback's own warnings."""

from __future__ import annotations

from lightning_attn.core.presentation import comparisons
from lightning_attn.report import load_runs

from .html_page import PNG, read_page
from .report_models import BLOCKS


def test_page_names_every_block_with_its_figure(planted_report):
    html = planted_report.html.read_text()
    page = read_page(html)
    assert page.heading_texts("h3")[-len(BLOCKS):] == list(BLOCKS)  # module order
    # one figure per block, the metrics figure and the attention-map grid, all inline PNGs
    assert len(page.png_images()) == len(BLOCKS) + 2
    alts = [img["alt"] for img in page.images]
    assert set(BLOCKS) <= set(alts)
    assert "metrics" in alts and any("attention maps" in a for a in alts)
    # self-contained: nothing fetched from anywhere
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), page.urls
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_figures_are_written_and_linked_from_the_markdown(planted_report):
    out = planted_report.html.parent
    md = planted_report.markdown.read_text()
    assert len(planted_report.figures) == len(BLOCKS) + 2
    for path in planted_report.figures:
        assert path.parent == out and path.read_bytes().startswith(PNG)
        assert f"]({path.name})" in md
    for block in BLOCKS:
        assert f"### `{block}`" in md


def test_verdicts_match_the_planted_problems(planted_report):
    (run,) = planted_report.report.runs
    v = run.health.verdicts
    assert v["healthy"].status == "healthy", v["healthy"]
    assert v["collapsed"].status == "problem" and "mask_collapse" in v["collapsed"].kinds
    assert v["collapsed"].text.startswith("collapsed (mask std 0 < 0.02")
    assert v["dead"].status == "problem" and v["dead"].kinds == ("dead_branch",)
    assert v["dead"].text.startswith("dead branch (branch weight")
    # the page says the same, one line per block, in module order
    page = read_page(planted_report.html.read_text())
    assert page.verdicts[0].startswith("healthy no problem at any logged step")
    assert page.verdicts[1].startswith("problem collapsed (mask std 0 < 0.02")
    assert page.verdicts[2].startswith("problem dead branch (branch weight")


def test_warnings_agree_with_the_callback(planted_run, compared_report):
    tb_run, csv_run = compared_report.report.runs
    assert set(planted_run.reported) == {"collapsed|mask_collapse", "dead|dead_branch"}
    # TensorBoard: the warnings the callback logged (attn/problems), with its thresholds
    assert tb_run.health.warnings_source.startswith("logged by the callback")
    assert tb_run.health.thresholds_source == "the run's attn/config"
    # CSV: no texts, so the health rules run again on every logged point: same warnings
    assert csv_run.health.warnings_source.startswith("recomputed")
    for run in (tb_run, csv_run):
        got = {f"{p.block}|{p.kind}": p.step for p in run.health.warnings}
        assert got == planted_run.reported, run.name
    text = read_page(compared_report.html.read_text()).text
    for p in tb_run.health.warnings:
        assert p.message.split(" Try: ")[1].rstrip(".") in text  # the remedy is on the page


def test_metric_summary(planted_report):
    (run,) = planted_report.report.runs
    acc = run.metrics["val/acc"]
    assert acc.final is not None and acc.best is not None and acc.best >= acc.final
    assert acc.final_step == run.log.scalars["val/acc"].steps[-1]
    assert "val/acc final" in planted_report.html.read_text()


def test_csv_fallback_gives_the_same_verdicts(compared_report):
    tb_run, csv_run = compared_report.report.runs
    assert (tb_run.log.kind, csv_run.log.kind) == ("tensorboard", "csv")
    assert csv_run.tags.block_names() == sorted(BLOCKS)  # a CSV has no module order
    for block in BLOCKS:
        assert csv_run.health.verdicts[block].status == tb_run.health.verdicts[block].status
        assert csv_run.health.verdicts[block].kinds == tb_run.health.verdicts[block].kinds
    assert [(p.block, p.kind, p.step) for p in csv_run.health.warnings] == [
        (p.block, p.kind, p.step) for p in tb_run.health.warnings
    ]
    assert csv_run.attention_map is None and tb_run.attention_map is not None  # no images
    assert set(csv_run.block_figures) == set(BLOCKS)


def test_several_runs_side_by_side(compared_report):
    files = compared_report
    report = files.report
    assert [r.name for r in report.runs] == ["tensorboard", "csv"]
    titles = [f.title for f in report.comparisons]
    assert titles == [q.compare.title for q in comparisons()]  # every declared comparison
    assert titles[0] == "normalised router entropy"  # in section order: router first
    assert report.metrics_figure is not None
    assert [s.mode for s in report.metrics] == ["max", "min"]  # loss: lower is better
    page = read_page(files.html.read_text())
    assert {"Run: tensorboard", "Run: csv"} <= set(page.heading_texts("h2"))
    # metrics, the comparisons, the TensorBoard run's maps, a figure per block of each run
    figures = 1 + len(comparisons()) + 1 + 2 * len(BLOCKS)
    assert len(page.png_images()) == len(files.figures) == figures
    assert len({p.name for p in files.figures}) == len(files.figures)  # no file overwritten
    for name in ("val/acc final", "val/loss best (min)"):
        assert name in files.markdown.read_text()


def test_runs_named_alike_stay_apart(planted_run):
    runs = load_runs([planted_run.tensorboard, planted_run.tensorboard], progress=False)
    assert [r.name for r in runs] == ["planted/version_0", "planted/version_0 (2)"]
