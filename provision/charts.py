"""PNG charts: a bench sweep (prefill and decode vs context, power, efficiency), tune's flag sets
and tune --power's curve (t/s and tokens/kWh vs the power limit).

matplotlib (the `bench` extra) is imported lazily with the Agg backend, so the rest of the tool
works without it and nothing needs a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

CHARTS = {
    "prefill": ("prefill_ts", "Prefill (t/s)", "Prefill speed vs context"),
    "decode": ("decode_ts", "Decode (t/s)", "Decode speed vs context"),
    "power": ("power_w", "GPU power (W, sum of GPUs)", "Power vs context"),
    "efficiency": ("decode_tokens_per_kwh", "Decode tokens/kWh", "Decode efficiency vs context"),
}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _series(points: Sequence[Any], attr: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for p in points:
        v = getattr(p, attr, None)
        if v is not None:
            xs.append(p.depth)
            ys.append(v)
    return xs, ys


def _label(depth: float, _pos=None) -> str:
    d = int(depth)
    return f"{d // 1024}K" if d and d % 1024 == 0 else (f"{d / 1000:g}K" if d >= 1000 else str(d))


def chart(path: str | Path, points: Sequence[Any], attr: str, ylabel: str, title: str,
          baseline: Any | None = None, extra: Sequence[tuple[str, str]] = ()) -> Path:
    """One line chart of `attr` over depth (ours, and the baseline's if it has that column)."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        xs, ys = _series(points, attr)
        ax.plot(xs, ys, marker="o", label="this run")
        for a, lab in extra:
            ex, ey = _series(points, a)
            if ey:
                ax.plot(ex, ey, marker="s", linestyle="--", label=lab)
        if baseline is not None:
            bx, by = _series(baseline.points, attr)
            if by:
                ax.plot(bx, by, marker="^", linestyle=":", label=f"baseline: {baseline.name}")
        ax.set_xlabel("context (tokens already in the KV cache)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.xaxis.set_major_formatter(FuncFormatter(_label))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def write_all(out_dir: str | Path, points: Sequence[Any], baseline: Any | None = None,
              title: str = "") -> dict[str, Path]:
    out = Path(out_dir)
    files: dict[str, Path] = {}
    for name, (attr, ylabel, ttl) in CHARTS.items():
        extra: Sequence[tuple[str, str]] = ()
        if name == "power":
            extra = (("power_prefill_w", "prefill power"),)
        files[f"chart_{name}"] = chart(out / f"{name}.png", points, attr, ylabel,
                                       f"{ttl} — {title}" if title else ttl, baseline, extra)
    return files


def _range_errors(rows: Sequence[dict[str, Any]], key: str = "median") -> tuple[list[float], list[list[float]]]:
    """Medians and matplotlib's asymmetric error bars (median - min, max - median)."""
    vals = [r[key] for r in rows]
    lo = [max(0.0, r[key] - r["min"]) if r.get("min") is not None else 0.0 for r in rows]
    hi = [max(0.0, r["max"] - r[key]) if r.get("max") is not None else 0.0 for r in rows]
    return vals, [lo, hi]


def tune_chart(path: str | Path, rows: Sequence[dict[str, Any]], title: str = "",
               current: str | None = None, winner: str | None = None) -> Path:
    """Bar chart of tune's prefill t/s per flag set: the median of the runs, the range (worst to
    best run) as an error bar; the current flags grey, the winner (if any) green."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=100)
    try:
        labels = [r["label"] for r in rows]
        vals, err = _range_errors(rows)
        colors = ["#888888" if lab == current else "#2ca02c" if lab == winner else "#1f77b4"
                  for lab in labels]
        ax.bar(range(len(vals)), vals, color=colors, yerr=err, capsize=3, ecolor="black")
        if current in labels:
            ax.axhline(vals[labels.index(current)], color="#888888", linestyle=":", linewidth=1,
                       label="current flags (median)")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("prefill t/s (median, bar = worst..best run)")
        ax.set_title(title or "tune: prefill by batch flags")
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def power_chart(path: str | Path, rows: Sequence[dict[str, Any]], title: str = "",
                knee: float | None = None, efficient: float | None = None,
                found: float | None = None) -> Path:
    """tune --power: decode t/s and decode tokens/kWh against the power limit (top), prefill t/s
    and the power actually drawn (bottom); medians with worst..best run as error bars, the knee,
    the most efficient limit and the limit found marked."""
    plt = _plt()
    rows = sorted(rows, key=lambda r: r["watts"])
    xs = [r["watts"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), dpi=100, sharex=True)
    try:
        def series(ax, metric, label, color, marker):
            ok = [r for r in rows if r[metric]["median"] is not None]
            vals, err = _range_errors([r[metric] for r in ok])
            return ax.errorbar([r["watts"] for r in ok], vals, yerr=err, marker=marker, color=color,
                               capsize=3, label=label)
        h1 = series(top, "decode_ts", "decode t/s", "#1f77b4", "o")
        top.set_ylabel("decode t/s")
        right = top.twinx()
        h2 = series(right, "tokens_per_kwh", "decode tokens/kWh", "#2ca02c", "s")
        right.set_ylabel("decode tokens/kWh")
        handles = [h1, h2]
        for w, lab, style in ((knee, "knee", "--"), (efficient, "most tokens/kWh", ":"),
                              (found, "limit found", "-.")):
            if w is not None:
                handles.append(top.axvline(w, color="#555555", linestyle=style, linewidth=1,
                                           label=f"{lab}: {w:g} W"))
        top.legend(handles=handles, loc="best", fontsize=8)
        top.set_title(title or "tune --power")
        top.grid(True, alpha=0.3)
        h3 = series(bottom, "prefill_ts", "prefill t/s", "#9467bd", "o")
        bottom.set_ylabel("prefill t/s")
        right2 = bottom.twinx()
        h4 = series(right2, "power_w", "power drawn (W, sum of GPUs, decode)", "#d62728", "^")
        right2.set_ylabel("power drawn (W)")
        bottom.legend(handles=[h3, h4], loc="best", fontsize=8)
        bottom.set_xlabel("power limit per GPU (W)")
        bottom.set_xticks(xs, [f"{x:g}" for x in xs])
        bottom.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)
