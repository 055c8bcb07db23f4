"""The one parser of sectioned command output.

A read-only command that asks several things at once prints a marker line before each answer:
`@@NAME` or `@@NAME ARG` (e.g. `echo @@os; cat /etc/os-release; echo @@kernel; uname -r`).
`parse()` gives the sections in order (a name may repeat: `@@b build-1`, `@@b build-2`);
`split()` gives name -> lines. With `names`, only those names are markers: any other `@@` line
is content of the section it is in.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

MARK = "@@"
_MARKER = re.compile(r"@@([A-Za-z_][\w.-]*)(?: (.*))?$")


@dataclass
class Section:
    name: str
    arg: str = ""  # what follows `@@NAME ` on the marker line
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def marker(line: str, names: Iterable[str] | None = None) -> tuple[str, str] | None:
    """(name, arg) if `line` is a marker (of one of `names`, when given), else None."""
    m = _MARKER.match(line.rstrip("\r"))
    if m is None or (names is not None and m.group(1) not in names):
        return None
    return m.group(1), (m.group(2) or "").strip()


def parse(output: str, names: Iterable[str] | None = None) -> list[Section]:
    """The sections of `output` in order; lines before the first marker are dropped."""
    allowed = None if names is None else frozenset(names)
    out: list[Section] = []
    for line in output.splitlines():
        mk = marker(line, allowed)
        if mk is not None:
            out.append(Section(*mk))
        elif out:
            out[-1].lines.append(line)
    return out


def split(output: str, names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """name -> lines of its section (a repeated name: the lines of all its sections, in order).
    With `names`, every one of them is a key (an empty list when the output lacks it)."""
    names = None if names is None else tuple(names)
    out: dict[str, list[str]] = {n: [] for n in names or ()}
    for s in parse(output, names):
        out.setdefault(s.name, []).extend(s.lines)
    return out


def first(sec: dict[str, list[str]], name: str, default: str = "") -> str:
    """The first non-empty line of a section, stripped (else `default`)."""
    for line in sec.get(name) or ():
        if line.strip():
            return line.strip()
    return default
