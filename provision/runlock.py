"""One llama-rig run at a time per host, with a lease.

Two runs changing one rig at once (two terminals, two people, a cron job) would interleave apt,
builds into the same build directory, `current` switches and restarts. Every run that changes a
host first takes `<paths.state_dir>/run.lock` ON the host. A small keeper (bash, run as root)
takes flock(1) on it and holds it for as long as the run sends it heartbeats:

* the run writes one line to the keeper's stdin every `HEARTBEAT_S` seconds (a thread);
* the keeper ends when its stdin closes (the run released the lock, ended, died, or its SSH
  session was closed) or when no heartbeat came for `LEASE_S` seconds (the link dropped
  silently: no FIN, sshd would not notice for hours). Before it lets the lock go it stops every
  process group the run started on the box (tagged `LLAMA_RIG_RUN=<run id>`, see
  provision/keeper.py) -- apt/dpkg/cmake never run on while another run has the lock;
* a lease that ran out leaves `run.expired` (who, when); the next run that takes the lock says
  that it took over.

The holder writes who it is next to the lock (`run.owner`, renewed by every heartbeat), so a
second run can say which run it waits for and for how long the lease still runs. `--check` runs
change nothing and take no lock. Within one process the lock is re-entrant (a task that runs
another task on the same host does not lock itself out). The lock fails CLOSED: a lock that
cannot be taken or checked (no flock, no sudo, a state dir that cannot be made) stops the run
with one line.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import os
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from . import remote
from .errors import StepError
from .keeper import stop_groups_sh
from .target import Target, quote

BUSY_EXIT = 75
# no heartbeat for this long: the keeper stops the run's commands and frees the lock. Longer than
# keeper.link_deadline() (at most 20 s): a run gives up on a silent rig before the rig gives up on it.
def _lease_from_env() -> int:
    v = os.environ.get("LLAMA_RIG_LOCK_LEASE", "30")
    return max(5, int(v)) if v.strip().isdigit() else 30


LEASE_S = _lease_from_env()
HEARTBEAT_S = max(1.0, LEASE_S / 6)

_held: dict[tuple[str, str], int] = {}  # (host name, state dir) -> depth, in this process
_held_lock = threading.Lock()


class RunLockBusy(StepError):
    """Another run holds the host's run lock."""


class RunLockError(StepError):
    """The run lock could not be taken or checked (the run stops: the lock fails closed)."""


def owner_line(what: str) -> str:
    """Who is running: user@control-host, pid, start time (UTC), what."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {now}: {what}"


def keeper_script() -> str:
    """The keeper (provision/remote/run_lock.sh) with stop_groups (remote/stop_groups.sh): 2 s
    between TERM and KILL for what the run left behind."""
    return stop_groups_sh(wait=2.0) + remote.source("run_lock.sh")


def lock_command(state_dir: str, owner: str, run_id: str, lease: int | None = None) -> str:
    """The shell line that takes the lock and holds it while heartbeats come (remote/run_lock.sh).

    First line of output: `locked<TAB><the expired lease it took over, or nothing>`, or
    `busy <owner of the holder><TAB><seconds since its last heartbeat>` (exit 75), or an error."""
    d = state_dir.rstrip("/") or "/"
    return (f"exec 2>&1; exec bash -c {quote(keeper_script())} llama-rig-lock {quote(d)} {quote(owner)} "
            f"{quote(run_id)} {int(lease or LEASE_S)}")


class _Heart:
    """Sends the keeper a heartbeat every HEARTBEAT_S seconds until stopped. A keeper that ended
    while the run still holds the lock (its lease ran out) stops the run: every later command of
    the target raises (the lock fails closed)."""

    def __init__(self, held, interval: float, on_lost: Callable[[], None]):
        self.held = held
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(interval,), name="runlock-heartbeat", daemon=True)
        self._t.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self.held.beat() or not self.held.alive():
                if not self._stop.is_set() and not self.held.alive():
                    self.on_lost()
                return

    def stop(self) -> None:
        self._stop.set()


@contextmanager
def run_lock(target: Target, host_name: str, state_dir: str, what: str,
             warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the host's run lock for the body. RunLockBusy if another run has it; RunLockError
    if it cannot be taken or checked (the body does not run)."""
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
    lease = LEASE_S
    held = target.hold(lock_command(state_dir, owner_line(what), target.run_id, lease), sudo=True)
    line = held.first_line
    lock = f"{state_dir.rstrip('/')}/run.lock"
    if line != "locked" and not line.startswith("locked\t"):
        held.release()
        if line.startswith("busy "):
            who, _, age = line[5:].partition("\t")
            since = (f"; its last heartbeat was {age.strip()} s ago, its lease ends {lease} s after "
                     "the last one" if age.strip().isdigit() else "")
            raise RunLockBusy(f"another llama-rig run is changing this host ({who.strip()}{since}); "
                              f"nothing was changed — wait for it to finish ({lock})")
        hint = "the lock needs bash, flock(1) and root (or sudo) on the host"
        if "Permission denied" in line and not target.is_root() and not target.needs_sudo:
            user = getattr(target, "user", "the login user")
            hint = f"{user} is not root and connection.sudo is false: connect as root or give {user} sudo"
        raise RunLockError(f"cannot take the run lock {lock} ({line or 'no answer'}); nothing was "
                           f"changed — {hint}")
    took = line.partition("\t")[2].strip()
    if took and warn is not None:
        warn(f"run lock: took over from a run that went silent: {took}; what it had started on "
             "the host was stopped")
    with _held_lock:
        _held[key] = 1
    heart = _Heart(held, HEARTBEAT_S, lambda: target.stop_all(
        f"{host_name}: the run lock {lock} was lost (its keeper on the host ended: lease of {lease} s "
        "without a heartbeat, or its session closed); stopping this run"))
    try:
        yield
    finally:
        heart.stop()
        with _held_lock:
            _held.pop(key, None)
        held.release()
