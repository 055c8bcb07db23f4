"""PNG charts of a bench sweep: prefill and decode vs context, power, efficiency.

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


def tune_chart(path: str | Path, rows: Sequence[dict[str, Any]], title: str = "") -> Path:
    """Bar chart of tune's prefill t/s per flag set."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    try:
        labels = [r["label"] for r in rows]
        vals = [r["prefill_ts"] for r in rows]
        ax.bar(range(len(vals)), vals)
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("prefill t/s")
        ax.set_title(title or "tune: prefill by batch flags")
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)
