"""Ctrl-C and dropped links: what keeps a run stoppable and its SSH sessions honest.

* Hosts run in worker threads (`run_hosts`); the main thread only waits. Ctrl-C lands there: it
  marks the run interrupted (`RunToken`), and every worker's command in flight notices within a
  tenth of a second, stops its process group on the rig and raises `Interrupted` (a
  KeyboardInterrupt: `except Exception` never swallows it). The main thread waits at most
  `GRACE_S` for the workers to wind down (a thread stuck in an SSH handshake is left behind), so
  the run ends within 2 s with exit 130 and a recap of what finished. Only a block marked
  `cleanup()` (bench/tune putting the service and the power limits back) still runs commands
  after Ctrl-C, and the main thread waits for it (bounded by `CLEANUP_MAX_S`).
* Every command on a rig runs as its own process group (`guard_line`): sshd starts each session
  command as a session leader, and the guard line reports that id first thing on stderr
  (`PGID_MARK`) and tags the command's environment with the run's id (`RUN_ENV`). Ctrl-C or a
  timeout kills that group (`kill_line`: TERM, then KILL); the run lock's keeper on the rig
  (provision/runlock.py) kills every group tagged with its run when the run ends, dies or its
  lease runs out -- apt, dpkg or cmake never keep running after the lock is gone.
* `LinkWatch` pings the SSH connection itself (a global request the server must answer) every few
  seconds; a link that stays silent past its deadline -- a cable pulled, a blackholed route, no
  FIN ever comes -- closes the connection: the command in flight and every later one raise
  ConnectError with one line naming the host.
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Callable, Iterator, Sequence, TypeVar

from shlex import quote

GRACE_S = 1.0  # after Ctrl-C: how long the workers get to stop their commands and say so
CLEANUP_MAX_S = 120.0  # ... and how long a cleanup() block (the service coming back) may take
KILL_WAIT_S = 1.0  # TERM, then this long, then KILL
RUN_ENV = "LLAMA_RIG_RUN"
PGID_MARK = "@@llama-rig-pgid"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised in a worker thread by the command it interrupted (or the next one)."""


class RunToken:
    """One run's Ctrl-C flag, shared by its worker threads."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cleaning = 0  # workers inside a cleanup() block
        self._mu = threading.Lock()

    @property
    def interrupted(self) -> bool:
        return self.event.is_set()

    def interrupt(self) -> None:
        self.event.set()


_local = threading.local()
_NEVER = RunToken()  # threads outside run_hosts (tests, status --watch): never interrupted here


def current() -> RunToken:
    return getattr(_local, "token", _NEVER)


def in_cleanup() -> bool:
    return getattr(_local, "allow", 0) > 0


def must_stop() -> bool:
    """True when this thread's run was interrupted and this is not a cleanup() block."""
    return current().interrupted and not in_cleanup()


def check() -> None:
    """Raise Interrupted if this thread's run was interrupted (outside a cleanup() block)."""
    if must_stop():
        raise Interrupted()


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """Commands in this block run even after Ctrl-C (stopping a process group, the lock)."""
    _local.allow = getattr(_local, "allow", 0) + 1
    try:
        yield
    finally:
        _local.allow -= 1


@contextlib.contextmanager
def cleanup() -> Iterator[None]:
    """Commands in this block still run after Ctrl-C (putting the rig back), and the interrupted
    run waits for the block to end before it exits (at most CLEANUP_MAX_S)."""
    tok = current()
    with tok._mu:
        tok.cleaning += 1
    try:
        with allowed():
            yield
    finally:
        with tok._mu:
            tok.cleaning -= 1


@contextlib.contextmanager
def owing() -> Iterator[None]:
    """The rig owes a restore while this block runs (bench/tune borrowed the service or the power
    limits): an interrupted run waits for the block to end -- it puts them back -- before it exits
    (at most CLEANUP_MAX_S)."""
    tok = current()
    with tok._mu:
        tok.cleaning += 1
    try:
        yield
    finally:
        with tok._mu:
            tok.cleaning -= 1


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------------------
# remote process groups


def guard_line(line: str, run_id: str) -> str:
    """`line` as its own process group on the box, tagged with the run: the first stderr line is
    PGID_MARK + the group id (parse_pgid strips it). sshd makes every session command a session
    leader: after `exec`, `$$` is the group (and session) id. The line itself runs in the login
    shell, as sshd would have run it (`$SHELL -c`)."""
    inner = f'printf "{PGID_MARK} %s\\n" "$$" >&2; exec "${{SHELL:-sh}}" -c "$1"'
    return f"exec env {RUN_ENV}={run_id} sh -c {quote(inner)} llama-rig {quote(line)}"


def parse_pgid(stderr: str) -> tuple[int | None, str]:
    """(the group id, stderr without the marker line)."""
    mark = PGID_MARK
    if stderr.startswith(mark):
        first, _, rest = stderr.partition("\n")
        try:
            return int(first[len(mark):].strip()), rest
        except ValueError:
            return None, rest
    return None, stderr


def stop_groups_sh(wait: float = KILL_WAIT_S) -> str:
    """Shell text: defines `stop_groups PGIDS RUN` (provision/remote/stop_groups.sh): TERM the
    process groups PGIDS and every group that holds a process tagged RUN_ENV=RUN, never the
    caller's own group; wait up to `wait` seconds, then KILL what is left. Needs root to see
    other users' environments (the run lock's keeper and the kill line run under sudo)."""
    from . import remote
    return f"stop_ticks={max(1, int(wait / 0.1))}\n" + remote.source("stop_groups.sh")


def kill_line(pgid: int | None, run_id: str | None = None, wait: float = KILL_WAIT_S) -> str:
    """Stop the command's process group `pgid` and, with `run_id` (Ctrl-C), every group of the
    run: TERM, up to `wait` seconds, KILL."""
    return (stop_groups_sh(wait) + f"stop_groups {quote(str(int(pgid)) if pgid else '')} "
            f"{quote(run_id or '')}")


# ---------------------------------------------------------------------------------------------
# the SSH link


class LinkWatch:
    """Pings an SSH transport (a global request the server answers, even if only to refuse it)
    every `interval` seconds; no answer within `deadline` seconds: `lost` is set to one line and
    `on_lost()` runs (it closes the connection). Also turns on paramiko's keepalive packets."""

    def __init__(self, transport, what: str, deadline: float, on_lost: Callable[[], None]):
        self.transport = transport
        self.what = what
        self.deadline = deadline
        self.interval = max(1.0, min(5.0, deadline / 3))
        self.on_lost = on_lost
        self.lost = ""
        self._stop = threading.Event()
        try:
            transport.set_keepalive(max(1, int(self.interval)))
        except Exception:  # noqa: BLE001 - a test double
            pass
        self._thread = threading.Thread(target=self._loop, name=f"linkwatch-{what}", daemon=True)
        self._thread.start()

    def _ping(self, done: threading.Event) -> None:
        try:
            self.transport.global_request("keepalive@openssh.com", wait=True)
        except Exception:  # noqa: BLE001 - the transport went away: the loop sees it
            pass
        done.set()

    def _loop(self) -> None:
        sent = time.monotonic()
        done = threading.Event()
        done.set()
        while not self._stop.wait(0.25):
            if not self.transport.is_active():
                return
            now = time.monotonic()
            if not done.is_set():
                if now - sent > self.deadline:
                    self.lost = (f"{self.what}: no answer on its SSH connection for "
                                 f"{now - sent:.0f}s (network down or host gone); the run on it "
                                 "was stopped")
                    try:
                        self.on_lost()
                    except Exception:  # noqa: BLE001 - closing a dead session may fail any way
                        pass
                    return
            elif now - sent >= self.interval:
                sent, done = now, threading.Event()
                threading.Thread(target=self._ping, args=(done,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def link_deadline(connect_timeout: float) -> float:
    """How long a link may stay silent: 1.5 x connection.connect_timeout, 6 to 20 s -- always
    well inside the run lock's lease (provision/runlock.py, 30 s): a run gives up on a silent rig
    before the rig gives up on the run."""
    return max(6.0, min(20.0, 1.5 * float(connect_timeout)))


# ---------------------------------------------------------------------------------------------
# running hosts


T = TypeVar("T")
R = TypeVar("R")


def run_hosts(items: Sequence[T], work: Callable[[T], R], parallel: int,
              on_interrupt: Callable[[], None] | None = None,
              on_wait: Callable[[str], None] | None = None) -> tuple[list[R | None], bool]:
    """work(item) for each item, at most `parallel` at once, in daemon worker threads. Returns
    (results in order -- None where a worker had not finished --, interrupted)."""
    token = RunToken()
    results: list[R | None] = [None] * len(items)
    sem = threading.Semaphore(max(1, parallel))

    running = [True] * len(items)  # not Thread.is_alive(): a join() that Ctrl-C interrupts
    # can leave a live thread looking finished (CPython < 3.13)
    all_done = threading.Event()  # the main thread wakes when the last worker ends, not on a tick

    def worker(i: int, item: T) -> None:
        _local.token = token
        try:
            with sem:
                if token.interrupted:
                    return
                try:
                    results[i] = work(item)
                except Interrupted:
                    pass
        finally:
            running[i] = False
            if not any(running):
                all_done.set()

    threads = [threading.Thread(target=worker, args=(i, it), name=f"host-{i}", daemon=True)
               for i, it in enumerate(items)]
    for t in threads:
        t.start()
    try:
        while any(running):
            all_done.wait(0.1)  # a Ctrl-C interrupts the wait (KeyboardInterrupt)
        return results, False
    except KeyboardInterrupt:
        pass
    token.interrupt()
    if on_interrupt is not None:
        on_interrupt()
    t0 = time.monotonic()
    said = False
    while any(running):
        try:
            now = time.monotonic()
            if now - t0 > GRACE_S and (token.cleaning <= 0 or now - t0 > CLEANUP_MAX_S):
                break
            if token.cleaning > 0 and now - t0 > GRACE_S and not said and on_wait is not None:
                said = True
                on_wait("Ctrl-C: putting the rig back first (power limits, llama-server); a second Ctrl-C does not skip this")
            time.sleep(0.02)
        except KeyboardInterrupt:
            continue
    return results, True
