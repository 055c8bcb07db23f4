"""What a bench or a tune borrows from the rig, and always gives back.

* llama-server: stopped when the bench needs the GPU memory it holds (`decide_stop`), started
  again through the service step (`restart_and_wait`: /health 200 and one real completion).
* the GPUs' power limits (`tune --power`): the limits found before the first change are put back
  and read back.

    with RigGuard(ctx, "tune") as guard:
        guard.stop_service(why)
        guard.set_power({0: 250.0, 1: 250.0})
        ...

On the way out of the block -- whatever ended it: success, a failed llama-bench, Ctrl-C -- the
power limits are restored first (quick), then the service, with Ctrl-C held back until both are
done (a second Ctrl-C must not leave the rig without its server or at a test limit). Only then
does the exception go on (KeyboardInterrupt: exit 130).
"""
from __future__ import annotations

import contextlib
import signal
import threading

from .. import keeper
from ..errors import RigError, StepError
from ..facts import host as hostfacts
from ..steps import gpu as gpu_step
from ..steps import service as service_step

SERVICE = "llama-server"
TOLERANCE_W = gpu_step.TOLERANCE_W


def decide_stop(policy: str, gpus: int, cuda: bool, n_gpu_layers: int, active: bool,
                rpc: bool = False) -> tuple[bool, str]:
    """policy auto|stop|keep -> (stop?, why). auto stops only when the service holds GPU memory
    the bench needs: it runs, the box has GPUs, the build is CUDA and layers are offloaded -- or
    when it uses RPC workers (`rpc`): a ggml-rpc-server serves one client at a time."""
    if not active:
        return False, f"{SERVICE} is not running"
    if policy == "stop":
        return True, "--service stop"
    if policy == "keep":
        return False, "--service keep"
    if rpc:
        return True, "its RPC workers serve one client at a time: llama-bench needs them"
    if gpus and cuda and n_gpu_layers > 0:
        return True, f"{gpus} GPU(s): the service's VRAM is needed for the bench"
    return False, ("no GPU memory pressure (CPU build or no GPUs): the service keeps running "
                   "during the bench")


SERVICE_POLICIES = ("auto", "stop", "keep")


def parse_service_policy(spec: str | None) -> str:
    """`--service auto|stop|keep` (UsageError otherwise)."""
    from ..errors import UsageError
    v = (spec or "auto").strip().lower()
    if v not in SERVICE_POLICIES:
        raise UsageError(f"command line: --service: expected one of {', '.join(SERVICE_POLICIES)}, got {spec!r}")
    return v


@contextlib.contextmanager
def shielded():
    """Hold Ctrl-C back inside the block (re-raised at its end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    old = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


def set_limits(ctx, limits: dict[int, float], why: str = "") -> None:
    """`nvidia-smi -i <ids> -pl <W>` for each group of GPUs that gets the same limit (as root,
    nvidia-smi's exit codes turned into one clear line by the gpu step's NvidiaSmi)."""
    for ids, w in gpu_step.group_by_value(limits):
        gpu_step.NvidiaSmi(f"power limit {w} W on GPU {ids}{why}",
                           commands=[f"nvidia-smi -i {ids} -pl {w}"]).apply(ctx)


def read_limits(ctx, ids: list[int] | None = None) -> dict[int, float | None]:
    """The power limit of each GPU now (None where the board reports none)."""
    hostfacts.invalidate(ctx, "gpu")
    gf = hostfacts.gpu(ctx)
    if not gf.available:
        raise StepError(f"cannot read the GPUs' power limits: {gf.reason}")
    return {g.index: g.power_limit for g in gf.gpus if ids is None or g.index in ids}


def limits_differ(want: dict[int, float], now: dict[int, float | None]) -> list[str]:
    return [f"GPU {i} is at {gpu_step._w(now[i]) if now.get(i) is not None else '?'} W, "
            f"found at {gpu_step._w(w)} W"
            for i, w in sorted(want.items()) if now.get(i) is None or abs(now[i] - w) > TOLERANCE_W]


class RigGuard:
    """See the module docstring."""

    def __init__(self, ctx, who: str):
        self.ctx = ctx
        self.who = who
        self.stopped = False
        self.found_limits: dict[int, float] | None = None  # before the first set_power
        self.power_changed = False

    # -- borrowing -------------------------------------------------------------------------
    def stop_service(self, why: str) -> None:
        self.ctx.say(f"{self.who}: stopping {SERVICE} for the {self.who} ({why}); it is restarted "
                     "afterwards, whatever happens")
        self.stopped = True  # before the stop: an interrupted stop is restored too
        service_step.stop(self.ctx)

    def set_power(self, limits: dict[int, float]) -> None:
        """Set these GPUs' limits now; the limits found before the first call are restored."""
        if self.found_limits is None:
            found = read_limits(self.ctx, sorted(limits))
            missing = [i for i in limits if found.get(i) is None]
            if missing:
                raise StepError(f"GPU {','.join(map(str, missing))} reports no power limit: "
                                "nothing to sweep (power management not supported)")
            self.found_limits = {i: float(w) for i, w in found.items() if w is not None}
        self.power_changed = True
        set_limits(self.ctx, limits)

    # -- giving back -----------------------------------------------------------------------
    def restore_power(self) -> None:
        if not self.power_changed or self.found_limits is None:
            return
        set_limits(self.ctx, self.found_limits, " (restoring the limits found)")
        bad = limits_differ(self.found_limits, read_limits(self.ctx, sorted(self.found_limits)))
        if bad:
            raise StepError("power limits not restored: " + "; ".join(bad)
                            + f" — `invoke gpu.power --host {self.ctx.host.name}` sets the inventory's")
        self.power_changed = False
        self.ctx.say(f"{self.who}: power limits restored: " + ", ".join(
            f"GPU {ids} {w} W" for ids, w in gpu_step.group_by_value(self.found_limits)))

    def restore_service(self) -> None:
        if not self.stopped:
            return
        self.ctx.say(f"{self.who}: restarting {SERVICE} and waiting until it serves again")
        service_step.restart_and_wait(self.ctx)
        self.stopped = False
        self.ctx.say(f"{self.who}: {SERVICE} is back")

    def restore(self) -> list[str]:
        """Power limits first, then the service; each tried even if the other failed."""
        problems = []
        for fn in (self.restore_power, self.restore_service):
            try:
                fn()
            except RigError as e:
                problems.append(str(e))
        return problems

    def __enter__(self) -> "RigGuard":
        # Ctrl-C: the run waits for this block to put the rig back before it exits
        self._owing = keeper.owing()
        self._owing.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._exit(exc_type)
        finally:
            self._owing.__exit__(None, None, None)

    def _exit(self, exc_type) -> bool:
        problems: list[str] = []
        interrupted = False
        try:
            # after Ctrl-C the run's commands stop, but not these (keeper.cleanup), and the
            # interrupted run waits for them before it exits
            with shielded(), keeper.cleanup():
                problems = self.restore()
        except KeyboardInterrupt:  # Ctrl-C while restoring: held back until now
            interrupted = True
        if problems:
            msg = f"{self.who}: could not put the rig back: " + "; ".join(problems)
            if exc_type is None and not interrupted:
                raise StepError(msg)
            self.ctx.console.error(f"[{self.ctx.host.name}] {msg}")
        if interrupted and exc_type is None:
            raise KeyboardInterrupt
        return False
