"""Injected output: rich on a terminal, plain lines otherwise (testable, httpie-style).

Off a terminal rich is not even imported (it is a fifth of a no-op run's start-up): `plain()`
writes what rich writes there -- control characters it drops dropped, tabs expanded to 8 cells.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from .secrets import redact

if TYPE_CHECKING:
    from rich.console import Console as RichConsole

_DROPPED = dict.fromkeys((7, 8, 11, 12, 13))  # what rich strips from printed text (BEL BS VT FF CR)


def _cells(s: str) -> int:
    """Terminal cells of `s` as rich counts them (control characters: none)."""
    if s.isascii() and s.isprintable():
        return len(s)
    from rich.cells import cell_len
    return cell_len(s)


def plain(text: str, tab_size: int = 8) -> str:
    """`text` as rich prints it off a terminal (no styles, no wrapping): without the control
    characters rich drops, each tab a space and then spaces up to the next tab stop (in cells)."""
    text = text.translate(_DROPPED)
    if "\t" not in text:
        return text
    out = []
    for line in text.split("\n"):
        pos, parts = 0, []
        chunks = line.split("\t")
        for i, chunk in enumerate(chunks):
            pos += _cells(chunk)
            parts.append(chunk)
            if i < len(chunks) - 1:
                pos += 1
                pad = (tab_size - pos % tab_size) % tab_size
                parts.append(" " * (1 + pad))
                pos += pad
        out.append("".join(parts))
    return "\n".join(out)


@dataclass
class Environment:
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    isatty: bool | None = None

    def __post_init__(self) -> None:
        if self.isatty is None:
            try:
                self.isatty = self.stdout.isatty()
            except (AttributeError, ValueError):
                self.isatty = False


class Console:
    """All user-facing output goes through here. Every line passes the secret redactor."""

    def __init__(self, env: Environment | None = None):
        self.env = env or Environment()
        self.fancy = bool(self.env.isatty)
        self._lock = threading.Lock()
        self._consoles: dict[str, "RichConsole"] = {}

    def _console(self, which: str) -> "RichConsole":
        if which not in self._consoles:
            from rich.console import Console as RichConsole
            self._consoles[which] = RichConsole(
                file=self.env.stdout if which == "out" else self.env.stderr,
                force_terminal=self.fancy, no_color=not self.fancy, highlight=False, emoji=False,
                width=None if self.fancy else 200, soft_wrap=not self.fancy)
        return self._consoles[which]

    def _print(self, which: str, text: str, style: str | None = None) -> None:
        """One line (already redacted; the caller holds the lock)."""
        if self.fancy:
            self._console(which).print(text, style=style, markup=False)
            return
        f = self.env.stdout if which == "out" else self.env.stderr
        f.write(plain(text) + "\n")
        f.flush()

    # -- plain text -------------------------------------------------------
    def line(self, text: str = "", style: str | None = None) -> None:
        with self._lock:
            self._print("out", redact(text), style)

    def host_line(self, host: str, text: str, style: str | None = None) -> None:
        self.line(f"[{host}] {text}", style=style)

    def error(self, text: str) -> None:
        with self._lock:
            self._print("err", redact(text), "bold red" if self.fancy else None)

    def warn(self, text: str) -> None:
        with self._lock:
            self._print("err", redact("warning: " + text), "yellow" if self.fancy else None)

    def diff(self, text: str) -> None:
        with self._lock:
            for ln in redact(text).splitlines():
                style = None
                if self.fancy:
                    style = "green" if ln.startswith("+") else "red" if ln.startswith("-") else None
                self._print("out", ln, style)

    # -- tables -----------------------------------------------------------
    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.fancy:
            from rich.table import Table
            from rich.text import Text
            # cells are plain text, never rich markup ("[/x]" in a value must not crash)
            t = Table(title=Text(redact(title)))
            for c in columns:
                t.add_column(Text(c))
            for r in rows:
                t.add_row(*[Text(redact(str(v))) for v in r])
            with self._lock:
                self._console("out").print(t)
        else:
            self.line(title)
            widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c)
                      for i, c in enumerate(columns)]
            self.line("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)).rstrip())
            for r in rows:
                self.line("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())

    @property
    def rich(self) -> "RichConsole":
        return self._console("out")
