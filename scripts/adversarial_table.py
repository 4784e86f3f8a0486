"""Count the adversarial tables: every bad or edge input the tests try, by outcome.

Each table is a test module whose ``CASES`` list the inputs with their expected outcome
(``clear``: an error naming the argument and value; ``correct``: handled as documented); the
tests check each row. This prints the issue's table::

    .venv/bin/python scripts/adversarial_table.py
"""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "blocks": "tests.blocks.test_adversarial",
    "insert_attention": "tests.modules.test_adversarial_insert",
    "callback": "tests.callbacks.test_adversarial",
    "CLI": "tests.test_cli_errors",
    "report": "tests.report.test_adversarial",
}


def outcome(case) -> str:
    if isinstance(case, tuple):  # (args, key) rows of the CLI, (id, outcome, ...) of the report
        return case[1] if isinstance(case[1], str) and case[1] in ("clear", "correct") else (
            "clear")
    return case.outcome


def main() -> None:
    sys.path.insert(0, str(ROOT))
    rows, total = [], Counter()
    for name, module in TABLES.items():
        cases = getattr(importlib.import_module(module), "CASES", None)
        if cases is None:
            cases = importlib.import_module(module).BAD
        counts = Counter(outcome(c) for c in cases)
        total.update(counts)
        rows.append((name, len(cases), counts))
    print("| inputs | rows | clear error | correct handling | raw error | silent |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, c in rows + [("all", sum(r[1] for r in rows), total)]:
        print(f"| {name} | {n} | {c['clear']} | {c['correct']} | {c['raw']} | {c['silent']} |")


if __name__ == "__main__":
    main()
