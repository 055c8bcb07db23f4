"""Injected output: rich on a terminal, plain lines otherwise (testable, httpie-style)."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console as RichConsole
from rich.table import Table
from rich.text import Text

from .secrets import redact


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
        self._out = RichConsole(file=self.env.stdout, force_terminal=self.fancy,
                                no_color=not self.fancy, highlight=False, emoji=False,
                                width=None if self.fancy else 200, soft_wrap=not self.fancy)
        self._err = RichConsole(file=self.env.stderr, force_terminal=self.fancy,
                                no_color=not self.fancy, highlight=False, emoji=False,
                                width=None if self.fancy else 200, soft_wrap=not self.fancy)

    # -- plain text -------------------------------------------------------
    def line(self, text: str = "", style: str | None = None) -> None:
        with self._lock:
            self._out.print(redact(text), style=style, markup=False)

    def host_line(self, host: str, text: str, style: str | None = None) -> None:
        self.line(f"[{host}] {text}", style=style)

    def error(self, text: str) -> None:
        with self._lock:
            self._err.print(redact(text), style="bold red" if self.fancy else None, markup=False)

    def warn(self, text: str) -> None:
        with self._lock:
            self._err.print(redact("warning: " + text), style="yellow" if self.fancy else None,
                            markup=False)

    def diff(self, text: str) -> None:
        with self._lock:
            for ln in redact(text).splitlines():
                style = None
                if self.fancy:
                    style = "green" if ln.startswith("+") else "red" if ln.startswith("-") else None
                self._out.print(ln, style=style, markup=False)

    # -- tables -----------------------------------------------------------
    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.fancy:
            # cells are plain text, never rich markup ("[/x]" in a value must not crash)
            t = Table(title=Text(redact(title)))
            for c in columns:
                t.add_column(Text(c))
            for r in rows:
                t.add_row(*[Text(redact(str(v))) for v in r])
            with self._lock:
                self._out.print(t)
        else:
            self.line(title)
            widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c)
                      for i, c in enumerate(columns)]
            self.line("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)).rstrip())
            for r in rows:
                self.line("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())

    @property
    def rich(self) -> RichConsole:
        return self._out
