"""The page stays under its size limit whatever the run: figures shrunk or linked, long
tables and notes cut, blocks listed only as far as they fit; and it says so."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from lightning_attn.core.problems import HealthThresholds, Problem, Verdict
from lightning_attn.report import write_report
from lightning_attn.report.document import FigureFile, Report, RunReport
from lightning_attn.report.page import NOTE_LINES, TABLE_ROWS, render_html
from lightning_attn.report.reading import RunLog
from lightning_attn.report.series import BlockSeries, RunTags
from lightning_attn.report.verdicts import RunHealth

from .html_page import read_page
from .long_runs import BLOCKS, STEPS, config, write_long_run


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def test_a_pathological_run_stays_under_the_limit(tmp_path):
    """Hundreds of warnings, of bad records, a noisy image of 2 MB and a block's figure: a
    limit of 200 kB holds, and the page says what it left out."""
    block = BLOCKS[0]
    problems = [{"block": block, "kind": kind, "value": 0.6, "threshold": 0.5, "step": s,
                 "message": "saturated " + "x" * 200}
                for s in STEPS for kind in ("mask_saturation", "mask_collapse")]
    bad = [("attn/problems", s, "{not json") for s in STEPS[::3]]
    write_long_run(tmp_path / "run", conf=config(), problems=problems, texts=bad,
                   image=_noise_png(800), blocks=(block,))
    limit = 200_000
    files = write_report(tmp_path / "run", tmp_path / "out", progress=False, page_limit=limit)
    html = files.html.read_text(encoding="utf-8")
    assert len(html.encode("utf-8")) <= limit
    page = read_page(html)
    assert f"This page stays under {limit / 1e6:g} MB" in page.text
    assert f"{len(problems) - TABLE_ROWS} more warnings" in page.text
    (run,) = files.report.runs
    assert len(run.notes()) >= len(bad)  # a note for each bad record
    assert f"and {len(run.notes()) - NOTE_LINES} more notes" in page.text
    embedded = page.png_images()
    linked = [u for u in page.urls if u.endswith(".png")]
    assert len(embedded) + len(linked) == len(files.figures)  # each shown or linked
    for name in linked:
        assert (files.html.parent / name).exists()
    # the Markdown lists the same rows around the same cut
    assert f"{len(problems) - TABLE_ROWS} more warnings" in files.markdown.read_text()


def _many_blocks(n: int) -> Report:
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    names = [f"net.layers.{i}.attention.block" for i in range(n)]
    tags = RunTags(blocks={"train": {b: BlockSeries(b) for b in names}})
    verdicts = {b: Verdict(b, "healthy", "no problem at any logged step " + "y" * 80)
                for b in names}
    health = RunHealth(HealthThresholds(), "defaults", [Problem(
        names[0], "mask_collapse", 0.0, 0.02, 5, "std", "d", "h")], "logged", verdicts)
    run = RunReport(RunLog("run", tmp := __import__("pathlib").Path("."), "tensorboard"), tags,
                    health)
    run.block_figures = {b: FigureFile(f"{i}.png", b, tiny.getvalue())
                         for i, b in enumerate(names)}
    del tmp
    return Report("many", "now", [run], [])


def test_a_page_whose_text_alone_is_too_long_lists_the_first_blocks():
    report = _many_blocks(3000)
    limit = 400_000
    html = render_html(report, limit)
    assert len(html.encode("utf-8")) <= limit
    text = read_page(html).text
    assert "blocks (its size limit); report.md lists them all" in text
    listed = int(text.split("The page lists ")[1].split(" ")[0])
    assert 100 < listed < 3000
    assert read_page(render_html(_many_blocks(20), limit)).text.count("page lists") == 0


def test_a_small_page_is_not_touched():
    report = _many_blocks(5)
    assert render_html(report) == render_html(report, 10**9)
    assert "stays under" not in render_html(report)
    assert json.dumps(len(render_html(report))) != "0"


def test_the_docs_state_the_limits_as_declared():
    """docs/report.md's "Long runs" quotes the limits: each as the code declares it."""
    from pathlib import Path

    from lightning_attn.report.curves import CURVE_POINTS
    from lightning_attn.report.images import (
        IMAGE_DECODE_BYTES,
        SHOWN_HEIGHT,
        SHOWN_WIDTH,
        STRIP_BYTES,
    )
    from lightning_attn.report.page import PAGE_BYTES

    page = (Path(__file__).parents[2] / "docs" / "report.md").read_text()
    section = " ".join(page.split("## Long runs", 1)[1].split("\n## ", 1)[0].split())
    for said in (f"keeps at most {CURVE_POINTS} points", f"at most {CURVE_POINTS // 4} ranges",
                 f"up to {CURVE_POINTS} points is drawn whole",
                 f"fits {SHOWN_WIDTH} x {SHOWN_HEIGHT} pixels",
                 f"about {STRIP_BYTES >> 20} MB of pixels",
                 f"up to {IMAGE_DECODE_BYTES >> 20} MB of pixels",
                 f"stays under {PAGE_BYTES // 10**6} MB", f"first and last {TABLE_ROWS // 2} rows",
                 f"notes their first {NOTE_LINES}", f"per series ({CURVE_POINTS})"):
        assert said in section, said
