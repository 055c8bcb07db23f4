"""`invoke bench`: the seed's context sweep (llama-bench) with GPU power, energy, TTFT and charts.

Pure parts (tested as data): the llama-bench argv built from the inventory's `server` section,
the parsers (llama-bench `-o json`/`jsonl`, nvidia-smi power samples, the rig-side event log),
tokens/kWh, the baseline comparison and the result files. The rig-side part runs one llama-bench
per depth inside `setsid` with a power sampler beside it, so every sample falls into a phase
(depth fill, prompt run, generation run) and Ctrl-C on the control machine can always kill it.

Numbers:
* prefill t/s, decode t/s: llama-bench `avg_ts` of `pp<n_prompt> @ d<depth>` and `tg<n_gen> @ d<depth>`.
* power W: GPU power summed over all GPUs, averaged over the samples taken while the *generation*
  runs of that depth were going (the seed's "Power" column feeds its decode tokens/kWh); the
  prefill power and the whole-point mean are kept in JSON/CSV too. A phase shorter than one
  sampling interval has no sample of its own: then the mean over the whole point is used and the
  JSON says so (`power_source`).
* decode tokens/kWh = decode t/s × 3600 / (W / 1000) — the seed's formula (46.3 t/s at 818 W →
  ~203,765; the seed prints 203,854 because it used unrounded t/s: 46.32 t/s reproduces it).
* TTFT: *measured* = llama-server's own `timings.prompt_ms` for a prompt of exactly `depth` token
  ids (n_predict 1, cache_prompt false; depth 0 uses n_prompt tokens) sent on the rig to the
  running service; *derived* = depth / prefill t/s (the same prompt processed at the speed
  llama-bench measured at that depth). Every row says which.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import re
import secrets as _pysecrets
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import RigError, StepError, UsageError
from .target import join, quote

DEFAULT_DEPTHS = (4096, 8192, 16384, 32768, 65536, 131072, 198000)
SEED_BATCH = 2048  # llama.cpp defaults the seed ran with (it never set -b/-ub)
SEED_UBATCH = 512
SERVICE = "llama-server"
POWER_QUERY = "nvidia-smi --query-gpu=index,power.draw --format=csv,noheader,nounits"


def power_query(ids: Sequence[int] | None = None) -> str:
    """The sampler's nvidia-smi query, optionally for some GPUs only (`-i 0,1`)."""
    return POWER_QUERY + (f" -i {','.join(str(int(i)) for i in ids)}" if ids else "")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = REPO_ROOT / "baselines" / "seed-6x3090-350w.json"


# ---------------------------------------------------------------------------------------------
# argv

def fmt_num(x: float) -> str:
    """0.9 -> "0.9", 1.0 -> "1" (how the seed writes its -ts)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:g}"


def ts_arg(tensor_split: Sequence[float] | None) -> str | None:
    """llama-bench's -ts: values joined with '/' (a comma would start a sweep)."""
    if not tensor_split:
        return None
    return "/".join(fmt_num(v) for v in tensor_split)


def fa_arg(flash_attn: str) -> str:
    """llama-server's on/off/auto -> llama-bench's 1/0. `auto` turns FA on wherever it can, and a
    quantized V cache (the seed's q8_0) needs it, so auto benches as 1 (the seed's `-fa 1`)."""
    return "0" if flash_attn == "off" else "1"


@dataclass
class BenchFlags:
    """The llama-bench flags that come from the service's configuration (+ tune's overrides)."""

    n_gpu_layers: int = 999
    split_mode: str = "layer"
    tensor_split: list[float] | None = None
    flash_attn: str = "auto"
    cache_type_k: str = "q8_0"
    cache_type_v: str = "q8_0"
    batch_size: int | None = None
    ubatch_size: int | None = None

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "BenchFlags":
        s = cfg["server"]
        return cls(n_gpu_layers=s["n_gpu_layers"], split_mode=s["split_mode"],
                   tensor_split=list(s["tensor_split"]) if s["tensor_split"] else None,
                   flash_attn=s["flash_attn"], cache_type_k=s["cache_type_k"],
                   cache_type_v=s["cache_type_v"], batch_size=s["batch_size"],
                   ubatch_size=s["ubatch_size"])

    def describe(self) -> str:
        return " ".join(self.argv())

    def argv(self) -> list[str]:
        out = ["-ngl", str(self.n_gpu_layers), "-sm", self.split_mode]
        ts = ts_arg(self.tensor_split)
        if ts:
            out += ["-ts", ts]
        out += ["-fa", fa_arg(self.flash_attn), "-ctk", self.cache_type_k, "-ctv", self.cache_type_v]
        if self.batch_size:
            out += ["-b", str(self.batch_size)]
        if self.ubatch_size:
            out += ["-ub", str(self.ubatch_size)]
        return out


def bench_argv(binary: str, model: str, flags: BenchFlags, *, depths: Sequence[int],
               n_prompt: int = 512, n_gen: int = 128, reps: int = 3,
               output: str = "jsonl", progress: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """`llama-bench -m M -ngl .. -sm .. -ts a/b/c -fa 1 -ctk .. -ctv .. [-b -ub] -p -n -d -r -o`."""
    if not depths:
        raise UsageError("bench: no depths given")
    argv = [binary, "-m", model, *flags.argv(), "-p", str(n_prompt), "-n", str(n_gen),
            "-d", ",".join(str(int(d)) for d in depths), "-r", str(reps), "-o", output]
    if progress:
        argv.append("--progress")
    return argv + list(extra)


def parse_depths(spec: str | Sequence[int] | None) -> list[int]:
    """"4096,8192,16K,198000" -> [4096, 8192, 16384, 198000] (K = 1024)."""
    if spec is None or spec == "":
        return list(DEFAULT_DEPTHS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int] = []
    for it in items:
        s = str(it).strip()
        if not s:
            continue
        m = re.fullmatch(r"(\d+)\s*([kK]?)", s)
        if not m:
            raise UsageError(f"command line: --depths: not a token count: {s!r}")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise UsageError("command line: --depths: empty")
    return out


# ---------------------------------------------------------------------------------------------
# parsing llama-bench output

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
        objs = []
        for ln in text.splitlines():
            ln = ln.strip()
            if ln.startswith("{"):
                objs.append(json.loads(ln))
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
# power samples and phases

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


_PHASE_RE = re.compile(r"llama-bench: benchmark (\d+)/(\d+): (warmup prompt|warmup generation|depth|prompt|generation) run")


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


def phases(events: Sequence[tuple[float, str]]) -> list[Phase]:
    """A `--progress` line opens a phase; the next stderr line of any kind closes it."""
    out: list[Phase] = []
    open_: tuple[str, int, float] | None = None
    for t, line in events:
        if open_ is not None:
            out.append(Phase(open_[0], open_[1], open_[2], t))
            open_ = None
        m = _PHASE_RE.search(line)
        if m:
            open_ = (m.group(3), int(m.group(1)), t)
    return out


def mean_power(samples: Sequence[PowerSample], windows: Iterable[tuple[float, float]]) -> float | None:
    ws = list(windows)
    vals = [s.watts for s in samples if any(a <= s.t <= b for a, b in ws)]
    return statistics.fmean(vals) if vals else None


def tokens_per_kwh(tps: float | None, watts: float | None) -> float | None:
    """tokens/kWh = t/s × 3600 s/h ÷ (W / 1000) — the seed's decode efficiency column."""
    if not tps or not watts or watts <= 0:
        return None
    return tps * 3600.0 / (watts / 1000.0)


# ---------------------------------------------------------------------------------------------
# results

@dataclass
class BenchPoint:
    depth: int
    prefill_ts: float | None = None
    prefill_std: float | None = None
    decode_ts: float | None = None
    decode_std: float | None = None
    ttft_ms: float | None = None
    ttft_kind: str = "derived"  # measured | derived
    ttft_prompt_tokens: int | None = None
    power_w: float | None = None  # decode power (summed GPUs), what tokens/kWh uses
    power_prefill_w: float | None = None
    power_mean_w: float | None = None
    power_samples: int = 0
    power_source: str = "none"  # generation | point | none
    decode_tokens_per_kwh: float | None = None
    prefill_tokens_per_kwh: float | None = None

    def finish(self, n_prompt: int) -> "BenchPoint":
        self.decode_tokens_per_kwh = tokens_per_kwh(self.decode_ts, self.power_w)
        self.prefill_tokens_per_kwh = tokens_per_kwh(self.prefill_ts, self.power_prefill_w or self.power_w)
        if self.ttft_kind == "derived" and self.prefill_ts:
            n = self.depth or n_prompt
            self.ttft_ms = n / self.prefill_ts * 1000.0
            self.ttft_prompt_tokens = n
        return self


def points_from(rows: Sequence[BenchRow], depths: Sequence[int]) -> dict[int, BenchPoint]:
    pts = {d: BenchPoint(d) for d in depths}
    for r in rows:
        p = pts.setdefault(r.n_depth, BenchPoint(r.n_depth))
        if r.kind == "pp":
            p.prefill_ts, p.prefill_std = r.avg_ts, r.stddev_ts
        elif r.kind == "tg":
            p.decode_ts, p.decode_std = r.avg_ts, r.stddev_ts
    return pts


def apply_power(point: BenchPoint, samples: Sequence[PowerSample], events: Sequence[tuple[float, str]]) -> None:
    point.power_samples = len(samples)
    if not samples:
        return
    ph = phases(events)
    t_start = events[0][0] if events else samples[0].t
    t_end = events[-1][0] if events else samples[-1].t
    point.power_mean_w = mean_power(samples, [(t_start, t_end)])
    if point.power_mean_w is None:  # a point faster than the sampling interval: every sample of it
        point.power_mean_w = statistics.fmean(s.watts for s in samples)
    gen = mean_power(samples, [(p.t0, p.t1) for p in ph if p.kind == "generation"])
    pre = mean_power(samples, [(p.t0, p.t1) for p in ph if p.kind in ("prompt", "depth")])
    point.power_w = gen if gen is not None else point.power_mean_w
    point.power_source = "generation" if gen is not None else "point"
    point.power_prefill_w = pre if pre is not None else point.power_mean_w


def r1(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


TABLE_COLUMNS = ["context", "prefill t/s", "decode t/s", "TTFT ms", "power W", "decode tokens/kWh"]


def ctx_label(depth: int) -> str:
    if depth and depth % 1024 == 0:
        return f"{depth // 1024}K"
    if depth >= 1000 and depth % 1000 == 0:
        return f"{depth // 1000}K"
    return str(depth)


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_rows(points: Sequence[BenchPoint]) -> list[list[str]]:
    return [[ctx_label(p.depth), _f(p.prefill_ts, ",.1f"), _f(p.decode_ts, ",.1f"),
             (_f(p.ttft_ms, ",.0f") + f" ({p.ttft_kind})") if p.ttft_ms is not None else "-",
             _f(p.power_w, ",.0f"), _f(p.decode_tokens_per_kwh, ",.0f")] for p in points]


CSV_FIELDS = ["depth", "prefill_ts", "prefill_std", "decode_ts", "decode_std", "ttft_ms", "ttft_kind",
              "ttft_prompt_tokens", "power_w", "power_prefill_w", "power_mean_w", "power_samples",
              "power_source", "decode_tokens_per_kwh", "prefill_tokens_per_kwh"]


def to_csv(points: Sequence[BenchPoint]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for p in points:
        d = asdict(p)
        w.writerow({k: ("" if d[k] is None else (round(d[k], 3) if isinstance(d[k], float) else d[k]))
                    for k in CSV_FIELDS})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# baseline

@dataclass
class Baseline:
    name: str
    points: list[BenchPoint]
    meta: dict[str, Any]


def load_baseline(path: str | Path) -> Baseline:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"baseline {p}: file not found") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"baseline {p}: not JSON ({e.msg}, line {e.lineno})") from None
    pts = []
    for row in data.get("points", []):
        pts.append(BenchPoint(depth=int(row["depth"]), prefill_ts=row.get("prefill_ts"),
                              decode_ts=row.get("decode_ts"), ttft_ms=row.get("ttft_ms"),
                              ttft_kind=row.get("ttft_kind", "measured"), power_w=row.get("power_w"),
                              decode_tokens_per_kwh=row.get("decode_tokens_per_kwh")))
    if not pts:
        raise UsageError(f"baseline {p}: no points")
    return Baseline(data.get("name", p.stem), pts, {k: v for k, v in data.items() if k != "points"})


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def compare(points: Sequence[BenchPoint], baseline: Baseline) -> list[dict[str, Any]]:
    """Per depth that the baseline has too: ratios ours / baseline (>1 = faster / more efficient)."""
    by_depth = {p.depth: p for p in baseline.points}
    out = []
    for p in points:
        b = by_depth.get(p.depth)
        if b is None:
            continue
        out.append({"depth": p.depth,
                    "prefill_ratio": _ratio(p.prefill_ts, b.prefill_ts),
                    "decode_ratio": _ratio(p.decode_ts, b.decode_ts),
                    "ttft_ratio": _ratio(p.ttft_ms, b.ttft_ms),
                    "power_ratio": _ratio(p.power_w, b.power_w),
                    "efficiency_ratio": _ratio(p.decode_tokens_per_kwh, b.decode_tokens_per_kwh)})
    return out


def comparison_rows(cmp: Sequence[dict[str, Any]]) -> list[list[str]]:
    def x(v):
        return "-" if v is None else f"{v:.3f}×"
    return [[ctx_label(c["depth"]), x(c["prefill_ratio"]), x(c["decode_ratio"]), x(c["ttft_ratio"]),
             x(c["power_ratio"]), x(c["efficiency_ratio"])] for c in cmp]


# ---------------------------------------------------------------------------------------------
# writing results

def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def results_dir(root: str | Path, host: str, stamp: str | None = None) -> Path:
    d = Path(root) / host / (stamp or timestamp())
    n = 1
    base = d
    while d.exists():
        n += 1
        d = base.with_name(f"{base.name}-{n}")
    d.mkdir(parents=True)
    return d


def write_results(out_dir: str | Path, meta: dict[str, Any], points: Sequence[BenchPoint],
                  baseline: Baseline | None = None, charts: bool = True) -> dict[str, Path]:
    """results.json, results.csv and (with matplotlib) the PNG charts. Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    cmp = compare(points, baseline) if baseline else []
    doc = {**meta, "points": [asdict(p) for p in points],
           "baseline": ({"name": baseline.name, "comparison": cmp} if baseline else None)}
    (out / "results.json").write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    files["json"] = out / "results.json"
    (out / "results.csv").write_text(to_csv(points))
    files["csv"] = out / "results.csv"
    if charts:
        from . import charts as _charts
        files.update(_charts.write_all(out, points, baseline, title=meta.get("title", "")))
    return files


# ---------------------------------------------------------------------------------------------
# on the rig

def _workdir() -> str:
    return f"/tmp/llama-rig-bench-{_pysecrets.token_hex(6)}"


def point_script(argv: Sequence[str], workdir: str, sample_power: bool, interval: float = 0.2,
                 env: dict[str, str] | None = None, query: str = POWER_QUERY) -> str:
    """Shell run (under `setsid -w`) on the rig for one llama-bench invocation: a power sampler in
    the background, llama-bench's stderr time-stamped line by line (its --progress lines mark the
    phases), then everything printed between markers. `<workdir>/pid` is the process group to
    kill if the control machine goes away (Ctrl-C)."""
    envs = "".join(f"export {k}={quote(v)}; " for k, v in (env or {}).items())
    return f"""set -u
d={quote(workdir)}
mkdir -p "$d" && chmod 700 "$d" || exit 90
echo $$ > "$d/pid"
: > "$d/power"
main=$$
sp=
if [ {1 if sample_power else 0} = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  ( while kill -0 "$main" 2>/dev/null; do
      t=$(date +%s.%N)
      {query} 2>/dev/null | sed "s/^/P $t /"
      sleep {interval:g}
    done ) >> "$d/power" 2>/dev/null &
  sp=$!
fi
stop_sampler() {{ if [ -n "$sp" ]; then kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null; sp=; fi; }}
trap stop_sampler EXIT
trap 'exit 130' HUP INT TERM
echo "E $(date +%s.%N) @@start" > "$d/events"
{{ {{ {envs}{join(argv)}; echo $? > "$d/rc"; }} 2>&1 1>"$d/out" | while IFS= read -r l; do printf 'E %s %s\\n' "$(date +%s.%N)" "$l"; done >> "$d/events"; }}
echo "E $(date +%s.%N) @@end" >> "$d/events"
stop_sampler
echo @@out; cat "$d/out"; echo @@events; cat "$d/events"; echo @@power; cat "$d/power"; echo @@rc; cat "$d/rc" 2>/dev/null || echo 255
rm -rf "$d"
"""


def split_sections(text: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    cur = None
    for ln in text.splitlines():
        if ln in ("@@out", "@@events", "@@power", "@@rc"):
            cur = ln[2:]
            out[cur] = []
        elif cur:
            out[cur].append(ln)
    return {k: "\n".join(v) for k, v in out.items()}


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
    tail = [ln for _, ln in events if not ln.startswith("@@") and not _PHASE_RE.search(ln)]
    try:
        rows = parse_bench_output(s.get("out", ""))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise StepError(f"cannot parse llama-bench output: {e}") from None
    return PointRun(rows, events, parse_power_log(s.get("power", "")), rc, "\n".join(tail[-5:]))


class RigBench:
    """Runs llama-bench invocations on a host (through ctx.target) and kills them if interrupted."""

    def __init__(self, ctx, binary: str, model: str, *, sample_power: bool = True,
                 interval: float = 0.2, timeout: float | None = None,
                 power_ids: Sequence[int] | None = None, env: dict[str, str] | None = None):
        self.ctx = ctx
        self.query = power_query(power_ids)
        self.env = env
        self.binary = binary
        self.model = model
        self.sample_power = sample_power
        self.interval = interval
        self.timeout = timeout
        self._live: set[str] = set()

    def run(self, argv: Sequence[str], allow_partial: bool = False) -> PointRun:
        wd = _workdir()
        self._live.add(wd)
        try:
            script = point_script(argv, wd, self.sample_power, self.interval, self.env, self.query)
            res = self.ctx.target.run(f"setsid -w sh -c {quote(script)}", sudo=True, check=False,
                                      timeout=self.timeout)
            if self.interrupted:
                raise KeyboardInterrupt
            if res.exited == 124:
                raise StepError(f"llama-bench timed out after {self.timeout:g}s")
            pr = parse_point_output(res.stdout)
            if (pr.rc != 0 and not (allow_partial and pr.rows)) or not pr.rows:
                raise StepError(f"llama-bench failed (exit {pr.rc}): "
                                + (pr.stderr_tail.splitlines()[-1:] or [res.stderr.strip()[-200:]])[0])
            self._live.discard(wd)
            return pr
        finally:
            if wd in self._live:
                self.kill(wd)

    def kill(self, wd: str) -> None:
        """Kill the process group of an invocation that is still running (Ctrl-C, timeout)."""
        cmd = (f"d={quote(wd)}; if [ -f \"$d/pid\" ]; then p=$(cat \"$d/pid\"); "
               f"kill -TERM -- -\"$p\" 2>/dev/null; sleep 0.5; kill -KILL -- -\"$p\" 2>/dev/null; fi; "
               f"rm -rf \"$d\"")
        try:
            self.ctx.target.run(cmd, sudo=True, check=False, timeout=30)
        except Exception:  # noqa: BLE001 - best effort while unwinding
            pass
        self._live.discard(wd)

    interrupted = False

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C during a sweep: kill llama-bench on the rig at once (over SSH, Fabric would
        otherwise swallow the first Ctrl-C and wait for the remote command to finish), then raise
        KeyboardInterrupt so the caller's `finally` restores the service."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            first = not self.interrupted
            self.interrupted = True
            if first:
                for wd in list(self._live):
                    threading.Thread(target=self.kill, args=(wd,), daemon=True).start()
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


# ---------------------------------------------------------------------------------------------
# the service: stop for the bench if VRAM needs it, always restore

def service_active(ctx) -> bool:
    r = ctx.target.run(f"systemctl is-active {SERVICE} 2>/dev/null", check=False)
    return r.stdout.strip() == "active"


def service_installed(ctx) -> bool:
    try:
        from .steps.service import unit_installed  # the service step, when it is there
        return bool(unit_installed(ctx))
    except (ImportError, AttributeError):
        r = ctx.target.run(f"systemctl cat {SERVICE} >/dev/null 2>&1", check=False)
        return r.ok


HEALTH_PY = r"""
import sys, time, urllib.request, urllib.error
url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
last = "no answer"
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                print("ok"); sys.exit(0)
            last = "HTTP %d" % r.status
    except urllib.error.HTTPError as e:
        last = "HTTP %d" % e.code
    except Exception as e:
        last = type(e).__name__
    time.sleep(0.25)
print(last); sys.exit(1)
"""


def wait_health(ctx, timeout: float) -> None:
    port = ctx.cfg["server"]["port"]
    r = ctx.target.run(f"python3 - http://127.0.0.1:{port}/health {timeout:g}", stdin=HEALTH_PY,
                       check=False, timeout=timeout + 30)
    if not r.ok:
        raise StepError(f"{SERVICE} is not healthy after {timeout:g}s ({r.stdout.strip() or r.stderr.strip()})")


def start_service(ctx) -> None:
    """Start llama-server again and wait until it answers (/health 200; with the service step
    present also one real completion, through its restart_and_wait)."""
    try:
        from .steps.service import restart_and_wait
    except ImportError:
        restart_and_wait = None
    if restart_and_wait is not None:
        restart_and_wait(ctx)
        return
    ctx.target.run(f"systemctl start {SERVICE}", sudo=True, timeout=ctx.cfg["server"]["start_timeout"] + 60)
    wait_health(ctx, float(ctx.cfg["server"]["start_timeout"]))


def stop_service(ctx) -> None:
    ctx.target.run(f"systemctl stop {SERVICE}", sudo=True, timeout=120)


@contextlib.contextmanager
def _shielded():
    """Hold Ctrl-C back while the service is being restored (re-raised afterwards): a second
    Ctrl-C must not leave the rig without its server."""
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


def restore_service(ctx, who: str) -> None:
    ctx.say(f"{who}: restarting {SERVICE} and waiting until it serves again")
    with _shielded():
        start_service(ctx)
    ctx.say(f"{who}: {SERVICE} is back")


def decide_stop(policy: str, gpus: int, cuda: bool, n_gpu_layers: int, active: bool) -> tuple[bool, str]:
    """policy auto|stop|keep -> (stop?, why). auto stops only when the service holds GPU memory
    the bench needs: it runs, the box has GPUs, the build is CUDA and layers are offloaded."""
    if not active:
        return False, f"{SERVICE} is not running"
    if policy == "stop":
        return True, "--service stop"
    if policy == "keep":
        return False, "--service keep"
    if gpus and cuda and n_gpu_layers > 0:
        return True, f"{gpus} GPU(s): the service's VRAM is needed for the bench"
    return False, ("no GPU memory pressure (CPU build or no GPUs): the service keeps running "
                   "during the bench")


# ---------------------------------------------------------------------------------------------
# TTFT through llama-server

TTFT_PY = r"""
import json, sys, time, urllib.request, urllib.error
a = json.loads(sys.stdin.read())
port, key, n_prompt, depths = a["port"], a.get("key"), a["n_prompt"], a["depths"]
base = "http://127.0.0.1:%d" % port
hdr = {"Content-Type": "application/json"}
if key:
    hdr["Authorization"] = "Bearer " + key
def call(path, body=None, timeout=3600):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=hdr, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())
n_ctx = None
try:
    props = call("/props")
    n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
except Exception:
    pass
try:
    toks = call("/tokenize", {"content": "The quick brown fox jumps over the lazy dog. " * 8})["tokens"]
    toks = [t if isinstance(t, int) else t["id"] for t in toks] or list(range(100, 164))
except Exception:
    toks = list(range(100, 164))
def prompt(n):
    return (toks * (n // len(toks) + 1))[:n]
try:
    call("/completion", {"prompt": prompt(8), "n_predict": 1, "cache_prompt": False})
except Exception:
    pass
for d in depths:
    n = d or n_prompt
    out = {"depth": d, "n_tokens": n}
    if n_ctx and n + 1 > n_ctx:
        out["error"] = "prompt of %d tokens exceeds the server's context of %d" % (n, n_ctx)
    else:
        t0 = time.monotonic()
        try:
            r = call("/completion", {"prompt": prompt(n), "n_predict": 1, "cache_prompt": False,
                                     "temperature": 0})
            t = r.get("timings") or {}
            out.update(prompt_ms=t.get("prompt_ms"), prompt_n=t.get("prompt_n"),
                       wall_ms=(time.monotonic() - t0) * 1000.0)
        except urllib.error.HTTPError as e:
            out["error"] = "HTTP %d" % e.code
        except Exception as e:
            out["error"] = type(e).__name__ + ": " + str(e)[:200]
    print("@@ttft " + json.dumps(out), flush=True)
"""


def parse_ttft(text: str) -> dict[int, dict[str, Any]]:
    out = {}
    for ln in text.splitlines():
        if ln.startswith("@@ttft "):
            d = json.loads(ln[7:])
            out[int(d["depth"])] = d
    return out


def measure_ttft(ctx, depths: Sequence[int], n_prompt: int) -> dict[int, dict[str, Any]]:
    """The API key (server.api_key_file lives on the control machine) travels on stdin only."""
    key = None
    if ctx.cfg["server"]["api_key_file"]:
        from .steps.service import read_api_key  # registers the key as a secret
        key = read_api_key(ctx.cfg)
    args = {"port": ctx.cfg["server"]["port"], "key": key, "n_prompt": n_prompt, "depths": list(depths)}
    r = ctx.target.run("python3 -c " + quote(TTFT_PY), stdin=json.dumps(args), check=False, timeout=7200)
    return parse_ttft(r.stdout)


# ---------------------------------------------------------------------------------------------
# paths on the rig

def default_binary(cfg: dict[str, Any]) -> str:
    return f"{cfg['paths']['prefix']}/llama.cpp/current/bin/llama-bench"


def find_model(ctx) -> str:
    """Shard 1 of the configured model (what `-m` of the service points at)."""
    try:
        from .steps.model import shard1_path  # the model step, when it is there
        p = shard1_path(ctx)
        if p:
            return str(p)
    except (ImportError, AttributeError, RigError, TypeError):
        pass
    mdir = ctx.cfg["model"]["dir"]
    r = ctx.target.run(
        f"find {quote(mdir)} -name '*.gguf' \\( -name '*-00001-of-*' -o ! -name '*-of-*' \\) "
        f"! -name 'mmproj*' 2>/dev/null | sort | head -n 1", sudo=True, check=False)
    path = r.stdout.strip()
    if not path:
        raise StepError(f"no model found under {mdir} (run `invoke provision` first, or pass --model)")
    return path


# ---------------------------------------------------------------------------------------------
# the whole bench on one host

@dataclass
class BenchOptions:
    depths: list[int] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    reps: int = 3
    n_prompt: int = 512
    n_gen: int = 128
    ttft: bool = True
    service: str = "auto"  # auto | stop | keep
    binary: str | None = None
    model: str | None = None
    results_root: str = "results"
    baseline: str | None = str(DEFAULT_BASELINE)  # None/"none" = no comparison
    charts: bool = True
    interval: float = 0.2
    timeout: float | None = None
    power_ids: list[int] | None = None  # sample only these GPUs (default: all)
    on_point: Callable[[BenchPoint], None] | None = None  # hook (tests: interrupt mid-sweep)


def _log(ctx, text: str) -> None:
    ctx.say(f"bench: {text}")


def run_bench(ctx, opts: BenchOptions) -> dict[str, Any]:
    """Sweep the depths on ctx's host; stop/restore the service as needed. Returns the summary."""
    from .facts import host as hostfacts

    cfg = ctx.cfg
    if opts.reps < 1:
        raise UsageError("command line: --reps: must be at least 1")
    flags = BenchFlags.from_cfg(cfg)
    binary = opts.binary or default_binary(cfg)
    if not ctx.target.exists(binary, sudo=True):
        raise StepError(f"{binary} not found (build llama.cpp with the llama-bench target, or pass --binary)")
    model = opts.model or find_model(ctx)
    gf = hostfacts.gpu(ctx)
    n_gpus = len(gf.gpus) if gf.available else 0
    installed = service_installed(ctx)
    active = installed and service_active(ctx)
    stop, why = decide_stop(opts.service, n_gpus, bool(cfg["llama_cpp"]["cuda"]), flags.n_gpu_layers, active)
    _log(ctx, f"{binary} -m {model} {flags.describe()}")
    _log(ctx, f"depths {','.join(map(str, opts.depths))}, pp{opts.n_prompt}/tg{opts.n_gen}, "
              f"{opts.reps} rep(s), power sampling: {'on, ' + str(n_gpus) + ' GPU(s)' if n_gpus else 'off (no GPUs)'}")
    _log(ctx, (f"stopping {SERVICE} for the bench ({why}); it is restarted afterwards, whatever happens"
               if stop else f"{SERVICE} left as it is ({why})"))
    runner = RigBench(ctx, binary, model, sample_power=n_gpus > 0, interval=opts.interval,
                      timeout=opts.timeout, power_ids=opts.power_ids)
    points: list[BenchPoint] = []
    build = {}
    stopped = False
    ttft: dict[int, dict[str, Any]] = {}
    try:
        with runner.interruptible():
            if stop:
                stop_service(ctx)
                stopped = True
            for d in opts.depths:
                argv = bench_argv(binary, model, flags, depths=[d], n_prompt=opts.n_prompt,
                                  n_gen=opts.n_gen, reps=opts.reps)
                t0 = time.monotonic()
                pr = runner.run(argv)
                pt = points_from(pr.rows, [d])[d]
                apply_power(pt, pr.samples, pr.events)
                points.append(pt)
                r0 = pr.rows[0]
                build = {"build_number": r0.build_number, "build_commit": r0.build_commit,
                         "model_type": r0.model_type, "backends": r0.backends, "gpu_info": r0.gpu_info}
                _log(ctx, f"d{d}: pp {_f(pt.prefill_ts, ',.1f')} t/s, tg {_f(pt.decode_ts, ',.1f')} t/s, "
                          f"power {_f(pt.power_w, ',.0f')} W ({time.monotonic() - t0:.1f}s)")
                if opts.on_point:
                    opts.on_point(pt)
    finally:
        if stopped:
            restore_service(ctx, "bench")
    if opts.ttft and installed and service_active(ctx):
        _log(ctx, "TTFT: one request per depth through llama-server (timings.prompt_ms)")
        ttft = measure_ttft(ctx, opts.depths, opts.n_prompt)
    for pt in points:
        m = ttft.get(pt.depth)
        if m and m.get("prompt_ms") is not None:
            pt.ttft_ms, pt.ttft_kind, pt.ttft_prompt_tokens = float(m["prompt_ms"]), "measured", m.get("n_tokens")
        elif m and m.get("error"):
            _log(ctx, f"TTFT at d{pt.depth}: {m['error']} - derived instead")
        pt.finish(opts.n_prompt)
    ttft_note = ("measured: llama-server timings.prompt_ms of a prompt of `depth` tokens"
                 if any(p.ttft_kind == "measured" for p in points) else
                 "derived: depth / prefill t/s" + ("" if opts.ttft else " (--no-ttft)")
                 + ("" if installed else f" ({SERVICE} not installed)"))
    baseline = None
    if opts.baseline and str(opts.baseline).lower() != "none":
        if str(opts.baseline) == str(DEFAULT_BASELINE) and not DEFAULT_BASELINE.exists():
            ctx.warn(f"no baseline comparison: {DEFAULT_BASELINE} is not there (installed without the repo?)")
        else:
            baseline = load_baseline(opts.baseline)
    meta = {
        "kind": "llama-rig bench",
        "host": ctx.host.name,
        "title": f"{ctx.host.name}: {build.get('model_type') or Path(model).name}",
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "binary": binary, "model": model, "argv_flags": flags.argv(),
        "n_prompt": opts.n_prompt, "n_gen": opts.n_gen, "reps": opts.reps, "depths": opts.depths,
        "gpus": [{"index": g.index, "name": g.name, "power_limit": g.power_limit} for g in gf.gpus],
        "power": {"query": power_query(opts.power_ids), "interval_s": opts.interval,
                  "column": "decode power: mean of the GPU sum during llama-bench's generation runs"},
        "ttft": ttft_note,
        "tokens_per_kwh": "t/s * 3600 / (W / 1000)",
        "service": {"installed": installed, "was_active": active, "stopped_for_bench": stopped, "why": why},
        **build,
    }
    out_dir = results_dir(opts.results_root, ctx.host.name)
    charts = opts.charts
    if charts:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ctx.warn("matplotlib is not installed (pip install 'llama-rig[bench]'): no PNG charts")
            charts = False
    files = write_results(out_dir, meta, points, baseline, charts=charts)
    ctx.console.table(f"bench: {ctx.host.name} (TTFT {ttft_note.split(':')[0]})", TABLE_COLUMNS,
                      table_rows(points))
    if baseline:
        cmp = compare(points, baseline)
        if cmp:
            ctx.console.table(f"vs baseline {baseline.name} (ours / theirs)",
                              ["context", "prefill", "decode", "TTFT", "power", "tokens/kWh"],
                              comparison_rows(cmp))
        else:
            _log(ctx, f"no depth in common with baseline {baseline.name}")
    _log(ctx, f"results in {out_dir}/ ({', '.join(sorted(p.name for p in files.values()))})")
    return {"dir": str(out_dir), "points": points, "files": files, "meta": meta}
