"""Plan/apply engine: a step reads facts, plans a list of changes, and applies them.

"No change" is a first-class result; --check prints the plan and changes nothing; --diff shows
file diffs; a recap per host. Handlers (e.g. restarting llama-server) that a change notifies are
persisted on the host as "owed" before the change is applied, so a run that fails later still
restarts next time (the Ansible handler trap, ansible#4766).
"""
from __future__ import annotations

import difflib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .console import Console
from .errors import ConnectError, ExitStatus, RigError
from .inventory import Host
from .target import Target, connect

# ---------------------------------------------------------------------------------------------
# changes


@dataclass
class Change:
    """One planned change. Subclasses say how to apply it; tests compare them as data."""

    description: str
    notify: tuple[str, ...] = field(default=(), kw_only=True)

    def apply(self, ctx: "Context") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

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


def file_diff(path: str, before: str | None, after: str) -> str:
    a = [] if before is None else before.splitlines(keepends=True)
    b = after.splitlines(keepends=True)
    lines = list(difflib.unified_diff(a, b, fromfile="/dev/null" if before is None else path,
                                      tofile=path))
    return "".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines)


# ---------------------------------------------------------------------------------------------
# host state (persisted on the host)


class HostState:
    """JSON at <state_dir>/state.json on the host: owed handlers and what steps record."""

    def __init__(self, ctx: "Context"):
        self.ctx = ctx
        self.path = f"{ctx.host.cfg['paths']['state_dir']}/state.json"
        raw = ctx.target.read_file(self.path, sudo=True)
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


class Step:
    """A provisioning step: plan(ctx) -> changes (empty = no change); handlers by name."""

    name: str = ""
    title: str = ""

    def plan(self, ctx: Context) -> list[Change]:  # pragma: no cover - abstract
        raise NotImplementedError

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


@dataclass
class HostReport:
    host: str
    results: list[StepResult] = field(default_factory=list)
    unreachable: str = ""
    seconds: float = 0.0
    commands: int = 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> bool:
        return bool(self.unreachable) or self.count("failed") > 0

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


def run_host(host: Host, steps: Sequence[Step], console: Console, opts: RunOptions,
             target_factory: Callable[[Host], Target] = connect) -> HostReport:
    report = HostReport(host.name)
    t_start = time.monotonic()
    try:
        target = target_factory(host)
    except ConnectError as e:
        report.unreachable = str(e)
        report.seconds = time.monotonic() - t_start
        console.error(f"[{host.name}] UNREACHABLE: {e}")
        return report
    ctx = Context(host, target, console, check=opts.check, show_diff=opts.diff)
    handlers: dict[str, Callable[[Context], None]] = {}
    active = [s for s in steps if (not opts.only or s.name in opts.only)
              and not (opts.skip and s.name in opts.skip)]
    failed = False
    try:
        for step in steps:
            if step not in active:
                report.results.append(StepResult(step.name, "skipped", message="not selected"))
                continue
            # only the handlers of steps that run: `--only facts` must not restart anything
            handlers.update(step.handlers())
            if failed:
                report.results.append(StepResult(step.name, "skipped", message="an earlier step failed"))
                continue
            res = _run_step(ctx, step)
            report.results.append(res)
            if res.status == "failed":
                failed = True
        if not failed:
            report.results.extend(_run_handlers(ctx, handlers, active))
    except ConnectError as e:
        report.unreachable = str(e)
        console.error(f"[{host.name}] UNREACHABLE: {e}")
    finally:
        report.commands = target.commands_run
        target.close()
    report.seconds = time.monotonic() - t_start
    return report


def _run_step(ctx: Context, step: Step) -> StepResult:
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
            if not ctx.check:
                if ch.notify:
                    ctx.state.owe(ch.notify)
                ch.apply(ctx)
        if not ctx.check:
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
        t0 = time.monotonic()
        try:
            fn(ctx)
        except ConnectError:
            raise
        except RigError as e:
            ctx.console.error(f"[{ctx.host.name}] handler {h}: FAILED: {e}")
            results.append(StepResult(f"handler {h}", "failed", message=str(e),
                                      seconds=time.monotonic() - t0))
            continue
        ctx.state.paid(h)
        results.append(StepResult(f"handler {h}", "changed", [f"ran {h}"],
                                  seconds=time.monotonic() - t0))
    return results


def run(hosts: Sequence[Host], steps: Sequence[Step], console: Console, opts: RunOptions,
        target_factory: Callable[[Host], Target] = connect) -> tuple[ExitStatus, list[HostReport]]:
    select_steps(steps, opts.only, opts.skip)
    if len(hosts) == 1:
        reports = [run_host(hosts[0], steps, console, opts, target_factory)]
    else:
        with ThreadPoolExecutor(max_workers=max(1, opts.parallel)) as pool:
            futs = [pool.submit(run_host, h, steps, console, opts, target_factory) for h in hosts]
            reports = [f.result() for f in futs]
    print_recap(console, reports, opts.check)
    return exit_status(reports), reports


def exit_status(reports: Sequence[HostReport]) -> ExitStatus:
    if any(r.count("failed") for r in reports):
        return ExitStatus.FAILED
    if any(r.unreachable for r in reports):
        return ExitStatus.UNREACHABLE
    return ExitStatus.OK


def print_recap(console: Console, reports: Sequence[HostReport], check: bool) -> None:
    rows = []
    for r in reports:
        state = "UNREACHABLE" if r.unreachable else ("FAILED" if r.failed else "ok")
        rows.append([r.host, state, r.count("ok"), r.count("changed"), r.count("failed"),
                     r.count("skipped"), f"{r.seconds:.1f}s"])
    title = "recap (check mode: nothing was changed)" if check else "recap"
    console.table(title, ["host", "result", "ok", "changed", "failed", "skipped", "time"], rows)
    bad = [r for r in reports if r.failed]
    if len(reports) > 1 or bad:
        console.line(f"{len(bad)} of {len(reports)} host{'s' if len(reports) != 1 else ''} failed")
