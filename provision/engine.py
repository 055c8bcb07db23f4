"""Plan/apply engine: a step reads facts, plans a list of changes, and applies them.

"No change" is a first-class result; --check prints the plan and changes nothing; --diff shows
file diffs; a recap per host. Handlers (e.g. restarting llama-server) that a change notifies are
persisted on the host as "owed" before the change is applied, so a run that fails later still
restarts next time (the Ansible handler trap, ansible#4766).
"""
from __future__ import annotations

import abc
import difflib
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import keeper, readahead
from .console import Console
from .errors import ConnectError, ExitStatus, RigError, StepError
from .inventory import Host
from .runlock import run_lock
from .target import Target, connect

# ---------------------------------------------------------------------------------------------
# changes


@dataclass
class Change(abc.ABC):
    """One planned change. Subclasses say how to apply it; tests compare them as data."""

    description: str
    notify: tuple[str, ...] = field(default=(), kw_only=True)

    @abc.abstractmethod
    def apply(self, ctx: "Context") -> None:
        """Make the change on the box."""

    def diff(self) -> str | None:
        return None


@dataclass
class Run(Change):
    """Shell commands, run in order (as root unless sudo=False)."""

    commands: list[str] = field(default_factory=list)
    sudo: bool = True
    env: dict[str, str] | None = None
    timeout: float | None = None

    def apply(self, ctx: "Context") -> None:
        for c in self.commands:
            ctx.target.run(c, sudo=self.sudo, env=self.env, timeout=self.timeout)


@dataclass
class WriteFile(Change):
    """Install a file atomically; `before` is what is there now (None = absent)."""

    path: str = ""
    content: str = ""
    before: str | None = None
    mode: int = 0o644
    owner: str = "root"
    group: str | None = None
    secret: bool = False  # content never shown in diffs

    def apply(self, ctx: "Context") -> None:
        ctx.target.write_file(self.path, self.content, mode=self.mode, owner=self.owner,
                              group=self.group)

    def diff(self) -> str | None:
        if self.secret:
            return f"--- {self.path}\n+++ {self.path}\n(secret content not shown)\n"
        return file_diff(self.path, self.before, self.content)


@dataclass
class Call(Change):
    """Anything richer (a build with progress, a download): a function of the context.
    `data` carries what tests compare."""

    fn: Callable[["Context"], None] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def apply(self, ctx: "Context") -> None:
        assert self.fn is not None
        self.fn(ctx)


@dataclass
class RebootHost(Change):
    """The host must reboot before the run can go on (a new driver to load). Applying it only
    asks: the engine reboots with `provision --reboot` (and waits for SSH, re-reads the facts and
    runs the step again), otherwise it reports the reboot and stops that host. `after` is the
    error if the same step still wants a reboot after one."""

    after: str = ""

    def apply(self, ctx: "Context") -> None:
        ctx.reboot_pending = self


def file_diff(path: str, before: str | None, after: str) -> str:
    a = [] if before is None else before.splitlines(keepends=True)
    b = after.splitlines(keepends=True)
    lines = list(difflib.unified_diff(a, b, fromfile="/dev/null" if before is None else path,
                                      tofile=path))
    return "".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines)


# ---------------------------------------------------------------------------------------------
# host state (persisted on the host)


def state_path(ctx: "Context") -> str:
    return f"{ctx.host.cfg['paths']['state_dir']}/state.json"


readahead.wants(lambda ctx: readahead.Want(read=[state_path(ctx)]))


class HostState:
    """JSON at <state_dir>/state.json on the host: owed handlers and what steps record."""

    def __init__(self, ctx: "Context"):
        self.ctx = ctx
        self.path = state_path(ctx)
        raw = readahead.read_file(ctx, self.path)
        try:
            self.data: dict[str, Any] = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            ctx.console.warn(f"{ctx.host.name}: {self.path} is not valid JSON; starting afresh")
            self.data = {}
        self.data.setdefault("owed", [])
        self._saved = json.dumps(self.data, sort_keys=True)

    @property
    def owed(self) -> list[str]:
        return list(self.data["owed"])

    def owe(self, handlers: Sequence[str]) -> None:
        for h in handlers:
            if h not in self.data["owed"]:
                self.data["owed"].append(h)
        self.save()

    def paid(self, handler: str) -> None:
        if handler in self.data["owed"]:
            self.data["owed"].remove(handler)
            self.save()

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        if self.ctx.check:
            return
        text = json.dumps(self.data, sort_keys=True, indent=2) + "\n"
        if text.strip() == json.dumps(json.loads(self._saved), sort_keys=True, indent=2).strip():
            return
        self.ctx.target.write_file(self.path, text, mode=0o600)
        self._saved = json.dumps(self.data, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# steps and the context they get


@dataclass
class Context:
    host: Host
    target: Target
    console: Console
    check: bool = False
    show_diff: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    _state: HostState | None = None
    notified: list[str] = field(default_factory=list)  # handlers notified by changes this run
    reboot_pending: "RebootHost | None" = None  # a step asked for a reboot (see RebootHost)
    rebooted: int = 0  # reboots done in this run (at most one)
    peers: Any = None  # provision.peers.Peers: the other hosts of this run (None: alone)

    @property
    def cfg(self) -> dict[str, Any]:
        return self.host.cfg

    @property
    def state(self) -> HostState:
        if self._state is None:
            self._state = HostState(self)
        return self._state

    def fact(self, key: str, gather: Callable[[], Any]) -> Any:
        """Gather a fact once per run."""
        if key not in self.facts:
            self.facts[key] = gather()
        return self.facts[key]

    def say(self, text: str) -> None:
        self.console.host_line(self.host.name, text)

    def warn(self, text: str) -> None:
        self.console.warn(f"[{self.host.name}] {text}")


class Step(abc.ABC):
    """A provisioning step: plan(ctx) -> changes (empty = no change); handlers by name."""

    name: str = ""
    title: str = ""

    @abc.abstractmethod
    def plan(self, ctx: Context) -> list[Change]:
        """Read the box (only read) and return the changes needed; [] = no change."""

    def verify(self, ctx: Context) -> None:
        """Optional: after applying, re-read the box and raise StepError if it is not right."""

    def handlers(self) -> dict[str, Callable[[Context], None]]:
        return {}


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class StepResult:
    step: str
    status: str  # ok | changed | failed | skipped
    changes: list[str] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    commands: int = 0  # remote commands the step ran


@dataclass
class HostReport:
    host: str
    results: list[StepResult] = field(default_factory=list)
    unreachable: str = ""
    seconds: float = 0.0
    commands: int = 0
    reboot_pending: str = ""  # the run stopped here: the host needs a reboot (no --reboot)
    current: str = ""  # the step (or task) running now
    done: bool = False  # the host's run ended (not still going when Ctrl-C came)
    interrupted: bool = False  # Ctrl-C stopped it

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> bool:
        return bool(self.unreachable) or self.count("failed") > 0 or bool(self.reboot_pending)

    @property
    def changed(self) -> int:
        return self.count("changed")


@dataclass
class RunOptions:
    check: bool = False
    diff: bool = False
    only: list[str] | None = None
    skip: list[str] | None = None
    parallel: int = 4
    # called with the host's context before the first step / after the steps and handlers all
    # succeeded (the lockfile uses them); a RigError from one is a failed result named `.name`
    before_host: Callable[[Context], None] | None = None
    after_host: Callable[[Context], None] | None = None
    what: str = "provision"  # what this run is, for the host's run lock (provision.runlock)
    reboot: bool = False  # reboot a host that needs it (RebootHost), wait for SSH, go on
    peers: Any = None  # provision.peers.Peers of this run (set by run())


def select_steps(steps: Sequence[Step], only: list[str] | None, skip: list[str] | None) -> None:
    names = [s.name for s in steps]
    from .errors import UsageError
    for opt, vals in (("--only", only), ("--skip", skip)):
        for v in vals or []:
            if v not in names:
                import difflib as _d
                m = _d.get_close_matches(v, names, n=1)
                hint = f" (did you mean {m[0]!r}?)" if m else ""
                raise UsageError(f"command line: {opt}: unknown step {v!r}{hint}; steps are: {', '.join(names)}")


def active_steps(steps: Sequence[Step], only: list[str] | None, skip: list[str] | None) -> list[Step]:
    """The steps a run with --only/--skip runs, in order."""
    return [s for s in steps if (not only or s.name in only) and not (skip and s.name in skip)]


def run_host(host: Host, steps: Sequence[Step], console: Console, opts: RunOptions,
             target_factory: Callable[[Host], Target] = connect,
             report: HostReport | None = None) -> HostReport:
    report = report if report is not None else HostReport(host.name)
    t_start = time.monotonic()
    report.current = "connect"
    try:
        target = target_factory(host)
    except ConnectError as e:
        report.unreachable = str(e)
        report.seconds = time.monotonic() - t_start
        report.done = True
        console.error(f"[{host.name}] UNREACHABLE: {e}")
        return report
    ctx = Context(host, target, console, check=opts.check, show_diff=opts.diff, peers=opts.peers)
    handlers: dict[str, Callable[[Context], None]] = {}
    active = active_steps(steps, opts.only, opts.skip)
    failed = False
    waiting = ""  # a reboot the run waits for (no --reboot, or --check)
    held = ExitStack()
    commands_before = 0  # remote commands of sessions that ended in a reboot

    def lock() -> bool:
        if opts.check:  # one changing run at a time per host; --check changes nothing
            return True
        report.current = "run lock"
        try:
            held.enter_context(run_lock(ctx.target, host.name, host.cfg["paths"]["state_dir"],
                                        opts.what, ctx.warn))
            return True
        except ConnectError:
            raise
        except StepError as e:  # busy, or it cannot be taken: the lock fails closed
            console.error(f"[{host.name}] run lock: FAILED: {e}")
            report.results.append(StepResult("run lock", "failed", message=str(e)))
            return False

    try:
        failed = not lock()
        if opts.before_host is not None and not failed:
            failed = not _run_hook(ctx, opts.before_host, report)
        before = None  # the step of the last pass: every pass ends with that step's result
        for step in steps:
            if opts.peers is not None and before is not None:
                opts.peers.step_done(host.name, before.name)
            before = step
            if step not in active:
                report.results.append(StepResult(step.name, "skipped", message="not selected"))
                continue
            # only the handlers of steps that run: `--only facts` must not restart anything
            handlers.update(step.handlers())
            if failed or waiting:
                why = "an earlier step failed" if failed else f"after the reboot ({waiting})"
                report.results.append(StepResult(step.name, "skipped", message=why))
                continue
            report.current = step.name
            res = _run_step(ctx, step)
            report.results.append(res)
            if res.status == "failed":
                failed = True
            elif ctx.reboot_pending is not None:
                rb, ctx.reboot_pending = ctx.reboot_pending, None
                if opts.check:
                    waiting = rb.description
                    continue
                if not opts.reboot:
                    waiting = report.reboot_pending = rb.description
                    console.error(f"[{host.name}] {step.name}: needs a reboot to go on: {rb.description} "
                                  f"— not rebooting; run again with --reboot (or reboot {host.name} "
                                  "yourself and run again)")
                    continue
                if ctx.rebooted or host.is_local:
                    if ctx.rebooted:
                        msg = rb.after or f"still needs a reboot after rebooting: {rb.description}"
                    else:
                        msg = (f"{rb.description}: llama-rig does not reboot the machine it runs on "
                               "(connection: local) — reboot it yourself and run again")
                    console.error(f"[{host.name}] {step.name}: FAILED: {msg}")
                    res.status, res.message = "failed", msg
                    failed = True
                    continue
                # --reboot: the old session and its run lock go with the old system
                try:
                    held.close()
                except RigError:
                    pass
                old = ctx.target
                ctx.target, probes = reboot_host(ctx, rb, target_factory,
                                                 float(host.cfg["system"]["reboot_timeout"]))
                commands_before += old.commands_run + probes
                ctx.rebooted += 1
                ctx.facts.clear()
                ctx._state = None
                held = ExitStack()
                if not lock():
                    failed = True
                    continue
                again = _run_step(ctx, step)  # re-read the box: the step must be done now
                again.step = f"{step.name} (after reboot)"
                report.results.append(again)
                if again.status == "failed":
                    failed = True
                elif ctx.reboot_pending is not None:
                    msg = ctx.reboot_pending.after or "still needs a reboot after rebooting"
                    ctx.reboot_pending = None
                    console.error(f"[{host.name}] {step.name}: FAILED: {msg}")
                    again.status, again.message = "failed", msg
                    failed = True
        if not failed and not waiting:
            report.current = "handlers"
            report.results.extend(_run_handlers(ctx, handlers, active))
            if opts.after_host is not None and not report.count("failed"):
                report.current = getattr(opts.after_host, "name", "hook")
                _run_hook(ctx, opts.after_host, report)
        elif not failed and opts.check:
            _run_handlers(ctx, handlers, active)  # the plan shows what would run
        report.current = ""
    except ConnectError as e:
        report.unreachable = str(e)
        console.error(f"[{host.name}] UNREACHABLE: {e}")
    except keeper.Interrupted:
        report.interrupted = True  # Ctrl-C: the command in flight was stopped on the host
    finally:
        try:
            with keeper.allowed():
                held.close()  # the keeper on the host stops what is left of this run
        except RigError:
            pass  # the session is gone: so is the lock
        lost = ctx.target.lost()
        if lost and not report.unreachable:
            report.unreachable = lost
            console.error(f"[{host.name}] UNREACHABLE: {lost}")
        report.commands = commands_before + ctx.target.commands_run
        ctx.target.close()
    report.seconds = time.monotonic() - t_start
    report.done = not report.interrupted
    return report


REBOOT_MARK = "/run/llama-rig.reboot"  # /run is a tmpfs: gone once the host has rebooted
REBOOT_POLL_S = 2.0


def reboot_host(ctx: Context, rb: RebootHost, target_factory: Callable[[Host], Target],
                timeout: float) -> tuple[Target, int]:
    """Reboot the host (provision --reboot), wait (bounded) until SSH answers from the NEW system
    and systemd has finished booting; return the new session (and the remote commands of the
    sessions that found the old system still up). ConnectError if it does not come back in time."""
    host = ctx.host
    t = ctx.target
    t.run(f"echo llama-rig > {REBOOT_MARK}", sudo=True)
    ctx.say(f"rebooting (--reboot): {rb.description}; waiting up to {timeout:.0f}s for SSH")
    t0 = time.monotonic()
    try:
        t.run("systemctl reboot || reboot", sudo=True, check=False, timeout=30)
    except ConnectError:
        pass  # the session may die under the command
    t.close()
    deadline = t0 + timeout
    probes = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(f"{host.name}: did not come back within {timeout:.0f}s after the "
                               "reboot (system.reboot_timeout)")
        time.sleep(min(REBOOT_POLL_S, max(left, 0)))
        try:
            nt = target_factory(host)
        except ConnectError:
            continue
        try:
            if nt.run(f"test -e {REBOOT_MARK}", check=False).ok:
                probes += nt.commands_run
                nt.close()  # still the old system on its way down
                continue
            nt.run("systemctl is-system-running --wait >/dev/null 2>&1", check=False,
                   timeout=max(5.0, deadline - time.monotonic()))
        except ConnectError:
            probes += nt.commands_run
            nt.close()
            continue
        ctx.say(f"back after {time.monotonic() - t0:.1f}s; reading the facts again")
        return nt, probes


def _call_guarded(ctx: Context, label: str, fn: Callable[[Context], None]) -> StepResult | None:
    """fn(ctx); a RigError becomes a failed result named `label` (a lost connection propagates)."""
    t0 = time.monotonic()
    try:
        fn(ctx)
    except ConnectError:
        raise
    except RigError as e:
        ctx.console.error(f"[{ctx.host.name}] {label}: FAILED: {e}")
        return StepResult(label, "failed", message=str(e), seconds=time.monotonic() - t0)
    return None


def _run_hook(ctx: Context, fn: Callable[[Context], None], report: HostReport) -> bool:
    failed = _call_guarded(ctx, getattr(fn, "name", "hook"), fn)
    if failed:
        report.results.append(failed)
    return failed is None


def _run_step(ctx: Context, step: Step) -> StepResult:
    c0 = ctx.target.commands_run
    res = _run_step_inner(ctx, step)
    res.commands = ctx.target.commands_run - c0
    return res


def _run_step_inner(ctx: Context, step: Step) -> StepResult:
    t0 = time.monotonic()
    name = ctx.host.name
    try:
        changes = step.plan(ctx)
        if not changes:
            res = StepResult(step.name, "ok", seconds=time.monotonic() - t0)
            ctx.console.host_line(name, f"{step.name}: ok (no change)")
            return res
        for ch in changes:
            prefix = "would " if ctx.check else ""
            ctx.console.host_line(name, f"{step.name}: {prefix}change: {ch.description}")
            if ctx.show_diff:
                d = ch.diff()
                if d:
                    ctx.console.diff(d)
            for h in ch.notify:
                if h not in ctx.notified:
                    ctx.notified.append(h)
            if ctx.check:
                if isinstance(ch, RebootHost):
                    ctx.reboot_pending = ch
                continue
            if ch.notify:
                ctx.state.owe(ch.notify)
            readahead.forget(ctx)  # what was read ahead may change now
            ch.apply(ctx)
            if ctx.reboot_pending is not None:
                break  # nothing after a reboot request runs before the reboot
        if not ctx.check and ctx.reboot_pending is None:
            step.verify(ctx)
        res = StepResult(step.name, "changed", [c.description for c in changes],
                         seconds=time.monotonic() - t0)
        ctx.console.host_line(name, f"{step.name}: {'would change' if ctx.check else 'changed'}"
                                    f" ({len(changes)} change{'s' if len(changes) != 1 else ''})")
        return res
    except ConnectError:
        raise
    except RigError as e:
        ctx.console.error(f"[{name}] {step.name}: FAILED: {e}")
        return StepResult(step.name, "failed", message=str(e), seconds=time.monotonic() - t0)


def _run_handlers(ctx: Context, handlers: dict[str, Callable[[Context], None]],
                  active: Sequence[Step]) -> list[StepResult]:
    """Run the owed handlers (persisted, so a restart owed by an earlier failed run is not
    lost). A handler that fails stays owed and counts as a failed result."""
    owed = ctx.state.owed
    if ctx.check:
        for h in owed + [h for h in ctx.notified if h not in owed]:
            why = "owed" if h in owed else "notified"
            ctx.console.host_line(ctx.host.name, f"handler: would run {h} ({why})")
        return []
    results: list[StepResult] = []
    for h in owed:
        fn = handlers.get(h)
        if fn is None:
            ctx.console.host_line(ctx.host.name, f"handler: {h} stays owed (its step did not run)")
            continue
        ctx.console.host_line(ctx.host.name, f"handler: running {h}")
        readahead.forget(ctx)
        t0 = time.monotonic()
        failed = _call_guarded(ctx, f"handler {h}", fn)
        if failed:
            results.append(failed)
            continue
        ctx.state.paid(h)
        results.append(StepResult(f"handler {h}", "changed", [f"ran {h}"],
                                  seconds=time.monotonic() - t0))
    return results


def run(hosts: Sequence[Host], steps: Sequence[Step], console: Console, opts: RunOptions,
        target_factory: Callable[[Host], Target] = connect) -> tuple[ExitStatus, list[HostReport]]:
    """Each host in a worker thread (keeper.run_hosts); Ctrl-C ends the run within 2 s with a
    recap of what each host finished and what was interrupted (exit 130)."""
    select_steps(steps, opts.only, opts.skip)
    reports = [HostReport(h.name) for h in hosts]
    t0 = time.monotonic()
    from . import peers
    if len(hosts) > 1 and opts.peers is None:
        opts.peers = peers.Peers(h.name for h in hosts)

    def work(i: int) -> HostReport:
        if opts.peers is not None:
            opts.peers.started(hosts[i].name)
        try:
            return _run_host_safe(hosts[i], steps, console, opts, target_factory, reports[i])
        finally:
            if opts.peers is not None:
                opts.peers.ended(hosts[i].name)
    # the hosts others depend on (RPC workers of a main in this run) start first
    _, interrupted = keeper.run_hosts(peers.order(hosts, lambda h: [w.name for w in getattr(h, "rpc_workers", ())]),
                                      work, opts.parallel, on_wait=console.line)
    if interrupted:
        finish_interrupted(console, reports, time.monotonic() - t0,
                           [s.name for s in active_steps(steps, opts.only, opts.skip)])
        print_recap(console, reports, opts.check)
        return ExitStatus.INTERRUPTED, reports
    print_recap(console, reports, opts.check)
    return exit_status(reports), reports


def _run_host_safe(host: Host, steps: Sequence[Step], console: Console, opts: RunOptions,
                   target_factory: Callable[[Host], Target], report: HostReport) -> HostReport:
    """run_host for one of several hosts: an unexpected exception (a bug) fails THAT host and
    never hides the other hosts' results."""
    t0 = time.monotonic()
    try:
        return run_host(host, steps, console, opts, target_factory, report)
    except Exception as e:  # noqa: BLE001
        console.error(f"[{host.name}] FAILED: internal error: {type(e).__name__}: {e}")
        report.results.append(StepResult("internal", "failed", message=f"{type(e).__name__}: {e}"))
        report.seconds = time.monotonic() - t0
        report.done = True
        return report


def finish_interrupted(console: Console, reports: Sequence[HostReport], seconds: float,
                       planned: Sequence[str] | None = None) -> None:
    """After Ctrl-C: every host still running is INTERRUPTED; one line per host says what it
    finished, what was stopped and what never ran."""
    console.error("interrupted (Ctrl-C): what was running on the hosts was stopped")
    for r in reports:
        if r.done:
            continue
        r.interrupted = True
        if not r.seconds:
            r.seconds = seconds
        finished = [f"{x.step} ({x.status})" for x in r.results if x.status != "skipped"]
        names = {x.step for x in r.results}
        stopped = r.current or "nothing (it had not started: --parallel)"
        rest = [n for n in (planned or []) if n not in names and n != stopped]
        console.line(f"[{r.host}] interrupted: done: {', '.join(finished) or 'nothing'}; "
                     f"stopped: {stopped}" + (f"; not run: {', '.join(rest)}" if rest else ""))


def exit_status(reports: Sequence[HostReport]) -> ExitStatus:
    if any(r.count("failed") or r.reboot_pending for r in reports):
        return ExitStatus.FAILED
    if any(r.unreachable for r in reports):
        return ExitStatus.UNREACHABLE
    return ExitStatus.OK


def print_recap(console: Console, reports: Sequence[HostReport], check: bool) -> None:
    rows = []
    for r in reports:
        state = ("INTERRUPTED" if r.interrupted else "UNREACHABLE" if r.unreachable
                 else "FAILED" if r.count("failed") else "REBOOT" if r.reboot_pending else "ok")
        rows.append([r.host, state, r.count("ok"), r.count("changed"), r.count("failed"),
                     r.count("skipped"), f"{r.seconds:.1f}s"])
    title = "recap (check mode: nothing was changed)" if check else "recap"
    console.table(title, ["host", "result", "ok", "changed", "failed", "skipped", "time"], rows)
    bad = [r for r in reports if r.unreachable or r.count("failed")]
    if len(reports) > 1 or bad:
        console.line(f"{len(bad)} of {len(reports)} host{'s' if len(reports) != 1 else ''} failed")
    waiting = [r.host for r in reports if r.reboot_pending and r not in bad]
    if waiting:
        console.line(f"waiting for a reboot: {', '.join(waiting)} (run again with --reboot, or "
                     "reboot and run again)")
