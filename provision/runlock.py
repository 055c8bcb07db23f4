"""One llama-rig run at a time per host.

Two runs changing one rig at once (two terminals, two people, a cron job) would interleave apt,
builds into the same build directory, `current` switches and restarts. Every run that changes a
host first takes `<paths.state_dir>/run.lock` with flock(1) ON the host, held by a command whose
stdin is this run's SSH session (Target.hold): when the run ends -- or dies, or loses its
connection -- the command sees EOF and the lock goes with it; there is nothing stale to clean up.

The holder writes who it is next to the lock (`run.owner`), so a second run can say which run
it waits for. `--check` runs change nothing and take no lock. Within one process the lock is
re-entrant (a task that runs another task on the same host does not lock itself out).
"""
from __future__ import annotations

import datetime as _dt
import getpass
import os
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import StepError
from .target import Target, quote

BUSY_EXIT = 75

_held: dict[tuple[str, str], int] = {}  # (host name, state dir) -> depth, in this process
_held_lock = threading.Lock()


class RunLockBusy(StepError):
    """Another run holds the host's run lock."""


def owner_line(what: str) -> str:
    """Who is running: user@control-host, pid, start time (UTC), what."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {now}: {what}"


def lock_command(state_dir: str, owner: str) -> str:
    """The shell line that takes the lock and holds it until its stdin closes.

    First line of output: `locked`, or `busy <owner of the holder>` (exit 75), or an error."""
    d = state_dir.rstrip("/") or "/"
    lock, who = f"{d}/run.lock", f"{d}/run.owner"
    inner = 'printf "%s\\n" "$1" > "$2"; echo locked; cat >/dev/null; rm -f "$2"'
    return (f"exec 2>&1; mkdir -p {quote(d)} && flock -n -E {BUSY_EXIT} {quote(lock)} sh -c {quote(inner)} _ "
            f"{quote(owner)} {quote(who)}; rc=$?; if [ $rc -eq {BUSY_EXIT} ]; then "
            f"printf 'busy %s\\n' \"$(cat {quote(who)} 2>/dev/null || echo 'an unknown run')\"; fi; exit $rc")


@contextmanager
def run_lock(target: Target, host_name: str, state_dir: str, what: str,
             warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the host's run lock for the body. RunLockBusy if another run has it; where the lock
    cannot be taken at all (no flock(1), no sudo) the body runs anyway after a warning."""
    key = (host_name, state_dir)
    with _held_lock:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    held = target.hold(lock_command(state_dir, owner_line(what)), sudo=True)
    line = held.first_line
    if line != "locked":
        held.release()
        if line.startswith("busy "):
            raise RunLockBusy(f"another llama-rig run is changing this host ({line[5:]}); nothing "
                              f"was changed — wait for it to finish ({state_dir}/run.lock)")
        if warn is not None:
            warn(f"run lock: could not take {state_dir}/run.lock ({line or 'no answer'}); "
                 "going on without it")
        yield
        return
    with _held_lock:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_lock:
            _held.pop(key, None)
        held.release()
