"""The rig runner: one llama-bench invocation at a time on the host, with a power sampler beside it
and Ctrl-C handling.

Each invocation runs inside `setsid -w` as its own process group, with nvidia-smi sampled every
`interval` seconds and llama-bench's stderr time-stamped line by line (its `--progress` lines mark
the phases a power sample belongs to); everything comes back in one sectioned output
(`parse.parse_point_output`). Ctrl-C on the control machine kills that process group on the rig at
once (over SSH, Fabric would otherwise swallow the first Ctrl-C and wait for the remote command)
and then raises KeyboardInterrupt, so the caller's `RigGuard` puts the rig back.
"""
from __future__ import annotations

import contextlib
import secrets as _pysecrets
import signal
import threading
from typing import Sequence

from .. import keeper, remote
from ..errors import StepError
from ..target import join, quote
from .parse import PointRun, parse_point_output

POWER_QUERY = "nvidia-smi --query-gpu=index,power.draw --format=csv,noheader,nounits"


def power_query(ids: Sequence[int] | None = None) -> str:
    """The sampler's nvidia-smi query, optionally for some GPUs only (`-i 0,1`)."""
    return POWER_QUERY + (f" -i {','.join(str(int(i)) for i in ids)}" if ids else "")


def _workdir() -> str:
    return f"/tmp/llama-rig-bench-{_pysecrets.token_hex(6)}"


def point_script(argv: Sequence[str], workdir: str, sample_power: bool, interval: float = 0.2,
                 env: dict[str, str] | None = None, query: str = POWER_QUERY) -> str:
    """The command (run under `setsid -w`) for one llama-bench invocation on the rig:
    `provision/remote/bench_point.sh` (a power sampler, llama-bench's stderr time-stamped, the
    sectioned output). `<workdir>/pid` is the process group to kill if the control machine goes
    away (Ctrl-C)."""
    return join(["sh", "-c", remote.source("bench_point.sh"), "bench_point", workdir,
                 "1" if sample_power else "0", f"{interval:g}", query,
                 *(f"{k}={v}" for k, v in (env or {}).items()), "--", *argv])


class RigBench:
    """Runs llama-bench invocations on a host (through ctx.target) and kills them if interrupted."""

    def __init__(self, ctx, *, sample_power: bool = True, interval: float = 0.2,
                 timeout: float | None = None, power_ids: Sequence[int] | None = None,
                 env: dict[str, str] | None = None):
        self.ctx = ctx
        self.query = power_query(power_ids)
        self.env = env
        self.sample_power = sample_power
        self.interval = interval
        self.timeout = timeout
        self.interrupted = False
        self._live: set[str] = set()

    def run(self, argv: Sequence[str], allow_partial: bool = False) -> PointRun:
        wd = _workdir()
        self._live.add(wd)
        try:
            script = point_script(argv, wd, self.sample_power, self.interval, self.env, self.query)
            res = self.ctx.target.run(f"setsid -w {script}", sudo=True, check=False,
                                      timeout=self.timeout)
            if self.interrupted:
                raise KeyboardInterrupt
            if res.exited == 124:
                raise StepError(f"llama-bench timed out after {self.timeout:g}s")
            pr = parse_point_output(res.stdout)
            if (pr.rc != 0 and not (allow_partial and pr.rows)) or not pr.rows:
                raise StepError(f"llama-bench failed (exit {pr.rc}): "
                                + (pr.stderr_tail.splitlines()[-1:] or [res.stderr.strip()[-200:]])[0])
            self._live.discard(wd)
            return pr
        finally:
            if wd in self._live:
                with keeper.allowed():  # also after Ctrl-C (provision/keeper.py)
                    self.kill(wd)

    def kill(self, wd: str) -> None:
        """Kill the process group of an invocation that is still running (Ctrl-C, timeout)."""
        cmd = (f"d={quote(wd)}; if [ -f \"$d/pid\" ]; then p=$(cat \"$d/pid\"); "
               f"kill -TERM -\"$p\" 2>/dev/null; sleep 0.5; kill -KILL -\"$p\" 2>/dev/null; fi; "
               f"rm -rf \"$d\"")
        try:
            self.ctx.target.run(cmd, sudo=True, check=False, timeout=30)
        except Exception:  # noqa: BLE001 - best effort while unwinding
            pass
        self._live.discard(wd)

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C during a sweep: kill llama-bench on the rig at once (over SSH, Fabric would
        otherwise swallow the first Ctrl-C and wait for the remote command to finish), then raise
        KeyboardInterrupt so the caller's RigGuard puts the rig back."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            first = not self.interrupted
            self.interrupted = True
            if first:
                for wd in list(self._live):
                    threading.Thread(target=self.kill, args=(wd,), daemon=True).start()
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


