"""The source rig of `provision --from SOURCE`: connection, read-only context, facts read there.

The source is a host of the inventory. Each destination host gets its own `SourceRig` (its own SSH
session: hosts run in parallel threads) through `Attach`, an engine `before_host` hook that puts it
in `ctx.facts[FACT]`; the steps find it with `source_of(ctx)`. `Sessions.close()` (App.provision,
after the run) closes them all.

Nothing here writes on the source: its context is a check-mode context (HostState never saves), and
every command run there only reads. A source that cannot be reached is not an error of the run:
the steps say so in one line and take the shards from the hub / build here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..console import Console
from ..engine import Context
from ..errors import ConnectError, StepError
from ..inventory import Host
from ..target import Target

FACT = "transfer.source"


class SourceUnavailable(StepError):
    """The source rig cannot be reached (or went away): take the hub / build here."""


@dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset[str]

    def describe(self) -> str:
        return self.model or "unknown CPU"


def parse_cpu(output: str) -> Cpu:
    model, flags = "", frozenset()
    for line in output.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name", "CPU part") and not model:
            model = val.strip()
        elif key in ("flags", "Features"):
            flags = frozenset(val.split())
    return Cpu(model, flags)


CPU_CMD = "grep -m1 -E '^(model name|CPU part)' /proc/cpuinfo; grep -m1 -E '^(flags|Features)' /proc/cpuinfo; true"


@dataclass
class SourceRig:
    """One destination's view of the source rig (lazy connection; read-only)."""

    host: Host
    target_factory: Callable[[Host], Target]
    console: Console
    dest: str  # the destination host's name (for messages)
    unreachable: str | None = None
    direct_failed: str | None = None  # why the direct path did not work (tried once per run)
    _ctx: Context | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def cfg(self) -> dict[str, Any]:
        return self.host.cfg

    @property
    def rate(self) -> float:
        """Bytes per second a copy may read on the source (0 = no limit)."""
        return float(self.cfg["transfer"]["rate_limit_mb"]) * 1_000_000

    @property
    def address(self) -> str | None:
        """Where other rigs reach the source (None: only through this machine)."""
        if self.host.is_local:
            return None
        return self.cfg["transfer"]["address"] or self.cfg["connection"]["address"]

    def route_text(self) -> str:
        mode = self.cfg["transfer"]["mode"]
        if mode == "relay" or self.address is None:
            return "relayed through this machine"
        if mode == "direct":
            return f"directly from {self.address}"
        return f"directly from {self.address} if {self.dest} reaches it, else relayed through this machine"

    def ctx(self) -> Context:
        """A check-mode context on the source (connects on first use)."""
        with self._lock:
            if self.unreachable:
                raise SourceUnavailable(self.unreachable)
            if self._ctx is None:
                try:
                    target = self.target_factory(self.host)
                except ConnectError as e:
                    self.unreachable = f"source {self.name} is unreachable: {e}"
                    raise SourceUnavailable(self.unreachable) from None
                self._ctx = Context(self.host, target, self.console, check=True)
            return self._ctx

    def lost(self, e: Exception) -> SourceUnavailable:
        """The error to raise when the source went away in the middle of something."""
        self.unreachable = f"source {self.name} went away: {e}"
        return SourceUnavailable(self.unreachable)

    def run(self, command: str, **kw):
        """A read-only command on the source; SourceUnavailable if it cannot be reached."""
        ctx = self.ctx()
        try:
            return ctx.target.run(command, **kw)
        except ConnectError as e:
            raise self.lost(e) from None

    def state(self, key: str) -> dict[str, Any]:
        ctx = self.ctx()
        try:
            return dict(ctx.state.get(key) or {})
        except ConnectError as e:
            raise self.lost(e) from None

    def fact(self, key: str, cmd: str, parse: Callable[[str], Any]) -> Any:
        ctx = self.ctx()
        if key not in ctx.facts:
            ctx.facts[key] = parse(self.run(cmd, check=False).stdout)
        return ctx.facts[key]

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                try:
                    self._ctx.target.close()
                except Exception:  # noqa: BLE001 - closing a dead session may fail any way
                    pass
                self._ctx = None


def source_of(ctx: Context) -> SourceRig | None:
    """The source rig of this run (None without --from)."""
    return ctx.facts.get(FACT)


class Sessions:
    """One SourceRig per destination host of a run; closed together at the end."""

    def __init__(self, source: Host, target_factory: Callable[[Host], Target], console: Console):
        self.source = source
        self.target_factory = target_factory
        self.console = console
        self.by_dest: dict[str, SourceRig] = {}
        self._lock = threading.Lock()

    def for_dest(self, dest: str) -> SourceRig:
        with self._lock:
            if dest not in self.by_dest:
                self.by_dest[dest] = SourceRig(self.source, self.target_factory, self.console, dest)
            return self.by_dest[dest]

    def close(self) -> None:
        with self._lock:
            rigs, self.by_dest = list(self.by_dest.values()), {}
        for r in rigs:
            r.close()


class Attach:
    """Engine before_host hook: give the destination's context its SourceRig, then run the next
    hook (the lock's). Failures keep the next hook's name."""

    def __init__(self, sessions: Sessions, then: Callable[[Context], None] | None = None):
        self.sessions = sessions
        self.then = then
        self.name = getattr(then, "name", "transfer")

    def __call__(self, ctx: Context) -> None:
        src = self.sessions.for_dest(ctx.host.name)
        ctx.facts[FACT] = src
        ctx.say(f"transfer: shards and builds come from {src.name} where it has them "
                f"({src.route_text()}; rate limit "
                + (f"{src.rate / 1e6:g} MB/s" if src.rate else "none") + ")")
        if self.then is not None:
            self.then(ctx)


def check_source(name: str, hosts: list[Host], inventory_hosts: dict[str, Host], where: str) -> Host:
    """The --from host: a host of the inventory that is not one of the hosts provisioned."""
    from ..errors import UsageError
    import difflib
    if name not in inventory_hosts:
        m = difflib.get_close_matches(name, list(inventory_hosts), n=1, cutoff=0.6)
        raise UsageError(f"{where}: --from: unknown host {name!r}" + (f" (did you mean {m[0]!r}?)" if m else "")
                         + " -- it must be one host of the inventory")
    if any(h.name == name for h in hosts):
        raise UsageError(f"{where}: --from {name}: the source cannot be one of the hosts provisioned "
                         f"({', '.join(h.name for h in hosts)})")
    return inventory_hosts[name]
