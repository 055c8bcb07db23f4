"""Render the real files under the repo's `templates/` with jinja2 (StrictUndefined).

Works from a checkout (templates/ beside provision/) and from an installed wheel (shipped as
provision/_templates); `LLAMA_RIG_TEMPLATES` points elsewhere.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .errors import UnsafeValue
from .values import bad_char, cut


def shipped_dir(name: str) -> Path:
    """`templates` or `baselines`: the folder in an installed wheel (provision/_<name>, see
    pyproject.toml) or, in a checkout, the top-level folder beside provision/."""
    here = Path(__file__).resolve().parent
    for cand in (here / f"_{name}", here.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"llama-rig {name}/ not found in {here} or beside it")


def templates_dir() -> Path:
    env = os.environ.get("LLAMA_RIG_TEMPLATES")
    if env:
        return Path(env)
    try:
        return shipped_dir("templates")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (set LLAMA_RIG_TEMPLATES)") from None


class Rendered(str):
    """Text a filter already escaped for its destination (finalize leaves it alone)."""


def _refuse_control(value: str, where: str) -> None:
    ch = bad_char(value)
    if ch is not None:
        raise UnsafeValue(f"{where}: refusing to write {cut(value)}: the control character "
                          f"U+{ord(ch):04X} would break the file's lines")


def systemd_quote(arg: str) -> Rendered:
    """One argument for an Exec*= line (systemd's own quoting, not the shell's): specifiers `%`
    as `%%`, variables `$` as `$$`, backslash and double quote escaped inside double quotes.
    A control character (a newline would start a new unit line) is refused."""
    s = str(arg)
    _refuse_control(s, "unit file")
    if s and not any(c in s for c in ' \t"\'\\;$%'):
        return Rendered(s)
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return Rendered(f'"{s}"')


def systemd_argv(argv: list[str]) -> Rendered:
    return Rendered(" ".join(systemd_quote(a) for a in argv))


def systemd_value(value) -> Rendered:
    """A plain unit setting (Description=, User=, WorkingDirectory=, ...): specifiers escaped."""
    s = str(value)
    _refuse_control(s, "unit file")
    return Rendered(s.replace("%", "%%"))


@jinja2.pass_context
def _finalize(ctx, value):
    """Every `{{ value }}` of every template: one line only (a newline in a value would add a
    line to a unit, an env file or a script); in unit files `%` is escaped as systemd needs."""
    if isinstance(value, Rendered) or value is None:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    s = str(value)
    _refuse_control(s, ctx.name or "template")
    if (ctx.name or "").endswith((".service.j2", ".socket.j2", ".timer.j2")):
        return s.replace("%", "%%")
    return s


@lru_cache(maxsize=4)
def environment(path: str | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path or str(templates_dir())),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, autoescape=False, finalize=_finalize)
    env.filters["systemd_quote"] = systemd_quote
    env.filters["systemd_argv"] = systemd_argv
    env.filters["systemd_value"] = systemd_value
    env.globals["remote_source"] = remote_source
    return env


def remote_source(name: str) -> Rendered:
    """The text of a program of provision/remote/ (a script template embeds it whole)."""
    from . import remote
    return Rendered(remote.source(name))


def render(name: str, **values: Any) -> str:
    """Render templates/<name> with `values` (a missing value is an error, never blank)."""
    return environment().get_template(name).render(**values)
