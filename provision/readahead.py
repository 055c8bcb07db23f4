"""Read ahead: the files, unit states and hashes a run reads from a rig, in ONE read-only round
trip (`remote/rig_read.py`, as root) instead of one command each.

Modules declare what they will read with `@wants` (a function of the context -> a `Want`); the
first `read_file` / `sha256` / `enabled` of a run reads everything declared (plus what was asked)
and keeps it in `ctx.facts` -- so a reboot's `ctx.facts.clear()` drops it too. The engine calls
`forget(ctx)` before it applies a change or runs a handler: after that the next read goes to the
rig again. A run that changes nothing (a no-op) reads each of these once, together.

Only read what a step reads BEFORE it changes anything (plan) through here; a step that reads
after its own changes outside the engine (an invoke task) reads the rig directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from . import remote

KEY = "readahead"


@dataclass
class Want:
    read: list[str] = field(default_factory=list)  # file text
    sha256: list[str] = field(default_factory=list)  # file hash (the content stays on the rig)
    enabled: list[str] = field(default_factory=list)  # systemd units: `systemctl is-enabled`

    def add(self, other: "Want") -> None:
        for name in ("read", "sha256", "enabled"):
            mine = getattr(self, name)
            mine.extend(x for x in getattr(other, name) if x not in mine)


@dataclass
class Snapshot:
    read: dict[str, str | None] = field(default_factory=dict)
    sha256: dict[str, str | None] = field(default_factory=dict)
    enabled: dict[str, str] = field(default_factory=dict)
    systemd: bool | None = None


_WANTS: list[Callable[[object], Want]] = []


def wants(fn: Callable[[object], Want]) -> Callable[[object], Want]:
    """Declare what a module reads in a run (fn(ctx) -> Want); a decorator."""
    _WANTS.append(fn)
    return fn


def forget(ctx) -> None:
    ctx.facts.pop(KEY, None)


def _own_files(target) -> bool:
    """A target with its own file access (it overrides `read_file`: an in-memory test double)
    is asked item by item, the way it answers; a shell target runs rig_read.py."""
    from .target import Target
    return type(target).read_file is not Target.read_file


def _fetch_each(t, want: Want, systemd_too: bool) -> Snapshot:
    systemd = None
    if want.enabled or systemd_too:
        systemd = "systemd" in t.run("[ -d /run/systemd/system ] && echo systemd; true", check=False).stdout
    return Snapshot({p: t.read_file(p, sudo=True) for p in want.read},
                    {p: t.sha256(p, sudo=True) for p in want.sha256},
                    {u: (t.run(f"systemctl is-enabled {u} 2>/dev/null; true", check=False).stdout.strip()
                         .splitlines() or [""])[0] if systemd else "" for u in want.enabled}, systemd)


def _command(want: Want) -> str:
    return remote.command("rig_read.py", json.dumps({"read": want.read, "sha256": want.sha256,
                                                     "enabled": want.enabled}))


def _parse(output: str) -> Snapshot | None:
    try:
        d = json.loads(output.strip().splitlines()[-1])
        return Snapshot(d["read"], d["sha256"], d["enabled"], bool(d["systemd"]))
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def _fetch(ctx, want: Want) -> Snapshot:
    r = ctx.target.run(_command(want), sudo=True, check=False, timeout=120)
    snap = _parse(r.stdout)
    if snap is None:
        from .errors import CommandError
        raise CommandError(ctx.host.name, "read the rig's files (remote/rig_read.py)", r.exited,
                           r.stdout, r.stderr)
    return snap


def _declared(ctx, ask: Want | None = None) -> Want:
    want = Want()
    for fn in _WANTS:
        want.add(fn(ctx))
    if ask is not None:
        want.add(ask)
    return want


def along(ctx) -> str | None:
    """The read-ahead as a shell line to run INSIDE another read-only command (the facts step's:
    one round trip for all a no-op reads); hand that command's output for it to `accept`. None
    when it cannot ride along: already read, a target with its own files, or sudo that wants a
    password on stdin."""
    if KEY in ctx.facts or _own_files(ctx.target):
        return None
    line = ctx.target.wrap(_command(_declared(ctx)), sudo=True)
    return None if line.startswith("sudo -S") else line


def accept(ctx, output: str) -> None:
    """The output of `along()`'s line: kept as this run's read-ahead (unreadable: ignored, the
    first read then asks the rig itself)."""
    snap = _parse(output) if output.strip() else None
    if snap is not None:
        ctx.facts[KEY] = snap


def _get(ctx, ask: Want, systemd_too: bool = False) -> Snapshot:
    if _own_files(ctx.target):  # only what is asked, item by item (nothing read ahead)
        return _fetch_each(ctx.target, ask, systemd_too)
    snap: Snapshot | None = ctx.facts.get(KEY)
    if snap is None:
        snap = ctx.facts[KEY] = _fetch(ctx, _declared(ctx, ask))
        return snap
    missing = Want([p for p in ask.read if p not in snap.read],
                   [p for p in ask.sha256 if p not in snap.sha256],
                   [u for u in ask.enabled if u not in snap.enabled])
    if missing.read or missing.sha256 or missing.enabled:
        more = _fetch(ctx, missing)
        snap.read.update(more.read)
        snap.sha256.update(more.sha256)
        snap.enabled.update(more.enabled)
    return snap


def read_file(ctx, path: str) -> str | None:
    """Text of a file on the rig (read as root), None if absent."""
    return _get(ctx, Want(read=[path])).read[path]


def sha256(ctx, paths: list[str]) -> dict[str, str | None]:
    """path -> sha256 of the file on the rig (None: absent)."""
    snap = _get(ctx, Want(sha256=list(paths)))
    return {p: snap.sha256[p] for p in paths}


def enabled(ctx, unit: str) -> str:
    """`systemctl is-enabled UNIT` ("enabled", "disabled", ...; "" without systemd or unit)."""
    return _get(ctx, Want(enabled=[unit])).enabled[unit]


def systemd(ctx) -> bool:
    """Whether systemd runs the rig (/run/systemd/system)."""
    return bool(_get(ctx, Want(), systemd_too=True).systemd)
