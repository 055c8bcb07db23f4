"""Render the real files under the repo's `templates/` with jinja2 (StrictUndefined).

Works from a checkout (templates/ beside provision/); `LLAMA_RIG_TEMPLATES` points elsewhere.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2


def templates_dir() -> Path:
    env = os.environ.get("LLAMA_RIG_TEMPLATES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "templates", here / "templates"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"llama-rig templates/ not found next to {here} (set LLAMA_RIG_TEMPLATES)")


def systemd_quote(arg: str) -> str:
    """One argument for an ExecStart= line (systemd's own quoting, not the shell's)."""
    s = str(arg)
    if s and not any(c in s for c in ' \t"\'\\;$%') :
        return s
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{s}"'


def systemd_argv(argv: list[str]) -> str:
    return " ".join(systemd_quote(a) for a in argv)


@lru_cache(maxsize=4)
def environment(path: str | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path or str(templates_dir())),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["systemd_quote"] = systemd_quote
    env.filters["systemd_argv"] = systemd_argv
    return env


def render(name: str, **values: Any) -> str:
    """Render templates/<name> with `values` (a missing value is an error, never blank)."""
    return environment().get_template(name).render(**values)
