"""What the invoke tasks call: load the inventory, pick hosts, run steps or a per-host action.

Nothing here talks to a host before the whole inventory has been validated.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import inventory as inv
from .console import Console, Environment
from .engine import Context, HostReport, RunOptions, StepResult, print_recap, run as run_steps
from .errors import ConnectError, ExitStatus, RigError, UsageError
from .inventory import Host, Inventory
from .target import Target, connect


def _csv(v: str | None) -> list[str] | None:
    if not v:
        return None
    return [x.strip() for x in v.split(",") if x.strip()]


@dataclass
class App:
    inventory_path: str = "hosts.yaml"
    overrides: list[str] = field(default_factory=list)
    env: Environment | None = None
    target_factory: Callable[[Host], Target] = connect

    def __post_init__(self) -> None:
        self.console = Console(self.env)
        self._inv: Inventory | None = None

    # -- inventory -------------------------------------------------------------------------
    def inventory(self) -> Inventory:
        if self._inv is None:
            self._inv = inv.load(self.inventory_path, inv.parse_overrides(self.overrides))
        return self._inv

    def hosts(self, host: str | None, all_hosts: bool = False) -> list[Host]:
        return self.inventory().select(host, all_hosts)

    # -- guarded entry point ---------------------------------------------------------------
    def guarded(self, fn: Callable[[], ExitStatus]) -> ExitStatus:
        try:
            return fn()
        except RigError as e:
            self.console.error(str(e))
            return e.status
        except KeyboardInterrupt:
            self.console.error("interrupted")
            return ExitStatus.INTERRUPTED

    # -- provisioning ----------------------------------------------------------------------
    def provision(self, host: str | None, all_hosts: bool = False, check: bool = False,
                  diff: bool = False, only: str | None = None, skip: str | None = None,
                  parallel: int = 4, steps=None) -> ExitStatus:
        def go() -> ExitStatus:
            from .steps import all_steps
            hosts = self.hosts(host, all_hosts)
            opts = RunOptions(check=check, diff=diff, only=_csv(only), skip=_csv(skip),
                              parallel=parallel)
            status, self.last_reports = run_steps(hosts, steps or all_steps(), self.console, opts,
                                                  self.target_factory)
            return status
        return self.guarded(go)

    # -- one action per host (status tasks, builds, ...) -------------------------------------
    def each_host(self, host: str | None, action: Callable[[Context], Any], *, title: str,
                  all_hosts: bool = False, check: bool = False, parallel: int = 4,
                  recap: bool = False) -> ExitStatus:
        """Connect to each selected host and call action(ctx). RigError -> that host failed."""
        def go() -> ExitStatus:
            hosts = self.hosts(host, all_hosts)
            reports: list[HostReport] = []

            def one(h: Host) -> HostReport:
                rep = HostReport(h.name)
                t0 = time.monotonic()
                try:
                    target = self.target_factory(h)
                except ConnectError as e:
                    rep.unreachable = str(e)
                    self.console.error(f"[{h.name}] UNREACHABLE: {e}")
                    return rep
                ctx = Context(h, target, self.console, check=check)
                try:
                    changed = action(ctx)
                    rep.results.append(StepResult(title, "changed" if changed else "ok"))
                except ConnectError as e:
                    rep.unreachable = str(e)
                    self.console.error(f"[{h.name}] UNREACHABLE: {e}")
                except RigError as e:
                    self.console.error(f"[{h.name}] {title}: FAILED: {e}")
                    rep.results.append(StepResult(title, "failed", message=str(e)))
                finally:
                    rep.commands = target.commands_run
                    target.close()
                    rep.seconds = time.monotonic() - t0
                return rep

            if len(hosts) == 1:
                reports.append(one(hosts[0]))
            else:
                with ThreadPoolExecutor(max_workers=parallel) as pool:
                    reports.extend(pool.map(one, hosts))
            if recap or len(hosts) > 1:
                print_recap(self.console, reports, check)
            from .engine import exit_status
            return exit_status(reports)
        return self.guarded(go)

    # -- facts -----------------------------------------------------------------------------
    def facts(self, host: str | None, all_hosts: bool = False) -> ExitStatus:
        from .facts import host as hostfacts
        from .steps.facts import summary_rows

        def show(ctx: Context) -> bool:
            hf = hostfacts.host_facts(ctx)
            gf = hostfacts.gpu(ctx)
            self.console.table(f"facts: {ctx.host.name}", ["fact", "value"], summary_rows(hf, gf))
            return False
        return self.each_host(host, show, title="facts", all_hosts=all_hosts)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise UsageError(message)
