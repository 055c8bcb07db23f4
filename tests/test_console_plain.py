"""Off a terminal the console writes without rich (not imported: start-up time); what it writes
is exactly what rich wrote there."""
from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

from provision.console import Console, Environment, plain

ROOT = Path(__file__).resolve().parents[1]


def rich_plain(text: str) -> str:
    from rich.console import Console as RichConsole
    out = io.StringIO()
    RichConsole(file=out, force_terminal=False, no_color=True, highlight=False, emoji=False,
                width=200, soft_wrap=True).print(text, markup=False)
    return out.getvalue()


CASES = ["", "plain", "a\tb", "\tlead", "trail\t", "1234567\tx", "12345678\ty", "a\t\tb\tc",
         "two\nlines\twith\ttabs", "cr\rx", "crlf\r\nnext", "bell\x07 bs\x08 vt\x0b ff\x0c",
         "\x1b[31mred\x1b[0m", "uni ✓ 日本\tx", "日本語\t|", "emoji 🙂\t|", "[bold]x[/bold] :warning:",
         "trailing   ", "x" * 250, "a\n", "\n\n", "\x00nul\x7fdel", "tab\tat\t\tend\t"]


def test_plain_is_what_rich_writes():
    for s in CASES:
        assert plain(s) + "\n" == rich_plain(s), repr(s)
    rnd = random.Random(19)
    alphabet = "ab \t\n\r\x07\x1b日✓🙂[]:"
    for _ in range(400):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30)))
        assert plain(s) + "\n" == rich_plain(s), repr(s)


def test_every_kind_of_line_off_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    c = Console(Environment(out, err, isatty=False))
    c.line("a\tb", style="bold")
    c.host_line("rig", "x [red]y[/red]")
    c.error("E\tz")
    c.warn("w")
    c.diff("+a\n-b")
    c.table("t", ["k", "v"], [["key", "va\tl"]])
    assert out.getvalue() == ("a       b\n[rig] x [red]y[/red]\n+a\n-b\nt\nk    v\n"
                              "key  va l\n")
    assert err.getvalue() == "E       z\nwarning: w\n"


def test_a_plain_run_does_not_import_rich():
    code = ("import io, sys; from provision.console import Console, Environment; "
            "c = Console(Environment(io.StringIO(), io.StringIO(), False)); c.line('x'); c.table('t', ['a'], [['b']]); "
            "print(any(m == 'rich' or m.startswith('rich.') for m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
