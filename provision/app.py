"""What the invoke tasks call: load the inventory, pick hosts, run steps or a per-host action.

Nothing here talks to a host before the whole inventory has been validated.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import inventory as inv
from . import keeper
from .console import Console, Environment
from .engine import Context, HostReport, RunOptions, StepResult, print_recap, run as run_steps
from .errors import ConnectError, ExitStatus, RigError, UsageError
from .inventory import Host, Inventory
from .runlock import run_lock
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
                  parallel: int = 4, steps=None, lock: str | None = None,
                  reboot: bool = False, source: str | None = None) -> ExitStatus:
        """Run the steps on the hosts. `lock` (a lock file; else each host's `lock:` key) makes
        them reproduce a locked rig. After a successful non-check run each host's lock is written
        to <inventory dir>/locks/<host>.lock.yaml. `source` (`--from`): a host of the inventory
        whose verified shards and matching builds are copied instead of downloaded / built
        (provision/transfer/)."""
        def go() -> ExitStatus:
            from . import lock as lk
            from .engine import active_steps, select_steps
            from .steps import all_steps
            hosts = self.hosts(host, all_hosts)
            the_steps = steps or all_steps(_csv(only), _csv(skip))
            opts = RunOptions(check=check, diff=diff, only=_csv(only), skip=_csv(skip),
                              parallel=parallel, reboot=reboot, what=" ".join(
                                  ["provision"] + ([f"--only {only}"] if only else [])
                                  + ([f"--skip {skip}"] if skip else [])))
            select_steps(the_steps, opts.only, opts.skip)
            locks = self.apply_locks(hosts, lock)
            ran = [s.name for s in active_steps(the_steps, opts.only, opts.skip)]
            opts.before_host = lk.BeforeHost(locks)
            opts.after_host = lk.AfterHost(locks, ran, self.lock_dir())
            sessions = None
            if source is not None:  # --from: each host gets the source rig (provision/transfer/)
                from .transfer import source as tsrc
                src = tsrc.check_source(source, hosts, self.inventory().hosts, "command line")
                sessions = tsrc.Sessions(src, self.target_factory, self.console)
                opts.before_host = tsrc.Attach(sessions, opts.before_host)
            try:
                status, self.last_reports = run_steps(hosts, the_steps, self.console, opts,
                                                      self.target_factory)
            finally:
                if sessions is not None:
                    sessions.close()
            return status
        return self.guarded(go)

    def lock_dir(self) -> Path:
        """Where lock files are written: `locks/` next to the inventory file."""
        return Path(self.inventory_path).resolve().parent / "locks"

    def lock_file(self, spec: str) -> Path:
        """A lock path as given: relative to the current directory, else to the inventory's."""
        p = Path(spec).expanduser()
        if p.is_absolute() or p.exists():
            return p
        alt = Path(self.inventory_path).resolve().parent / p
        return alt if alt.exists() else p

    def apply_locks(self, hosts: Sequence[Host], cli_lock: str | None) -> dict[str, tuple[str, dict]]:
        """Load each host's lock (--lock wins over the host's `lock:` key) and turn it into the
        host's settings (the command line's --set still wins). Nothing is contacted here."""
        from . import lock as lk
        over = inv._validate_layer(inv.parse_overrides(self.overrides), "command line")
        out: dict[str, tuple[str, dict]] = {}
        for h in hosts:
            spec = cli_lock or h.cfg.get("lock")
            if not spec:
                continue
            path = self.lock_file(spec)
            doc = lk.load(path)
            lk.apply_to_cfg(h.cfg, doc)
            inv._merge(h.cfg, over)
            inv._cross_check(h.cfg, f"{h.source}: host {h.name!r} (with lock {path})")
            out[h.name] = (str(spec), doc)
        return out

    # -- one action per host (status tasks, builds, ...) -------------------------------------
    def each_host(self, host: str | None, action: Callable[[Context], Any], *, title: str,
                  all_hosts: bool = False, check: bool = False, parallel: int = 4,
                  recap: bool = False, changes: bool = False, restores: bool = False) -> ExitStatus:
        """Connect to each selected host and call action(ctx). RigError -> that host failed.
        What the task declares: `changes` -- the action may change the host, so it holds the
        host's run lock (unless check); `restores` -- it puts back what it changes while it runs
        (bench: the service, power limits): reported "ok" whatever it returns. Otherwise a true
        result reports "changed"."""
        def go() -> ExitStatus:
            hosts = self.hosts(host, all_hosts)
            reports = [HostReport(h.name) for h in hosts]
            t_run = time.monotonic()

            def one(i: int) -> HostReport:
                h, rep = hosts[i], reports[i]
                t0 = time.monotonic()
                rep.current = "connect"
                try:
                    target = self.target_factory(h)
                except ConnectError as e:
                    rep.unreachable = str(e)
                    rep.done = True
                    self.console.error(f"[{h.name}] UNREACHABLE: {e}")
                    return rep
                ctx = Context(h, target, self.console, check=check)
                rep.current = title
                try:
                    if changes and not check:
                        with run_lock(target, h.name, h.cfg["paths"]["state_dir"], title, ctx.warn):
                            changed = action(ctx)
                    else:
                        changed = action(ctx)
                    rep.results.append(StepResult(title, "changed" if changed and not restores else "ok"))
                    rep.current = ""
                except ConnectError as e:
                    rep.unreachable = str(e)
                    self.console.error(f"[{h.name}] UNREACHABLE: {e}")
                except RigError as e:
                    if target.lost():  # a step that turned the dropped link into its own error
                        rep.unreachable = target.lost()
                        self.console.error(f"[{h.name}] UNREACHABLE: {rep.unreachable}")
                    else:
                        self.console.error(f"[{h.name}] {title}: FAILED: {e}")
                        rep.results.append(StepResult(title, "failed", message=str(e)))
                except keeper.Interrupted:
                    rep.interrupted = True
                finally:
                    rep.commands = target.commands_run
                    target.close()
                    rep.seconds = time.monotonic() - t0
                rep.done = not rep.interrupted
                return rep

            _, interrupted = keeper.run_hosts(range(len(hosts)), one, parallel,
                                              on_wait=self.console.line)
            if interrupted:
                from .engine import finish_interrupted
                finish_interrupted(self.console, reports, time.monotonic() - t_run)
                print_recap(self.console, reports, check)
                return ExitStatus.INTERRUPTED
            if recap or len(hosts) > 1:
                print_recap(self.console, reports, check)
            from .engine import exit_status
            return exit_status(reports)
        return self.guarded(go)

    # -- lock files ------------------------------------------------------------------------
    def lock_doc(self, spec: str) -> tuple[str, dict]:
        """A lock document from a lock file, or built live from a host of the inventory (its
        state, facts and rendered files; with the host's own `lock:` settings applied)."""
        from . import lock as lk
        names = set(self.inventory().hosts) | set(self.inventory().groups)
        if spec not in names and lk.is_lock_file(spec):
            path = self.lock_file(spec)
            return str(spec), lk.load(path)
        [h] = self.hosts(spec)[:1]
        if h.cfg.get("lock"):
            lk.apply_to_cfg(h.cfg, lk.load(self.lock_file(h.cfg["lock"])))
        try:
            target = self.target_factory(h)
        except ConnectError as e:
            raise ConnectError(f"[{h.name}] UNREACHABLE: {e}") from None
        try:
            return h.name, lk.from_rig(Context(h, target, self.console))
        finally:
            target.close()

    def lock_show(self, spec: str) -> ExitStatus:
        def go() -> ExitStatus:
            from . import lock as lk
            name, doc = self.lock_doc(spec)
            body = doc.get("lock") or {}
            if name in self.inventory().hosts and not body.get("llama_cpp") and not body.get("model"):
                # read live from a rig that was never provisioned: no lock to show (a YAML comment,
                # so `lock.show rig > rig.lock.yaml` does not make a lock full of nulls)
                state = self.inventory().hosts[name].cfg["paths"]["state_dir"]
                self.console.line(f"# {name}: nothing provisioned yet (no llama.cpp build or model "
                                  f"recorded in {state}/state.json) — run `invoke provision --host "
                                  f"{name}` first")
                return ExitStatus.OK
            for ln in lk.dump(doc, self.lock_dir() / f"{doc['host']['name']}.lock.yaml").splitlines():
                self.console.line(ln)
            return ExitStatus.OK
        return self.guarded(go)

    def lock_diff(self, a: str, b: str) -> ExitStatus:
        """Differences between two hosts' locks (built live) or lock files; 1 if they differ."""
        def go() -> ExitStatus:
            from . import lock as lk
            na, da = self.lock_doc(a)
            nb, db = self.lock_doc(b)
            diffs = lk.show_differences(self.console, da, db, na, nb)
            return ExitStatus.FAILED if diffs else ExitStatus.OK
        return self.guarded(go)

    # -- facts -----------------------------------------------------------------------------
    def facts(self, host: str | None, all_hosts: bool = False) -> ExitStatus:
        from .facts import host as hostfacts
        from .steps.facts import summary_rows

        def show(ctx: Context) -> bool:
            hf, gf = hostfacts.host_and_gpu(ctx)
            self.console.table(f"facts: {ctx.host.name}", ["fact", "value"], summary_rows(hf, gf))
            return False
        return self.each_host(host, show, title="facts", all_hosts=all_hosts)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise UsageError(message)
