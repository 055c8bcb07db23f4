"""Task options (`invoke bench --reps 3`, `gpu.power --watts 300`, ...): parsed and checked on this
machine before any host is contacted. Every problem is one line `command line: --flag: ...`
(UsageError, exit status 2).

invoke hands options over as text when their default is None (which is how tasks.py declares
them), so a number is converted here -- never by int() deep inside a task, where a typo would
end in a traceback after the rig was already contacted.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from . import values
from .errors import RigError, UsageError
from .values import cut

SERVICE_MODES = ("auto", "stop", "keep")
PARALLEL = (1, 64)  # provision --parallel
WATTS = (10, 2000)  # gpu.power --watts: the inventory's range for gpus.power_limit
LOG_LINES = (1, 100000)  # service.logs -n
REPS = (1, 100)  # bench/tune --reps
TOKENS = (1, 1 << 20)  # bench --prompt/--gen
DEPTH = (1, 1 << 24)  # tune --depth, each bench depth
INTERVAL = (0.5, 86400)  # status --watch --interval, seconds


def _fail(flag: str, text: str) -> UsageError:
    return UsageError(f"command line: {flag}: {text}")


def integer(flag: str, value: Any, default: int, lo: int, hi: int) -> int:
    """A whole number between lo and hi; None -> default."""
    if value is None:
        return default
    rng = f"between {lo} and {hi}"
    if isinstance(value, bool):
        raise _fail(flag, f"must be an integer {rng}, got {cut(value)}")
    if isinstance(value, int):
        n = value
    else:
        s = str(value).strip()
        try:
            n = int(s, 10)
        except ValueError:
            raise _fail(flag, f"must be an integer {rng}, got {cut(str(value))}") from None
    if not lo <= n <= hi:
        raise _fail(flag, f"must be an integer {rng}, got {n if abs(n) < 10**12 else cut(str(value))}")
    return n


def number(flag: str, value: Any, lo: float, hi: float) -> float | None:
    """A finite number between lo and hi; None stays None."""
    if value is None:
        return None
    rng = f"between {lo:g} and {hi:g}"
    try:
        x = float(str(value).strip())
    except ValueError:
        raise _fail(flag, f"must be a number {rng}, got {cut(str(value))}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise _fail(flag, f"must be a number {rng}, got {x:g}" if math.isfinite(x) and abs(x) < 1e15
                    else f"must be a number {rng}, got {cut(str(value))}")
    return x


def choice(flag: str, value: Any, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise _fail(flag, f"must be one of {', '.join(choices)}, got {cut(str(value))}")
    return value


def rig_path(flag: str, value: Any) -> str | None:
    """A path on the rig: absolute, one line (it reaches a command line, quoted)."""
    if value is None or value == "":
        return None
    err = values.abs_path(str(value))
    if err:
        raise _fail(flag, err)
    return str(value)


def revision(flag: str, value: Any) -> str | None:
    """A hub revision (branch, tag or 40-hex commit), checked like model.revision."""
    if value is None:
        return None
    err = values.git_ref(str(value))
    if err:
        raise _fail(flag, err)
    return str(value)


def parse(build: Callable[[], Any]) -> Any:
    """Run `build` (which reads and checks the options). A RigError it raises is bad input."""
    try:
        return build()
    except UsageError:
        raise
    except RigError as e:  # e.g. a parser elsewhere raising InventoryError
        raise UsageError(str(e)) from None
