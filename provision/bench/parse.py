"""Parsers of what a bench run prints on the rig (pure functions, tested with recorded output):
llama-bench `-o json`/`jsonl`, its `--progress` lines (they mark the phases a power sample falls
into), the power sampler's nvidia-smi lines, the sectioned output of one point (`run.point_script`)
and the split modes a tree's `--help` lists.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .. import sections
from ..errors import StepError


# ---------------------------------------------------------------------------------------------
# llama-bench rows

@dataclass
class BenchRow:
    n_prompt: int
    n_gen: int
    n_depth: int
    avg_ts: float
    stddev_ts: float
    n_batch: int | None = None
    n_ubatch: int | None = None
    tensor_split: str | None = None
    flash_attn: Any = None
    type_k: str | None = None
    type_v: str | None = None
    n_gpu_layers: int | None = None
    split_mode: str | None = None
    build_number: int | None = None
    build_commit: str | None = None
    model_type: str | None = None
    backends: str | None = None
    gpu_info: str | None = None
    samples_ts: list[float] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.n_prompt and not self.n_gen:
            return "pp"
        if self.n_gen and not self.n_prompt:
            return "tg"
        return "pg"


def parse_bench_output(text: str) -> list[BenchRow]:
    """llama-bench `-o json` (one array) or `-o jsonl` (one object a line)."""
    text = text.strip()
    if not text:
        return []
    objs: list[dict[str, Any]]
    if text.startswith("["):
        objs = json.loads(text)
    else:
        objs = [json.loads(ln) for ln in (x.strip() for x in text.splitlines()) if ln.startswith("{")]
    rows = []
    for o in objs:
        def g(k, conv=None):
            v = o.get(k)
            return conv(v) if (conv and v is not None) else v
        rows.append(BenchRow(
            n_prompt=int(o["n_prompt"]), n_gen=int(o["n_gen"]), n_depth=int(o.get("n_depth", 0)),
            avg_ts=float(o["avg_ts"]), stddev_ts=float(o.get("stddev_ts", 0.0)),
            n_batch=g("n_batch", int), n_ubatch=g("n_ubatch", int), tensor_split=g("tensor_split"),
            flash_attn=g("flash_attn"), type_k=g("type_k"), type_v=g("type_v"),
            n_gpu_layers=g("n_gpu_layers", int), split_mode=g("split_mode"),
            build_number=g("build_number", int), build_commit=g("build_commit"),
            model_type=g("model_type"), backends=g("backends"), gpu_info=g("gpu_info"),
            samples_ts=[float(x) for x in o.get("samples_ts", [])]))
    return rows


# ---------------------------------------------------------------------------------------------
# power samples

def parse_power_csv(text: str) -> dict[int, float | None]:
    """`nvidia-smi --query-gpu=index,power.draw --format=csv,noheader,nounits` -> {index: W}.
    `[N/A]`/`[Not Supported]` -> None; a header line or a stray warning line is skipped."""
    out: dict[int, float | None] = {}
    for ln in text.splitlines():
        parts = [p.strip() for p in ln.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        v = parts[1].split()[0] if parts[1] else ""
        try:
            w = float(v)
            out[int(parts[0])] = w if math.isfinite(w) else None
        except ValueError:
            out[int(parts[0])] = None
    return out


@dataclass(frozen=True)
class PowerSample:
    t: float  # seconds (rig clock)
    watts: float  # summed over the GPUs that reported a number
    gpus: int  # how many GPUs reported


def parse_power_log(text: str) -> list[PowerSample]:
    """Lines `P <unix time> <index>, <W>` (the rig-side sampler) -> one sample per timestamp."""
    by_t: dict[float, dict[int, float | None]] = {}
    order: list[float] = []
    for ln in text.splitlines():
        if not ln.startswith("P "):
            continue
        try:
            _, t, rest = ln.split(" ", 2)
            tt = float(t)
        except ValueError:
            continue
        vals = parse_power_csv(rest)
        if not vals:
            continue
        if tt not in by_t:
            by_t[tt] = {}
            order.append(tt)
        by_t[tt].update(vals)
    out = []
    for tt in order:
        ws = [w for w in by_t[tt].values() if w is not None]
        if ws:
            out.append(PowerSample(tt, sum(ws), len(ws)))
    return out


# ---------------------------------------------------------------------------------------------
# phases (llama-bench --progress lines, time-stamped on the rig)

PHASE_RE = re.compile(r"llama-bench: benchmark (\d+)/(\d+): (warmup prompt|warmup generation|depth|prompt|generation) run")


@dataclass(frozen=True)
class Phase:
    kind: str  # "prompt", "generation", "depth", "warmup prompt", "warmup generation"
    bench: int  # llama-bench's test number (1-based)
    t0: float
    t1: float


def parse_events(text: str) -> list[tuple[float, str]]:
    out = []
    for ln in text.splitlines():
        if not ln.startswith("E "):
            continue
        parts = ln.split(" ", 2)
        try:
            out.append((float(parts[1]), parts[2] if len(parts) > 2 else ""))
        except ValueError:
            continue
    return out


def phases(events: list[tuple[float, str]]) -> list[Phase]:
    """A `--progress` line opens a phase; the next stderr line of any kind closes it."""
    out: list[Phase] = []
    open_: tuple[str, int, float] | None = None
    for t, line in events:
        if open_ is not None:
            out.append(Phase(open_[0], open_[1], open_[2], t))
            open_ = None
        m = PHASE_RE.search(line)
        if m:
            open_ = (m.group(3), int(m.group(1)), t)
    return out


# ---------------------------------------------------------------------------------------------
# one point as the rig prints it (run.point_script)

POINT_SECTIONS = ("out", "events", "power", "rc")


def split_sections(text: str) -> dict[str, str]:
    return {k: "\n".join(v) for k, v in sections.split(text, POINT_SECTIONS).items()}


@dataclass
class PointRun:
    rows: list[BenchRow]
    events: list[tuple[float, str]]
    samples: list[PowerSample]
    rc: int
    stderr_tail: str


def parse_point_output(text: str) -> PointRun:
    s = split_sections(text)
    events = parse_events(s.get("events", ""))
    rc_txt = s.get("rc", "255").strip().splitlines()
    rc = int(rc_txt[0]) if rc_txt and rc_txt[0].strip().lstrip("-").isdigit() else 255
    tail = [ln for _, ln in events if not ln.startswith("@@") and not PHASE_RE.search(ln)]
    try:
        rows = parse_bench_output(s.get("out", ""))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise StepError(f"cannot parse llama-bench output: {e}") from None
    return PointRun(rows, events, parse_power_log(s.get("power", "")), rc, "\n".join(tail[-5:]))


# ---------------------------------------------------------------------------------------------
# what a tree's --help says

_SM_BENCH = re.compile(r"--split-mode\s+<([a-z|]+)>")  # llama-bench: -sm, --split-mode <none|layer|row|tensor>
_SM_SERVER = re.compile(r"--split-mode\s+\{([a-z,]+)\}")  # llama-server: -sm, --split-mode {none,layer,row,tensor}


def split_modes_from_help(text: str) -> list[str]:
    """The split modes a llama-bench or llama-server `--help` lists (empty if it lists none)."""
    m = _SM_BENCH.search(text)
    if m:
        return m.group(1).split("|")
    m = _SM_SERVER.search(text)
    return m.group(1).split(",") if m else []
