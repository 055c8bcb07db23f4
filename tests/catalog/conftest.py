"""Prints the catalog's summary line: how many hostile/malformed cases ran and what they did."""
from __future__ import annotations

from collections import Counter

from tests.catalog import OUTCOMES


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    refused = sum(1 for v in OUTCOMES.values() if v == "refused")
    parts = Counter(part for part, _ in OUTCOMES)
    terminalreporter.write_line(
        f"hostile-input catalog: {len(OUTCOMES)} cases passed ("
        + ", ".join(f"{k} {v}" for k, v in sorted(parts.items()))
        + f"): {refused} refused with one line, {len(OUTCOMES) - refused} proven harmless")
