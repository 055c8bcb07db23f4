"""The hostile-input catalog (issue 13): malformed and hostile inventories, lock values and task
options. Each case is refused with one line naming file, host and key, or proven harmless (a
canary file that must not appear, a unit that keeps its line count, argv that keeps its words).

OUTCOMES collects what each case did; conftest.py prints the summary line at the end of the run.
"""
from __future__ import annotations

OUTCOMES: dict[tuple[str, str], str] = {}  # (catalog part, case) -> "refused" | "harmless"


def record(part: str, case: str, outcome: str) -> None:
    assert outcome in ("refused", "harmless"), outcome
    OUTCOMES[(part, case)] = outcome
