"""Write the docs' tables from the declarations in ``lightning_attn.core`` (never by hand).

    python scripts/docs_tables.py          # rewrite every generated table in place
    python scripts/docs_tables.py --check  # exit 1 and name each stale table

A generated table sits between two markers in a Markdown file::

    <!-- generated: NAME (python scripts/docs_tables.py) -->
    | ... |
    <!-- end: NAME -->

and ``TABLES[NAME]`` makes it. ``tests/test_docs.py`` runs the check, so a declaration that
changes without its docs fails the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_attn.core import categories  # noqa: E402
from lightning_attn.core.problems import PROBLEM_KINDS, VERDICT_WORDS, HealthThresholds  # noqa: E402
from lightning_attn.core.tags import tag_table  # noqa: E402

#: The files that hold generated tables.
PAGES = ("README.md", "docs/diagnostics.md", "docs/report.md", "docs/design.md")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _means(category: type, full: bool = False) -> str:
    """What a warning means: the first paragraph of its category's docstring (``full``: all
    of it), as one line."""
    doc = (category.__doc__ or "").strip()
    text = " ".join((doc if full else doc.split("\n\n")[0]).split())
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    first = text.split(" ", 1)[0]
    if sum(c.isupper() for c in first) == 1:  # "A mask ..." -> "a mask ..."; "NaN ..." stays
        text = text[0].lower() + text[1:]
    return text.rstrip(".")


def _categories() -> list[type]:
    """Every warning category a user can see, the problem kinds' first, in kind order."""
    kinds = [kind.category for kind in PROBLEM_KINDS.values()]
    others = [getattr(categories, name) for name in categories.__all__]
    others = [c for c in others if issubclass(c, categories.AttentionWarning)
              and c is not categories.AttentionWarning and c not in kinds]
    return kinds + others


def _thresholds(names: Sequence[str]) -> str:
    defaults = HealthThresholds()
    return ", ".join(f"`{n}`={getattr(defaults, n):g}" for n in names)


def warnings_short() -> str:
    """README: each warning, what it means, what to try (in a few words)."""
    rows = [(f"`{c.__name__}`", _means(c), c.remedy) for c in _categories()]
    return _markdown(("warning", "means", "try"), rows)


def warnings_full() -> str:
    """docs/diagnostics.md: each warning with its kind, thresholds and full hint."""
    kind_of = {kind.category: kind for kind in PROBLEM_KINDS.values()}
    rows = []
    for category in _categories():
        kind = kind_of.get(category)
        where = "—" if kind is None else (
            f"`{kind.name}`" + (f" ({_thresholds(kind.thresholds)})" if kind.thresholds else ""))
        rows.append((f"`{category.__name__}`", where, _means(category, full=True),
                     kind.hint if kind is not None else category.remedy))
    return _markdown(("warning", "kind (thresholds)", "means", "try"), rows)


def tags() -> str:
    """docs/diagnostics.md: every scalar tag and what it is."""
    return _markdown(("tag", "value"), [(f"`{tag}`", what) for tag, what in tag_table()])


def verdicts() -> str:
    """docs/report.md: the verdict words."""
    return _markdown(("verdict", "means"), list(VERDICT_WORDS.items()))


def thresholds() -> str:
    """docs/diagnostics.md: every health threshold, its default and what it means (the
    ``Args`` of ``HealthThresholds``' docstring, as ``--help`` shows them)."""
    import docstring_parser  # jsonargparse[signatures] brings it

    means = {}
    for param in docstring_parser.parse(HealthThresholds.__doc__ or "").params:
        for name in param.arg_name.split(", "):
            means[name] = " ".join(param.description.split()).replace("``", "`")
    rows = [(f"`{f.name}`", f"{f.default:g}", means.get(f.name, ""))
            for f in dataclasses.fields(HealthThresholds)]
    return _markdown(("threshold", "default", "means"), rows)


def private_apis() -> str:
    """docs/design.md: every reach-in past a library's public API (declared with its canary
    in tests/test_private_apis.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "private_apis", ROOT / "tests/test_private_apis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [(f"`{name}`", whose, where, why)
            for name, (whose, where, why) in module.PRIVATE_APIS.items()]
    return _markdown(("private name", "of", "used in", "why"), rows)


#: name -> the function that makes that table.
TABLES: dict[str, Callable[[], str]] = {
    "warnings-short": warnings_short,
    "warnings": warnings_full,
    "tags": tags,
    "verdicts": verdicts,
    "thresholds": thresholds,
    "private-apis": private_apis,
}

_BLOCK = re.compile(
    r"(?P<open><!-- generated: (?P<name>[\w-]+) \(python scripts/docs_tables\.py\) -->\n)"
    r"(?P<body>.*?)(?P<close><!-- end: (?P=name) -->)", re.S)


def render(text: str) -> str:
    """``text`` with every generated table made anew."""
    def make(found: re.Match) -> str:
        name = found.group("name")
        if name not in TABLES:
            raise KeyError(f"no generator for the table {name!r} (known: {sorted(TABLES)})")
        return found.group("open") + TABLES[name]() + "\n" + found.group("close")

    return _BLOCK.sub(make, text)


def stale(root: Path = ROOT) -> list[str]:
    """``"<page>: <table>"`` for every generated table that differs from its declarations."""
    out = []
    for page in PAGES:
        text = (root / page).read_text(encoding="utf-8")
        fresh = render(text)
        if fresh != text:
            old = {m.group("name"): m.group(0) for m in _BLOCK.finditer(text)}
            new = {m.group("name"): m.group(0) for m in _BLOCK.finditer(fresh)}
            out += [f"{page}: {name}" for name in old if old[name] != new.get(name)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only say which tables are stale (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for line in found:
            print(f"stale: {line}")
        return 1 if found else 0
    for page in PAGES:
        path = ROOT / page
        text = path.read_text(encoding="utf-8")
        path.write_text(render(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
