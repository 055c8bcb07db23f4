"""Copy files and directory trees from the source rig onto the rig of a context.

Two routes, one stream format (remote/rig_copy.py `send` -> `recv`):

* DIRECT -- the destination pulls over SSH from the source's sshd: a key made for this copy on
  the destination, allowed on the source by a temporary authorized_keys line (remote/rig_keys.py:
  `restrict`, `from=` the destination's addresses, `expiry-time=`, `command=` that can only send
  the listed items at the source's rate limit), removed again right after the copy. Used when
  `transfer.mode` is auto/direct, the source has an address (`transfer.address`, else
  `connection.address`) and a `ping` through that key answers from the destination.
* RELAY -- this machine reads the source's `send` over one SSH channel and writes it into the
  destination's `recv` over another, chunk by chunk: nothing is staged on disk here, but every
  byte crosses this machine's network link twice.

Either way the source only reads (the sender runs as `python3 -c`, writes nothing there; `nice`),
paced by a token bucket at the source's `transfer.rate_limit_mb`. On the destination a file grows
under its partial path and is renamed onto its final path only when complete; an interrupted copy
leaves the partial, and the next copy asks the source to resume at its size.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .. import remote, sections
from ..engine import Context
from ..errors import ConnectError, StepError
from ..pipe import PipeError, PipeTimeout
from ..target import join, quote
from .source import SourceRig, SourceUnavailable

CHUNK = 1 << 20
PIPE_TIMEOUT = 120.0  # seconds a stream may stay silent before the copy counts as broken
KEY_MINUTES = 10  # the temporary key's deadline: the copy must START within it


class DirectUnavailable(Exception):
    """The direct route cannot be used (says why); the copy goes through the relay."""


@dataclass
class FileItem:
    id: str
    src: str  # absolute path on the source
    dest: str  # absolute final path here
    partial: str  # where it grows until it is complete (same filesystem as dest)
    size: int = 0
    label: str = ""
    mode: int | None = 0o644


@dataclass
class TreeItem:
    id: str
    src: str
    dest: str
    include: list[str] = field(default_factory=list)  # top-level entries (empty: all)
    skip_names: list[str] = field(default_factory=list)
    skip_dirs: list[str] = field(default_factory=list)
    tolerant: bool = False  # a file that cannot be read is skipped, not an error
    skip_existing: bool = False  # a file already here is kept (a cache merged into)
    label: str = ""


Item = FileItem | TreeItem


@dataclass
class Result:
    id: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    resumed_from: int = 0
    files: int = 0
    skipped: int = 0


@dataclass
class CopyRun:
    route: str  # "direct" | "relay"
    why: str  # why this route
    results: dict[str, Result]
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results.values())

    def failed(self) -> dict[str, str]:
        return {i: r.error or "failed" for i, r in self.results.items() if not r.ok}


# ---------------------------------------------------------------------------------------------
# what the helpers get (pure)


def sender_item(it: Item) -> dict[str, Any]:
    if isinstance(it, FileItem):
        return {"id": it.id, "kind": "file", "path": it.src}
    return {"id": it.id, "kind": "tree", "path": it.src, "include": list(it.include),
            "skip_names": list(it.skip_names), "skip_dirs": list(it.skip_dirs), "tolerant": it.tolerant}


def sender_request(items: Sequence[Item], offsets: dict[str, int], rate: float) -> dict[str, Any]:
    out = []
    for it in items:
        d = sender_item(it)
        if isinstance(it, FileItem):
            d["offset"] = int(offsets.get(it.id, 0))
        out.append(d)
    return {"items": out, "rate": rate}


def receiver_config(items: Sequence[Item], progress_s: float = 2.0) -> dict[str, Any]:
    out: dict[str, dict] = {}
    for it in items:
        if isinstance(it, FileItem):
            out[it.id] = {"kind": "file", "dest": it.dest, "partial": it.partial}
            if it.mode is not None:
                out[it.id]["mode"] = it.mode
        else:
            out[it.id] = {"kind": "tree", "dest": it.dest, "skip_existing": it.skip_existing,
                          "tolerant": it.tolerant}
    return {"items": out, "progress_s": progress_s}


def results_from(events: list[dict], items: Sequence[Item], why_missing: str) -> dict[str, Result]:
    """The receiver's done/error events -> one Result per item (no event: `why_missing`)."""
    out: dict[str, Result] = {}
    for ev in events:
        iid = ev.get("id")
        if iid is None or iid in out:
            continue
        if ev.get("event") == "done":
            out[iid] = Result(iid, True, int(ev.get("bytes") or 0), float(ev.get("seconds") or 0),
                              resumed_from=int(ev.get("resumed_from") or 0), files=int(ev.get("files") or 0),
                              skipped=int(ev.get("skipped") or 0))
        elif ev.get("event") == "error":
            out[iid] = Result(iid, False, error=str(ev.get("error") or "failed"))
    for it in items:
        out.setdefault(it.id, Result(it.id, False, error=why_missing))
    return out


def line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# progress on the control machine


def human(n: float | int | None) -> str:
    from ..progress import human as h
    return h(n)


class Progress:
    """Copy events through the one progress display (provision/progress.py): a line when an item
    starts and ends; its bytes as a bar on a terminal, else a line every `every_s`."""

    def __init__(self, ctx: Context, prefix: str, source: str, items: Sequence[Item], every_s: float = 5.0):
        from ..progress import Progress as Display
        self.source = source
        self.labels = {it.id: it.label or os.path.basename(it.dest) for it in items}
        self.display = Display(ctx, prefix, "bytes", every_s=every_s).__enter__()

    def __call__(self, ev: dict) -> None:
        kind, iid = ev.get("event"), ev.get("id")
        name = self.labels.get(iid, str(iid))
        d = self.display
        if kind == "start":
            off, size = int(ev.get("offset") or 0), int(ev.get("size") or 0)
            d.say(f"{name} <- {self.source}: "
                  + (f"resuming at {human(off)} of {human(size)}" if off else f"copying {human(size)}"))
            d.add(str(iid), name, total=size or None, done=off)
        elif kind == "progress":
            total = ev.get("total")
            d.update(str(iid), int(ev.get("bytes") or 0), int(total) if total else None)
        elif kind == "done":
            secs = float(ev.get("seconds") or 0)
            n = int(ev.get("bytes") or 0)
            d.complete(str(iid), n)
            d.say(f"{name} <- {self.source}: {human(n)} in {secs:.1f}s ({human(n / max(secs, 1e-6))}/s)"
                  + (f", {ev.get('files')} files" if ev.get("files", 1) != 1 else ""))
        elif kind == "error":
            d.say(f"{name}: copy from {self.source} failed: {ev.get('error')}")

    def close(self) -> None:
        self.display.close()


# ---------------------------------------------------------------------------------------------
# commands with input


def run_input(target, command: str, data: str, *, sudo: bool = False, timeout: float = PIPE_TIMEOUT,
              on_line: Callable[[str], None] | None = None) -> tuple[int, str, str]:
    """`command` with `data` on its stdin, through a Pipe: Target.run(stdin=) over SSH hands the
    text to invoke, which feeds a non-tty stream ONE byte per 10 ms (~100 bytes/s); a 25 kB request
    would take minutes. Returns (exit status, stdout, stderr); ConnectError if the box is gone."""
    p = target.pipe(command, sudo=sudo, timeout=timeout)
    out = bytearray()
    try:
        try:
            p.write(data.encode())
            p.close_stdin()
            buf = b""
            while True:
                b = p.read(65536)
                if not b:
                    break
                out += b
                if on_line is not None:
                    buf += b
                    *lines, buf = buf.split(b"\n")
                    for ln in lines:
                        on_line(ln.decode(errors="replace"))
            if on_line is not None and buf:
                on_line(buf.decode(errors="replace"))
            rc = p.wait(30)
        except PipeError as e:
            raise ConnectError(f"{target.name}: {e}") from None
        return rc, out.decode(errors="replace"), p.stderr_text()
    finally:
        p.close()


# ---------------------------------------------------------------------------------------------
# helpers on the destination


def install_helper(ctx: Context, name: str) -> str:
    """remote/<name> at <prefix>/libexec/<name> on the destination (only when it differs)."""
    path = f"{ctx.cfg['paths']['prefix'].rstrip('/')}/libexec/{name}"
    key = f"transfer.script.{name}"
    if ctx.facts.get(key) != path:
        if ctx.target.sha256(path, sudo=True) != remote.sha(name):
            ctx.target.write_file(path, remote.source(name), mode=0o755)
        ctx.facts[key] = path
    return path


def probe(ctx: Context, paths: list[str], df: str) -> tuple[dict[str, int | None], int]:
    """Sizes of `paths` here (partials to resume) and the free bytes at `df`."""
    helper = install_helper(ctx, "rig_copy.py")
    rc, out, err = run_input(ctx.target, f"python3 {quote(helper)} probe",
                             json.dumps({"paths": paths, "df": df}) + "\n", sudo=True)
    for ln in out.splitlines():
        if ln.startswith("{"):
            d = json.loads(ln)
            return {p: d["sizes"].get(p) for p in paths}, int(d.get("free") or 0)
    raise StepError(f"cannot read the disk here (exit {rc}): {(err.strip() or out.strip())[-300:]}")


# ---------------------------------------------------------------------------------------------
# the two routes


def copy(ctx: Context, src: SourceRig, items: Sequence[Item], prefix: str,
         offsets: dict[str, int] | None = None) -> CopyRun:
    """Copy `items` from the source onto ctx's rig. Never raises for a copy that fails (each
    item's Result says why); raises ConnectError only when THIS rig goes away."""
    progress = Progress(ctx, prefix, src.name, items)
    try:
        return _copy(ctx, src, items, offsets or {}, progress)
    finally:
        progress.close()


def _copy(ctx: Context, src: SourceRig, items: Sequence[Item], offsets: dict[str, int],
          progress: Progress) -> CopyRun:
    t0 = time.monotonic()
    mode = src.cfg["transfer"]["mode"]
    why = ""
    if mode != "relay" and src.address and not src.direct_failed:
        try:
            results = _direct(ctx, src, items, offsets, progress)
            return CopyRun("direct", f"{ctx.host.name} reaches {src.name} at {src.address}", results,
                           time.monotonic() - t0)
        except DirectUnavailable as e:
            src.direct_failed = str(e)
            why = str(e)
        except SourceUnavailable as e:
            return CopyRun("direct", str(e), results_from([], items, str(e)), time.monotonic() - t0)
    elif src.direct_failed:
        why = src.direct_failed
    elif mode == "relay":
        why = f"{src.name}'s transfer.mode is relay"
    else:
        why = f"{src.name} has no address other rigs can use"
    if mode == "direct":
        msg = f"direct copy impossible ({why}) and {src.name}'s transfer.mode is direct"
        return CopyRun("direct", msg, results_from([], items, msg), time.monotonic() - t0)
    progress.display.say(f"relaying through this machine: {why}")
    try:
        results = _relay(ctx, src, items, offsets, progress)
    except SourceUnavailable as e:
        results = results_from([], items, str(e))
    return CopyRun("relay", why, results, time.monotonic() - t0)


def _relay(ctx: Context, src: SourceRig, items: Sequence[Item], offsets: dict[str, int],
           progress: Callable[[dict], None]) -> dict[str, Result]:
    helper = install_helper(ctx, "rig_copy.py")
    sctx = src.ctx()
    events: list[dict] = []
    done = threading.Event()
    dst = ctx.target.pipe(f"python3 {quote(helper)} recv", sudo=True, timeout=PIPE_TIMEOUT)
    broke = ""
    try:
        dst.write(line(receiver_config(items)))
        reader = threading.Thread(target=_read_events, args=(dst, events, progress, done), daemon=True)
        reader.start()
        try:
            snd = sctx.target.pipe("nice -n 10 " + remote.command("rig_copy.py", "send"),
                                   sudo=True, timeout=PIPE_TIMEOUT)
        except ConnectError as e:
            raise src.lost(e) from None
        try:
            snd.write(line(sender_request(items, offsets, src.rate)))
            snd.close_stdin()
            while True:
                try:
                    b = snd.read(CHUNK)
                except PipeError as e:
                    broke = f"{src.name}: {e}"
                    break
                if not b:
                    break
                try:
                    dst.write(b)
                except PipeError as e:
                    broke = f"{ctx.host.name}: the receiver stopped: {e}"
                    break
            if not broke:
                rc = snd.wait(30)
                if rc != 0:
                    err = snd.stderr_text().strip().splitlines()
                    broke = f"{src.name}: the sender failed (exit {rc})" + (f": {err[-1][-300:]}" if err else "")
        finally:
            snd.close()
        dst.close_stdin()
        try:
            dst.wait(120)
        except PipeError:
            pass
        done.set()
        reader.join(30)
    finally:
        done.set()
        dst.close()
    if not broke:
        err = dst.stderr_text().strip().splitlines()
        broke = f"the receiver on {ctx.host.name} ended early" + (f": {err[-1][-300:]}" if err else "")
    return results_from(events, items, broke)


def _read_events(dst, events: list[dict], progress: Callable[[dict], None], done: threading.Event) -> None:
    while True:
        try:
            ln = dst.readline()
        except PipeTimeout:
            if done.is_set():
                return
            continue
        except (PipeError, OSError):
            return
        if not ln:
            return
        if ln.startswith(b"{"):
            try:
                ev = json.loads(ln)
            except ValueError:
                continue
            events.append(ev)
            progress(ev)


class DirectKey:
    """The temporary key of one direct copy: made on the destination, allowed on the source."""

    def __init__(self, ctx: Context, src: SourceRig):
        self.ctx, self.src = ctx, src
        self.tag = f"llama-rig-copy-{uuid.uuid4().hex[:12]}"
        self.dir = f"{ctx.cfg['paths']['state_dir'].rstrip('/')}/transfer"
        self.added = False
        con = src.cfg["connection"]
        self.user, self.port, self.addr = con["user"], int(con["port"]), src.address

    @property
    def argv(self) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-T", "-i", f"{self.dir}/key", "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.dir}/known_hosts", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=8", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                "-o", "Compression=no", "-o", "LogLevel=ERROR", "-p", str(self.port), f"{self.user}@{self.addr}"]

    def open(self, items: Sequence[Item]) -> None:
        # can the destination reach the source's sshd at all? (before anything is written anywhere)
        r = self.ctx.target.run(remote.command("tcp_reach.py", self.addr, str(self.port)), check=False,
                                timeout=30)
        if not r.ok:
            why = (r.stderr.strip().splitlines() or [f"exit {r.exited}"])[-1]
            raise DirectUnavailable(f"{self.ctx.host.name} cannot reach {self.src.name} at "
                                    f"{self.addr}:{self.port} ({why[-200:]})")
        d = quote(self.dir)
        r = self.ctx.target.run(
            f"umask 077; rm -rf {d} && mkdir -p {d} && ssh-keygen -q -t ed25519 -N '' -C {quote(self.tag)} "
            f"-f {d}/key </dev/null >/dev/null && cat {d}/key.pub && echo @@addr && (hostname -I || true)",
            sudo=True, check=False)
        if not r.ok:
            raise DirectUnavailable(f"cannot make a key on {self.ctx.host.name} (ssh-keygen): "
                                    f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
        sec = sections.split("@@pub\n" + r.stdout, ("pub", "addr"))
        pub, addrs = "\n".join(sec["pub"]), " ".join(sec["addr"])
        hk = self.src.run("cat /etc/ssh/ssh_host_*_key.pub 2>/dev/null; true", check=False).stdout
        host = self.addr if self.port == 22 else f"[{self.addr}]:{self.port}"
        known = [f"{host} {' '.join(ln.split()[:2])}" for ln in hk.splitlines() if len(ln.split()) >= 2]
        if not known:
            raise DirectUnavailable(f"cannot read {self.src.name}'s host keys")
        req = {"tag": self.tag, "pubkey": pub.strip(), "from": addrs.split(), "minutes": KEY_MINUTES,
               "items": [sender_item(it) for it in items], "rate": self.src.rate,
               "script": remote.source("rig_copy.py")}
        rc, out, err = self.keys("add", req)
        if rc != 0 or '"added"' not in out:
            raise DirectUnavailable(f"cannot add a copy key for {self.user} on {self.src.name}: "
                                    f"{(err.strip().splitlines() or [out.strip() or '?'])[-1][-200:]}")
        self.added = True
        self.ctx.target.write_file(f"{self.dir}/known_hosts", "\n".join(known) + "\n", mode=0o600)
        r = self.ctx.target.run(join(self.argv + ["ping"]), sudo=True, check=False, timeout=40)
        if r.stdout.strip() != "pong":
            why = (r.stderr.strip().splitlines() or [r.stdout.strip() or f"exit {r.exited}"])[-1]
            raise DirectUnavailable(f"{self.ctx.host.name} cannot reach {self.src.name} at "
                                    f"{self.addr}:{self.port} over SSH ({why[-200:]})")

    def keys(self, action: str, req: dict) -> tuple[int, str, str]:
        """remote/rig_keys.py on the source, as its login user (no sudo: its own authorized_keys)."""
        ctx = self.src.ctx()
        try:
            return run_input(ctx.target, remote.command("rig_keys.py", action),
                             json.dumps(req) + "\n", timeout=60)
        except ConnectError as e:
            raise self.src.lost(e) from None

    def close(self) -> None:
        if self.added:
            try:
                self.keys("remove", {"tag": self.tag})
            except SourceUnavailable as e:
                self.ctx.warn(f"transfer: could not remove the copy key {self.tag} on {self.src.name} "
                              f"({e}); sshd refuses it after its expiry-time anyway")
        self.ctx.target.run(f"rm -rf {quote(self.dir)}", sudo=True, check=False)


def _direct(ctx: Context, src: SourceRig, items: Sequence[Item], offsets: dict[str, int],
            progress: Callable[[dict], None]) -> dict[str, Result]:
    helper = install_helper(ctx, "rig_copy.py")
    key = DirectKey(ctx, src)
    try:
        key.open(items)
        ask = {"items": [{"id": it.id, "offset": int(offsets.get(it.id, 0))} for it in items]}
        token = base64.urlsafe_b64encode(json.dumps(ask, separators=(",", ":")).encode()).decode()
        cfg = receiver_config(items)
        cfg["via"] = key.argv + [f"send {token}"]
        events: list[dict] = []

        def feed(ln: str) -> None:
            if ln.startswith("{"):
                try:
                    ev = json.loads(ln)
                except ValueError:
                    return
                events.append(ev)
                progress(ev)

        rc, _out, _err = run_input(ctx.target, f"python3 {quote(helper)} recv", json.dumps(cfg) + "\n",
                                   sudo=True, on_line=feed)
        via = next((e.get("error") for e in events if e.get("event") == "via_error"), "")
        why = f"the copy over ssh from {src.name} ended early (exit {rc})" + (f": {via}" if via else "")
        return results_from(events, items, why)
    finally:
        key.close()
