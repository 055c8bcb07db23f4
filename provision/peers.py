"""The other hosts of the same run, as one host's steps see them.

A run provisions its hosts side by side (provision/keeper.py `run_hosts`). Some steps depend on
another host of the run: an RPC main (`rpc.workers`) checks its workers' builds and needs their
rpc servers up before llama-server starts. When a worker is provisioned in the same run (a fresh
pair: `provision --host main,worker`), the main's rpc step waits here until the worker's own rpc
step is done -- so one run brings up both, instead of a first run failing on the main while the
worker still builds.

Only hosts that are running are waited for: a host still queued behind `--parallel` may need the
slot the waiting host holds. The engine runs the hosts others depend on first (`order`), so with
`--parallel 1` the workers are done before their main starts.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence

from . import keeper

QUEUED, RUNNING, ENDED = "queued", "running", "ended"


class Peers:
    def __init__(self, names: Iterable[str]):
        self._cv = threading.Condition()
        self._state = {n: QUEUED for n in names}
        self._done: dict[str, set[str]] = {n: set() for n in self._state}

    def started(self, host: str) -> None:
        self._set(host, RUNNING)

    def ended(self, host: str) -> None:
        self._set(host, ENDED)

    def step_done(self, host: str, step: str) -> None:
        """`step` of `host` finished (changed, unchanged, failed or skipped)."""
        with self._cv:
            if host in self._done:
                self._done[host].add(step)
                self._cv.notify_all()

    def _set(self, host: str, state: str) -> None:
        with self._cv:
            if host in self._state:
                self._state[host] = state
                self._cv.notify_all()

    def _pending(self, hosts: Sequence[str], step: str) -> list[str]:
        return [h for h in hosts if self._state.get(h) == RUNNING and step not in self._done[h]]

    def wait_step(self, hosts: Sequence[str], step: str,
                  on_wait: Callable[[list[str]], None] | None = None) -> list[str]:
        """Block until every host of `hosts` that is running in this run has finished `step` (or
        its run ended). Ctrl-C ends the wait (keeper.Interrupted). Returns the hosts waited for."""
        waited: list[str] = []
        with self._cv:
            pending = self._pending(hosts, step)
            if pending and on_wait is not None:
                on_wait(pending)
            while pending:
                waited.extend(h for h in pending if h not in waited)
                self._cv.wait(0.25)
                keeper.check()
                pending = self._pending(hosts, step)
        return waited


def order(hosts: Sequence, depends: Callable[[object], Iterable[str]]) -> list[int]:
    """Indices of `hosts` with the hosts others of the run depend on first (stable otherwise)."""
    names = {h.name for h in hosts}
    needed = {n for h in hosts for n in depends(h) if n in names}
    return sorted(range(len(hosts)), key=lambda i: (hosts[i].name not in needed, i))
