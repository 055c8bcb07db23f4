"""Prints the catalog's summary line: how many hostile/malformed cases it holds and what they did."""
from __future__ import annotations

from tests.catalog import OUTCOMES, SIZE


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    refused = sum(1 for v in OUTCOMES.values() if v == "refused")
    harmless = len(OUTCOMES) - refused
    total = sum(SIZE.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(SIZE.items()))
    terminalreporter.write_line(
        f"hostile-input catalog: {total} cases ({parts}); this run: {len(OUTCOMES)} passed — "
        f"{refused} refused with one line, {harmless} proven harmless")
