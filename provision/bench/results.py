"""Results of a bench sweep: one `BenchPoint` per depth (speeds, TTFT, power, tokens/kWh), the
seed's baseline and the comparison with it, the table, and the files written on the control
machine (results.json, results.csv, PNG charts).

Power per point: GPU power summed over the sampled GPUs, averaged over the samples taken while the
*generation* runs of that point were going (the seed's "Power" column feeds its decode tokens/kWh);
the prefill power and the whole-point mean are kept too. A phase shorter than one sampling
interval has no sample of its own: then the mean over the whole point is used (`power_source`).
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UsageError
from ..templates import shipped_dir
from .parse import BenchRow, PowerSample, phases

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_BASELINE = shipped_dir("baselines") / "seed-6x3090-350w.json"  # checkout or wheel


# ---------------------------------------------------------------------------------------------
# energy

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


def fmt(x: float | None, spec: str) -> str:
    """A number for a table cell, `-` when there is none."""
    return "-" if x is None else format(x, spec)


def table_rows(points: Sequence[BenchPoint]) -> list[list[str]]:
    return [[ctx_label(p.depth), fmt(p.prefill_ts, ",.1f"), fmt(p.decode_ts, ",.1f"),
             (fmt(p.ttft_ms, ",.0f") + f" ({p.ttft_kind})") if p.ttft_ms is not None else "-",
             fmt(p.power_w, ",.0f"), fmt(p.decode_tokens_per_kwh, ",.0f")] for p in points]


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
        from .. import charts as _charts
        files.update(_charts.write_all(out, points, baseline, title=meta.get("title", "")))
    return files


