"""The report as one self-contained HTML page and as Markdown.

The HTML page carries its style and its figures (base64 PNG ``data:`` URLs): no script, no
font, nothing fetched, so it opens from a file, an e-mail or a CI artifact. The Markdown
document shows the same content and links the PNG files written beside it, for a README or a
pull request.

Every text from the runs (run and block names, notes, paths) is escaped for the format it
lands in: HTML-escaped in the page, Markdown-escaped (or a code span long enough to hold it)
in the document, so a name is shown as it is and never becomes markup.

The page stays under ``limit`` bytes (:data:`PAGE_BYTES`, 20 MB) whatever the run: a
warnings table shows its first and last :data:`TABLE_ROWS` // 2 rows, a run's notes the
first :data:`NOTE_LINES`; when the figures would take the page over the limit they are
embedded with fewer colours (a 256-colour palette), then smaller, and the last ones are
linked to their PNG files beside the page instead of embedded; a page whose text alone
would be over lists the first blocks of each run only. The page says each time what it
left out.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import __version__
from ..core.problems import Problem, phrase
from .document import FigureFile, MetricSummary, Report, ReportTable, RunReport, slug

__all__ = ["NOTE_LINES", "PAGE_BYTES", "TABLE_ROWS", "render_html", "render_markdown"]

#: The most bytes of ``report.html``.
PAGE_BYTES = 20_000_000
#: Rows of a warnings table (its first and last half) on the page and in the Markdown.
TABLE_ROWS = 200
#: Notes listed per run on the page.
NOTE_LINES = 50


CSS = """
:root { --fg:#1d2125; --muted:#5f6b76; --line:#d9dee3; --bg:#ffffff; --soft:#f5f7f9;
        --ok:#1a7f37; --ok-bg:#dafbe1; --bad:#b42318; --bad-bg:#fee4e2; --warn:#9a6700;
        --warn-bg:#fff4d1; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 40px 0 10px; padding-bottom: 6px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 17px; margin: 28px 0 6px; }
h3.block { font-family: ui-monospace, Menlo, Consolas, monospace; }
.overview { display: flex; flex-wrap: wrap; gap: 8px 48px; align-items: flex-start; }
.overview .verdicts { flex: 0 1 auto; min-width: 0; }
.overview .maps { flex: 0 0 auto; max-width: 100%; }
.overview .maps figure { display: table; margin-top: 0; }
.overview .maps figcaption { display: table-caption; caption-side: bottom; }
p { margin: 6px 0; }
.meta, .caption, .note { color: var(--muted); font-size: 13.5px; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
nav { margin: 14px 0 0; font-size: 14px; }
nav a { margin-right: 14px; }
a { color: #0a58ca; text-decoration: none; }
a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 10px 0 14px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12.5px;
         font-weight: 600; white-space: nowrap; }
.badge.healthy { color: var(--ok); background: var(--ok-bg); }
.badge.problem { color: var(--bad); background: var(--bad-bg); }
.badge.recovered { color: var(--warn); background: var(--warn-bg); }
.badge.warned { color: var(--warn); background: var(--warn-bg); }
.badge.nodata { color: var(--muted); background: var(--soft); }
.verdict { margin: 4px 0 10px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
img.maps { image-rendering: pixelated; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.warnings td:nth-child(4), .warnings td:nth-child(5) { min-width: 280px; }
.notes { background: var(--warn-bg); border-left: 4px solid var(--warn); padding: 8px 14px;
         margin: 10px 0; font-size: 13.5px; }
.notes ul { margin: 4px 0; padding-left: 18px; }
details { margin: 8px 0; font-size: 14px; }
summary { cursor: pointer; color: var(--muted); }
footer { margin-top: 48px; color: var(--muted); font-size: 13px; }
"""


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def _metric_cells(summary: MetricSummary) -> tuple[str, str]:
    final = _num(summary.final)
    if summary.final is not None:
        final += f" (step {summary.final_step})"
    best = _num(summary.best)
    if summary.best is not None:
        best += f" (step {summary.best_step})"
    return final, best


def _verdict_counts(run: RunReport) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in run.health.verdicts.values():
        counts[v.status] = counts.get(v.status, 0) + 1
    return counts


def _count(status: str, n: int) -> str:
    """``"1 healthy"``, ``"2 problems"``."""
    return f"{n} {status}{'s' if status == 'problem' and n > 1 else ''}"


def _anchor(*parts: str) -> str:
    """An ``id`` for the page: readable, and distinct for names that slug alike
    (``res/3x3`` and ``res-3x3``)."""
    text = "-".join(slug(p) for p in parts)
    if any(slug(p) != p for p in parts):
        text += "-" + hashlib.sha1("\0".join(parts).encode("utf-8", "surrogatepass")
                                   ).hexdigest()[:8]
    return text


def _steps(run: RunReport) -> str:
    steps = run.steps
    return f"{steps[0]}–{steps[1]}" if steps else "-"


# -- HTML ------------------------------------------------------------------------------------
def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class _Budget:
    """What the page embeds: figure file name -> the PNG to embed (``None``: linked to the
    file beside the page), and the blocks listed per run (``None``: all)."""

    images: dict[str, bytes | None] = field(default_factory=dict)
    blocks: int | None = None
    notes: list[str] = field(default_factory=list)  # what the page left out, said at its top

    def img(self, fig: FigureFile, cls: str = "", width: int | None = None) -> str:
        png = self.images.get(fig.filename, fig.png)
        caption = f"<figcaption>{_e(fig.caption)}</figcaption>" if fig.caption else ""
        if png is None:
            return (f'<figure><p class="note"><a href="{_e(fig.filename)}">{_e(fig.title)}'
                    f"</a> (not embedded: the page stays under its size limit)</p>{caption}"
                    "</figure>")
        data = base64.b64encode(png).decode("ascii")
        style = f' style="width:{width}px"' if width else ""
        klass = f' class="{cls}"' if cls else ""
        return (
            f'<figure><img{klass}{style} alt="{_e(fig.title)}" '
            f'src="data:image/png;base64,{data}">{caption}</figure>'
        )


def _badge(status: str, text: str | None = None) -> str:
    cls = status.replace(" ", "")
    return f'<span class="badge {cls}">{_e(text or status)}</span>'


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """``rows`` are HTML already."""
    klass = f' class="{cls}"' if cls else ""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_columns(report: Report) -> list[str]:
    """The summary table's columns, in the page and in the Markdown document."""
    columns = ["run", "blocks", "verdicts", "warnings", "steps"]
    for spec in report.metrics:
        columns += [f"{spec.name} final", f"{spec.name} best ({spec.mode})"]
    return columns


def _html_summary(report: Report) -> str:
    columns = _summary_columns(report)
    rows = []
    for run in report.runs:
        counts = _verdict_counts(run)
        verdicts = " ".join(
            _badge(status, _count(status, n))
            for status, n in sorted(counts.items())
        ) or '<span class="note">no attention statistics</span>'
        row = [
            f'<td><a href="#{_anchor("run", run.name)}">{_e(run.name)}</a></td>',
            f'<td class="num">{len(run.tags.block_names())}</td>',
            f"<td>{verdicts}</td>",
            f'<td class="num">{len(run.health.warnings) if run.has_attention else "-"}</td>',
            f'<td class="num">{_steps(run)}</td>',
        ]
        for spec in report.metrics:
            row += [f'<td class="num">{_e(c)}</td>' for c in _metric_cells(run.metrics[spec.name])]
        rows.append(row)
    return _html_table(columns, rows)


def _html_extra(table: ReportTable) -> str:
    rows = [[f"<td>{_e(c)}</td>" for c in row] for row in table.rows]
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    return f"<h3>{_e(table.title)}</h3>{_html_table(table.columns, rows)}{note}"


def _shown_rows(items: Sequence, limit: int) -> tuple[list, int]:
    """The first and last ``limit // 2`` of ``items`` and how many were left out between."""
    if len(items) <= limit:
        return list(items), 0
    half = limit // 2
    return list(items[:half]) + list(items[-half:]), len(items) - 2 * half


def _html_warnings(warnings: Sequence[Problem], with_block: bool) -> str:
    columns = (["block"] if with_block else []) + ["step", "problem", "value", "what happened",
                                                     "try"]
    shown, left_out = _shown_rows(warnings, TABLE_ROWS)
    rows = []
    for i, p in enumerate(shown):
        if left_out and i == TABLE_ROWS // 2:
            rows.append([f'<td colspan="{len(columns)}" class="note">… {left_out} more '
                         "warnings …</td>"])
        text, remedy = p.detail, p.hint
        row = [f'<td class="mono">{_e(p.block)}</td>'] if with_block else []
        row += [
            f'<td class="num">{p.step}</td>',
            f"<td>{_e(phrase(p.kind))}</td>",
            f'<td class="num">{_num(p.value)} (threshold {_num(p.threshold)})</td>',
            f"<td>{_e(text)}</td>",
            f"<td>{_e(remedy) or '-'}</td>",
        ]
        rows.append(row)
    return _html_table(columns, rows, "warnings")


def _html_notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes[:NOTE_LINES])
    if len(notes) > NOTE_LINES:
        items += f"<li>… and {len(notes) - NOTE_LINES} more notes</li>"
    return f'<div class="notes"><strong>Notes</strong><ul>{items}</ul></div>'


def _html_thresholds(run: RunReport) -> str:
    t = run.health.thresholds
    rows = [
        [f'<td class="mono">{_e(f.name)}</td>', f'<td class="num">{_e(getattr(t, f.name))}</td>']
        for f in dataclasses.fields(t)
    ]
    return (
        f"<details><summary>Thresholds: {_e(run.health.thresholds_source)}</summary>"
        f"{_html_table(['threshold', 'value'], rows)}</details>"
    )


def _html_run(run: RunReport, several: bool, page: _Budget) -> str:
    out = [f'<h2 id="{_anchor("run", run.name)}">{"Run: " if several else ""}{_e(run.name)}</h2>']
    out.append(
        f'<p class="meta"><code>{_e(run.log.path)}</code> · {_e(run.log.kind)} · steps '
        f"{_steps(run)}</p>"
    )
    out.append(_html_notes(run.notes()))
    if not run.has_attention:
        out.append(f"<p>{_e(run.absence)}</p>")
        return "\n".join(out)
    blocks = run.tags.block_names()
    if page.blocks is not None and len(blocks) > page.blocks:
        out.append(f'<p class="note">The page lists {page.blocks} of the run\'s {len(blocks)} '
                   "blocks (its size limit); report.md lists them all.</p>")
        blocks = blocks[:page.blocks]
    rows = []
    for block in blocks:
        v = run.health.verdicts[block]
        n = len(run.health.block_warnings(block))
        rows.append([
            f'<td class="mono"><a href="#{_anchor(run.name, block)}">{_e(block)}</a></td>',
            f"<td>{_badge(v.status)} {_e(v.text)}</td>",
            f'<td class="num">{n}</td>',
        ])
    head = "h3" if several else "h2"
    # verdicts and the attention maps side by side (they wrap on a narrow window)
    left = [f"<{head}>Verdicts</{head}>", _html_table(["block", "verdict", "warnings"], rows),
            _html_thresholds(run)]
    right = []
    if run.attention_map is not None:
        right = [f"<{head}>Attention maps</{head}>",
                 page.img(run.attention_map, "maps", _map_width(run.attention_map.png))]
    if run.heads_map is not None:
        right += [f"<{head}>Attention heads</{head}>",
                  page.img(run.heads_map, "maps", _map_width(run.heads_map.png))]
    out.append(f'<div class="overview"><div class="verdicts">{"".join(left)}</div>'
               f'<div class="maps">{"".join(right)}</div></div>')
    out.append(f"<{head}>Warnings</{head}>")
    out.append(f'<p class="note">{_e(run.health.warnings_source)}.</p>')
    if run.health.warnings:
        out.append(_html_warnings(run.health.warnings, with_block=True))
    else:
        out.append("<p>No warning.</p>")
    for block in blocks:
        v = run.health.verdicts[block]
        out.append(f'<h3 class="block" id="{_anchor(run.name, block)}">{_e(block)}</h3>')
        out.append(f'<p class="verdict">{_badge(v.status)} {_e(v.text)}</p>')
        fig = run.block_figures.get(block)
        if fig is not None:
            out.append(page.img(fig))
    return "\n".join(out)


def _png_size(png: bytes) -> tuple[int, int]:
    # IHDR: 8-byte signature, 4-byte length, "IHDR", then width and height (big-endian).
    if png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) >= 24:
        return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return 400, 400


def _map_width(png: bytes, height: int = 820, width: int = 1200, least: int = 360) -> int:
    """Display width of the map grid: enlarged (its pixels stay sharp) to 3x, or to ``least``
    pixels for a tiny grid, but at most ``width`` wide and ``height`` tall."""
    w, h = _png_size(png)
    return int(min(max(3 * w, least), width, height * w / max(h, 1)))


def _render(report: Report, page: _Budget) -> str:
    several = len(report.runs) > 1
    nav = ['<a href="#summary">summary</a>']
    if report.metrics_figure is not None:
        nav.append('<a href="#metrics">metrics</a>')
    if report.comparisons:
        nav.append('<a href="#comparison">comparison</a>')
    nav += [f'<a href="#{_anchor("run", r.name)}">{_e(r.name)}</a>' for r in report.runs]
    body = [
        f"<h1>{_e(report.title)}</h1>",
        f'<p class="meta">{len(report.runs)} run{"s" if several else ""} · generated '
        f"{_e(report.generated)} by lightning-attn {_e(__version__)}</p>",
        f"<nav>{''.join(nav)}</nav>",
        '<h2 id="summary">Summary</h2>',
        _html_summary(report),
    ]
    if page.notes:
        body.insert(3, _html_notes(page.notes))
    body += [_html_extra(t) for t in report.tables]
    if report.metrics_figure is not None:
        body += ['<h2 id="metrics">Metrics</h2>', page.img(report.metrics_figure)]
    if report.comparisons:
        body.append('<h2 id="comparison">Attention statistics side by side</h2>')
        left_out = (
            f" Not shown (no attention statistics): {', '.join(report.not_compared)}."
            if report.not_compared else ""
        )
        body.append('<p class="note">Training statistics of every block, one panel per run, '
                    f"same axes; a block has the same colour in every run.{_e(left_out)}</p>")
        body += [page.img(f) for f in report.comparisons]
    body += [_html_run(run, several, page) for run in report.runs]
    body.append(
        "<footer>Verdicts and warnings follow the health rules of "
        "<code>lightning_attn.callbacks.health</code> with each run's thresholds. "
        "Solid lines: training; dashed with dots: validation; stars: test. Dotted grey: "
        "thresholds. Red: the step of a warning.</footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(report.title)}</title><style>{CSS}</style></head>"
        f"<body><main>\n" + "\n".join(b for b in body if b) + "\n</main></body></html>\n"
    )


def _size(text: str) -> int:
    return len(text.encode("utf-8", "backslashreplace"))  # as the page is written


def _smaller(png: bytes, scale: float) -> bytes:
    """``png`` in a 256-colour palette, ``scale`` times as wide and tall."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.quantize(256).save(out, format="PNG", optimize=True)
        return out.getvalue()


def _hidden_blocks(report: Report, page: _Budget) -> set[str]:
    """File names of the block figures of blocks the page does not list."""
    if page.blocks is None:
        return set()
    return {run.block_figures[b].filename for run in report.runs
            for b in run.tags.block_names()[page.blocks:] if b in run.block_figures}


def render_html(report: Report, limit: int = PAGE_BYTES) -> str:
    """The self-contained HTML page, at most ``limit`` bytes (see the module docstring)."""
    page = _Budget()
    text = _render(report, page)
    if _size(text) <= limit:
        return text
    figures = report.figures()
    page.images = dict.fromkeys(f.filename for f in figures)  # every figure linked
    # room for the note saying so (its longest form)
    page.notes = [f"This page stays under {limit / 1e6:g} MB: its figures are embedded with "
                  f"256 colours at 35 % of their size, {len(figures)} of them linked to their "
                  "PNG files beside it instead."]
    if _size(_render(report, page)) > limit:  # the text alone is over: fewer blocks
        low, high = 0, max(len(r.tags.block_names()) for r in report.runs)
        while low < high:  # the most blocks per run that fit
            page.blocks = (low + high + 1) // 2
            if _size(_render(report, page)) <= limit:
                low = page.blocks
            else:
                high = page.blocks - 1
        page.blocks = low
    hidden = _hidden_blocks(report, page)
    shown = [f for f in figures if f.filename not in hidden]
    room = limit - _size(_render(report, page)) - 1024

    def cost(png: bytes) -> int:  # base64 and the <img> around it
        return 4 * -(-len(png) // 3) + 512

    scale = 1.0
    encoded = {f.filename: _smaller(f.png, scale) for f in shown}
    total = sum(cost(b) for b in encoded.values())
    if total > room:  # bytes go with the area: one more try, smaller by the ratio
        scale = max(0.35, 0.9 * math.sqrt(max(room, 0) / total))
        encoded = {f.filename: _smaller(f.png, scale) for f in shown}
    how = "with 256 colours" + (f" at {round(scale * 100)} % of their size" if scale < 1 else "")
    linked = 0
    for f in shown:  # in page order, as many as fit; the rest are linked
        if cost(encoded[f.filename]) <= room:
            page.images[f.filename] = encoded[f.filename]
            room -= cost(encoded[f.filename])
        else:
            linked += 1
    page.notes = [f"This page stays under {limit / 1e6:g} MB: its figures are embedded {how}"
                  + (f", {linked} of them linked to their PNG files beside it instead"
                     if linked else "") + "."]
    text = _render(report, page)
    for f in reversed(shown):  # should the notes have tipped it over
        if _size(text) <= limit:
            break
        if page.images.get(f.filename) is not None:
            page.images[f.filename] = None
            text = _render(report, page)
    return text


# -- Markdown --------------------------------------------------------------------------------
#: What may start Markdown (or HTML) inline: backslash-escaped, so it shows as itself.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~&!$])")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")


def _md(text: object) -> str:
    """``text`` as Markdown that shows it as it is (one line)."""
    return _MD_SPECIAL.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(text)))


def _md_code(text: object, in_table: bool = False) -> str:
    """``text`` as a code span: fenced by more backticks than it holds in a row, padded when
    it starts or ends with a backtick or a space (the padding is not shown). In a table, a
    ``|`` is escaped even in a code span (GFM splits the cells first)."""
    text = _LINE_BREAKS.sub(" ", str(text))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    if text[:1] in ("`", " ") or text[-1:] in ("`", " "):
        text = f" {text} "
    if in_table:
        text = text.replace("|", "\\|")
    return f"{fence}{text}{fence}"


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``columns`` are plain text; ``rows`` are Markdown already (numbers as they are)."""
    lines = ["| " + " | ".join(_md(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_img(fig: FigureFile) -> str:
    text = f"![{_md(fig.title)}]({fig.filename})"
    return f"{text}\n\n_{_md(fig.caption)}_" if fig.caption else text


def render_markdown(report: Report) -> str:
    """The Markdown document (figures as links to the PNG files beside it)."""
    several = len(report.runs) > 1
    out = [f"# {_md(report.title)}", "",
           f"{len(report.runs)} run{'s' if several else ''} · generated {report.generated} by "
           f"lightning-attn {__version__}", "", "## Summary", ""]
    columns = _summary_columns(report)
    rows = []
    for run in report.runs:
        counts = _verdict_counts(run)
        verdicts = ", ".join(_count(s, n) for s, n in sorted(counts.items()))
        row = [_md(run.name), len(run.tags.block_names()),
               verdicts or "no attention statistics",
               len(run.health.warnings) if run.has_attention else "-", _steps(run)]
        for spec in report.metrics:
            row += [_md(c) for c in _metric_cells(run.metrics[spec.name])]
        rows.append(row)
    out += [_md_table(columns, rows), ""]
    for table in report.tables:
        out += [f"### {_md(table.title)}", "",
                _md_table(table.columns, [[_md(c) for c in row] for row in table.rows]), ""]
        if table.note:
            out += [_md(table.note), ""]
    if report.metrics_figure is not None:
        out += ["## Metrics", "", _md_img(report.metrics_figure), ""]
    if report.comparisons:
        out += ["## Attention statistics side by side", ""]
        if report.not_compared:
            out += [f"Not shown (no attention statistics): "
                    f"{_md(', '.join(report.not_compared))}.", ""]
        for fig in report.comparisons:
            out += [_md_img(fig), ""]
    for run in report.runs:
        h2, h3 = ("##", "###")
        out += [f"{h2} {'Run: ' if several else ''}{_md(run.name)}", "",
                f"{_md_code(run.log.path)} · {run.log.kind} · steps {_steps(run)}", ""]
        notes = run.notes()
        if notes:
            out += ["> **Notes**"] + [f"> - {_md(n)}" for n in notes] + [""]
        if not run.has_attention:
            out += [_md(run.absence), ""]
            continue
        rows = [[_md_code(b, in_table=True), f"**{v.status}**: {_md(v.text)}",
                 len(run.health.block_warnings(b))]
                for b, v in ((b, run.health.verdicts[b]) for b in run.tags.block_names())]
        out += [f"{h3} Verdicts", "", _md_table(["block", "verdict", "warnings"], rows), "",
                f"Thresholds: {_md(run.health.thresholds_source)}.", "",
                f"{h3} Warnings", "", f"_{_md(run.health.warnings_source)}._", ""]
        if run.health.warnings:
            wrows = []
            shown, left_out = _shown_rows(run.health.warnings, TABLE_ROWS)
            for i, p in enumerate(shown):
                if left_out and i == TABLE_ROWS // 2:
                    wrows.append(["…", "", f"{left_out} more warnings", "", "", ""])
                text, remedy = p.detail, p.hint
                wrows.append([_md_code(p.block, in_table=True), p.step, _md(phrase(p.kind)),
                              f"{_num(p.value)} (threshold {_num(p.threshold)})", _md(text),
                              _md(remedy or "-")])
            out += [_md_table(["block", "step", "problem", "value", "what happened", "try"],
                              wrows), ""]
        else:
            out += ["No warning.", ""]
        if run.attention_map is not None:
            out += [f"{h3} Attention maps", "", _md_img(run.attention_map), ""]
        if run.heads_map is not None:
            out += [f"{h3} Attention heads", "", _md_img(run.heads_map), ""]
        for block in run.tags.block_names():
            v = run.health.verdicts[block]
            out += [f"{h3} {_md_code(block)}", "", f"**{v.status}**: {_md(v.text)}", ""]
            fig = run.block_figures.get(block)
            if fig is not None:
                out += [_md_img(fig), ""]
    return "\n".join(out).rstrip() + "\n"
