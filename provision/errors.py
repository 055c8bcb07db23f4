"""Exit statuses and the error types that map onto them."""
from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILED = 1  # a step failed on at least one host
    BAD_INPUT = 2  # inventory / command line rejected before any host was contacted
    UNREACHABLE = 3  # a host could not be reached (and nothing else failed)
    INTERRUPTED = 130


class RigError(Exception):
    """Base class: an error with a one-line, user-facing message."""

    status = ExitStatus.FAILED

    def __str__(self) -> str:  # keep messages on one line
        return " ".join(super().__str__().split("\n")).strip()


class InventoryError(RigError):
    status = ExitStatus.BAD_INPUT


class UsageError(RigError):
    status = ExitStatus.BAD_INPUT


class ConnectError(RigError):
    status = ExitStatus.UNREACHABLE


class SudoPasswordError(ConnectError):
    """sudo refused the password of connection.sudo_password_env: the host cannot be worked on
    (reported like an unreachable host: one line, nothing changed)."""


class CommandError(RigError):
    """A command on a target exited non-zero."""

    def __init__(self, host: str, command: str, exited: int, stdout: str, stderr: str):
        self.host = host
        self.command = command
        self.exited = exited
        self.stdout = stdout
        self.stderr = stderr
        tail = [ln.strip() for ln in (stderr.strip() or stdout.strip()).splitlines() if ln.strip()][-1:]
        msg = f"{host}: command failed (exit {exited}): {_short(command)}"
        super().__init__(f"{msg}: {_short(tail[0], 300)}" if tail else msg)


class StepError(RigError):
    """A step decided it cannot go on (message says why)."""


class UnsafeValue(StepError):
    """A value that cannot be written where it was going (a control character in a unit line,
    an option where a name belongs). The inventory refuses these when it loads (exit 2); this is
    the second fence, for values that come from a rig's own state."""


def _short(cmd: str, n: int = 120) -> str:
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= n else cmd[: n - 1] + "…"
