"""One progress display for long work on a rig: bytes (downloads, hashing) or steps (a ninja build).

On a terminal: rich bars (bytes: size, rate, ETA; steps: n/N and elapsed), unless another live
display already holds the console (several hosts at once) -- then, like off a terminal, plain
lines: a byte task every `every_s` seconds with rate and ETA, a step task every 10 %.

    with Progress(ctx, "model", unit="bytes") as p:
        p.add("a", "a.gguf", total=10_000_000)
        p.update("a", 5_000_000)          # [rig] model: a.gguf: 5.0 MB / 10.0 MB (50%), 1.0 MB/s, ETA 5s
        p.say("fetched a.gguf ...")       # a line above the bars
"""
from __future__ import annotations

import time
from typing import Any


def human(n: float | int | None) -> str:
    """Bytes in SI units: 999 B, 1.0 kB, 112.4 GB."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def duration(s: float | None) -> str:
    """Seconds as 42s, 3m05s, 2h01m; ? when unknown."""
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class _Task:
    def __init__(self, label: str, total: int | None, now: float, done: int = 0):
        self.label = label
        self.total = total
        self.t0 = now
        self.base = done  # bytes already there when we started watching (rate counts from here)
        self.last = now
        self.last_pct = -1
        self.rich_id: Any = None


class Progress:
    """Tasks keyed by name, each counted in `unit` ("bytes" or "steps")."""

    def __init__(self, ctx: Any, prefix: str, unit: str = "bytes", every_s: float = 5.0,
                 transient: bool = False):
        assert unit in ("bytes", "steps")
        self.ctx = ctx
        self.prefix = prefix
        self.unit = unit
        self.every_s = every_s
        self.transient = transient
        self.tasks: dict[str, _Task] = {}
        self.bar: Any = None

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self.ctx.console.fancy:
            try:
                from rich import progress as rp
                cols = ([rp.BarColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn(), rp.TimeRemainingColumn()]
                        if self.unit == "bytes" else
                        [rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn()])
                self.bar = rp.Progress(rp.TextColumn("[bold]{task.description}"), *cols,
                                       console=self.ctx.console.rich, transient=self.transient)
                self.bar.start()
            except Exception:  # another live display is active (parallel hosts): plain lines
                self.bar = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    # -- output ------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """One line `[host] prefix: text`, above the bars when there are bars."""
        self._say(text)

    def _say(self, text: str) -> None:
        if self.bar is not None:
            from .secrets import redact
            self.bar.console.print(redact(f"[{self.ctx.host.name}] {self.prefix}: {text}"),
                                   markup=False, highlight=False)
        else:
            self.ctx.say(f"{self.prefix}: {text}")

    # -- tasks -------------------------------------------------------------------------------
    def add(self, key: str, label: str, total: int | None = None, done: int = 0) -> None:
        now = time.monotonic()
        t = self.tasks[key] = _Task(label, total, now, done)
        if self.bar is not None:
            from rich.markup import escape
            t.rich_id = self.bar.add_task(escape(label), total=total, completed=done)

    def has(self, key: str) -> bool:
        return key in self.tasks

    def update(self, key: str, done: int, total: int | None = None) -> None:
        t = self.tasks.get(key)
        if t is None:
            self.add(key, key, total, done)
            t = self.tasks[key]
        if total is not None:
            t.total = total
        if self.bar is not None:
            self.bar.update(t.rich_id, completed=done, total=t.total)
            return
        now = time.monotonic()
        if self.unit == "steps":
            pct = done * 100 // max(t.total or 1, 1)
            step = pct // 10 * 10
            if step > t.last_pct:
                t.last_pct = step
                self._say(f"{t.label}: [{done}/{t.total}] {step}%")
            return
        if now - t.last < self.every_s:
            return
        t.last = now
        rate = (done - t.base) / max(now - t.t0, 1e-6)
        eta = (int(t.total) - done) / rate if t.total and rate > 0 else None
        pct = f" ({100 * done / int(t.total):.0f}%)" if t.total else ""
        self._say(f"{t.label}: {human(done)} / {human(t.total)}{pct}, {human(rate)}/s, ETA {duration(eta)}")

    def complete(self, key: str, size: int) -> None:
        t = self.tasks.get(key)
        if t is not None and self.bar is not None:
            self.bar.update(t.rich_id, completed=size, total=size)

    def seconds(self, key: str) -> float:
        t = self.tasks.get(key)
        return time.monotonic() - t.t0 if t else 0.0
