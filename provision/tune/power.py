"""`invoke tune --power`: decode (and prefill) speed, power drawn and decode tokens/kWh at a sweep of
GPU power limits; the knee, the most efficient limit, and -- only beyond the noise -- a limit to
write into the inventory.

Every point is one power limit on every swept GPU (default: from the GPUs' minimum to their
default limit in DEFAULT_POWER_POINTS steps; `--watts 250,275,300,350` to choose), measured as
llama-bench at the service's flags (`-p 512 -n 256 -d 4096 -r 2` by default) with nvidia-smi sampled
beside it; the limits found before the sweep are a point too (the reference) and are ALWAYS put
back afterwards (bench/guard.py: also after a failure or Ctrl-C).

* decode tokens/kWh of a run = its decode t/s × 3600 / (decode W / 1000), W = the swept GPUs'
  summed draw during the generation runs (the seed's column);
* the knee = the lowest limit whose median decode t/s keeps >= `keep` (default 95 %) of the best
  median decode t/s of the sweep -- what energy tuning is after: most of the speed for less power;
* the most efficient limit = the one with the highest median tokens/kWh (often well below the
  knee, at a large cost in speed: reported, never applied).

`--apply` writes `gpus.power_limit: <knee>` into the host's own entry when the knee differs from
the limits found and beats them by the rule (significance.py) on what made the found limits lose:
tokens/kWh when the knee is lower, decode t/s when it is higher. The boot unit of the gpu step
then uses it (`invoke provision --only gpu` or `invoke gpu.power` sets it now).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..bench.flags import bench_argv
from ..bench.guard import RigGuard
from ..bench.results import apply_power, points_from
from ..bench.sweep import charts_available
from ..errors import StepError
from ..facts.gpu import Gpu
from ..steps.gpu import _w
from .options import DEFAULT_POWER_POINTS, TuneOptions
from .session import Session, open_session
from .significance import NO_GAIN, RULE, Comparison, Runs, compare, rounds

METRICS = ("decode_ts", "prefill_ts", "power_w", "prefill_power_w", "tokens_per_kwh")


@dataclass
class Measure:
    """The runs of one point: one value per llama-bench run for each metric."""

    decode_ts: list[float] = field(default_factory=list)
    prefill_ts: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    prefill_power_w: list[float] = field(default_factory=list)
    tokens_per_kwh: list[float] = field(default_factory=list)

    def runs(self, metric: str) -> Runs:
        return Runs.of(getattr(self, metric))

    def as_dict(self) -> dict[str, Any]:
        return {m: self.runs(m).as_dict() for m in METRICS}


@dataclass
class PowerPoint:
    limits: dict[int, float]  # GPU index -> W
    found: bool = False  # the limits found before the sweep (the reference)
    sweep: Measure = field(default_factory=Measure)
    confirm: Measure = field(default_factory=Measure)
    errors: list[str] = field(default_factory=list)

    @property
    def watts(self) -> float | None:
        """The per-GPU limit when every GPU has the same (the x of the curve)."""
        vals = set(self.limits.values())
        return next(iter(vals)) if len(vals) == 1 else None

    @property
    def order(self) -> float:
        return sum(self.limits.values()) / len(self.limits)

    @property
    def label(self) -> str:
        w = self.watts
        return (f"{_w(w)} W" if w is not None else
                "found " + ",".join(_w(self.limits[i]) for i in sorted(self.limits)) + " W")

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "watts": self.watts, "limits": self.limits, "found": self.found,
                **self.sweep.as_dict(), "confirm": self.confirm.as_dict() if self.confirm.decode_ts else None,
                "errors": self.errors}


# ---------------------------------------------------------------------------------------------
# pure parts

def default_watts(gpus: Sequence[Gpu], points: int = DEFAULT_POWER_POINTS) -> list[float]:
    """From the highest minimum to the lowest default limit of the GPUs, `points` values rounded
    to 5 W (ends exact)."""
    lo = max(g.power_min for g in gpus)
    hi = min((g.power_default or g.power_max) for g in gpus)
    if hi <= lo:
        return [float(hi)]
    step = (hi - lo) / (points - 1)
    out = [float(lo)] + [float(round((lo + k * step) / 5) * 5) for k in range(1, points - 1)] + [float(hi)]
    return sorted({w for w in out if lo <= w <= hi})


def check_watts(watts: Sequence[float], gpus: Sequence[Gpu]) -> None:
    """Every limit inside every swept GPU's range, checked before anything is set."""
    bad = [f"GPU {g.index} ({g.name}) reports no power limit range (power management not supported)"
           for g in gpus if not g.power_settable]
    for g in gpus:
        if g.power_settable:
            out = [w for w in watts if w < g.power_min - 1e-6 or w > g.power_max + 1e-6]
            if out:
                bad.append(f"{', '.join(_w(w) for w in out)} W outside GPU {g.index}'s range "
                           f"{_w(g.power_min)}–{_w(g.power_max)} W")
    if bad:
        raise StepError("tune --power: " + "; ".join(bad) + " — nothing was changed")


def power_points(watts: Sequence[float], found: dict[int, float]) -> list[PowerPoint]:
    """One point per limit (every swept GPU at it) plus the limits found, lowest first."""
    ids = sorted(found)
    pts = [PowerPoint({i: float(w) for i in ids}) for w in watts]
    same = [p for p in pts if all(abs(p.limits[i] - found[i]) <= 0.5 for i in ids)]
    if same:
        same[0].found = True
    else:
        pts.append(PowerPoint({i: float(found[i]) for i in ids}, found=True))
    return sorted(pts, key=lambda p: p.order)


def knee(points: Sequence[tuple[float, Runs]], keep: float) -> float | None:
    """The lowest limit whose median decode t/s is >= keep × the best median (None: no data)."""
    meds = [(w, r.median) for w, r in points if r]
    if not meds:
        return None
    best = max(m for _, m in meds)
    return min(w for w, m in meds if m >= keep * best)


def most_efficient(points: Sequence[tuple[float, Runs]]) -> float | None:
    """The limit with the highest median decode tokens/kWh."""
    meds = [(w, r.median) for w, r in points if r]
    return max(meds, key=lambda x: x[1])[0] if meds else None


def judge(knee_pt: PowerPoint, found_pt: PowerPoint, measure: str = "sweep") -> Comparison:
    """The knee against the limits found, on what made the found limits lose: tokens/kWh when the
    knee is lower (same speed for less energy), decode t/s when it is higher (found too slow)."""
    a, b = getattr(knee_pt, measure), getattr(found_pt, measure)
    if knee_pt.order < found_pt.order:
        return compare(a.runs("tokens_per_kwh"), b.runs("tokens_per_kwh"), what="tokens/kWh", spec=",.0f",
                       ref_name="the limits found")
    return compare(a.runs("decode_ts"), b.runs("decode_ts"), what="decode t/s", ref_name="the limits found")


# ---------------------------------------------------------------------------------------------
# on the rig

def measure(s: Session, guard: RigGuard, pts: Sequence[PowerPoint], reps: int, confirm: bool = False) -> None:
    o = s.opts
    depth = o.power_depth
    argv = bench_argv(s.binary, s.model, s.flags, depths=[depth], n_prompt=o.n_prompt, n_gen=o.n_gen,
                      reps=o.bench_reps)
    for r, p in rounds(pts, reps):
        guard.set_power(p.limits)
        try:
            pr = s.runner.run(argv)
        except StepError as e:
            p.errors.append(str(e))
            s.say(f"{'confirmation ' if confirm else ''}run {r + 1}/{reps} at {p.label}: FAILED ({e})")
            continue
        pt = points_from(pr.rows, [depth])[depth]
        apply_power(pt, pr.samples, pr.events)
        pt.finish(o.n_prompt)
        m = p.confirm if confirm else p.sweep
        for metric, v in (("decode_ts", pt.decode_ts), ("prefill_ts", pt.prefill_ts), ("power_w", pt.power_w),
                          ("prefill_power_w", pt.power_prefill_w),
                          ("tokens_per_kwh", pt.decode_tokens_per_kwh)):
            if v is not None:
                getattr(m, metric).append(v)
        s.say(f"{'confirmation ' if confirm else ''}run {r + 1}/{reps} at {p.label}: decode "
              f"{_num(pt.decode_ts, ',.1f')} t/s at {_num(pt.power_w, ',.0f')} W = "
              f"{_num(pt.decode_tokens_per_kwh, ',.0f')} tokens/kWh; prefill {_num(pt.prefill_ts, ',.1f')} t/s")


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run_power_tune(ctx, opts: TuneOptions) -> dict[str, Any]:
    s = open_session(ctx, opts, sample_power=True)
    if not s.gf.available or not s.gf.gpus:
        raise StepError(f"tune --power: no GPU answers ({s.gf.reason or 'nvidia-smi lists none'})")
    gpus = [g for g in s.gf.gpus if opts.gpu_ids is None or g.index in opts.gpu_ids]
    if not gpus:
        raise StepError(f"tune --power: none of GPU {opts.gpu_ids} is on this host")
    check_watts(opts.watts or [], gpus)
    unknown = [str(g.index) for g in gpus if g.power_limit is None]
    if unknown:
        raise StepError(f"tune --power: GPU {','.join(unknown)} reports no current power limit: "
                        "nothing to restore afterwards, so nothing is changed")
    watts = opts.watts or default_watts(gpus)
    found = {g.index: float(g.power_limit) for g in gpus}
    pts = power_points(watts, found)
    found_pt = next(p for p in pts if p.found)
    s.say(f"power sweep on GPU {','.join(str(g.index) for g in gpus)}: {', '.join(p.label for p in pts)} "
          f"(found: {found_pt.label}); llama-bench -p {opts.n_prompt} -n {opts.n_gen} -d {opts.power_depth} "
          f"-r {opts.bench_reps} at the service's flags, {opts.reps} run(s) of every limit")
    s.say("the limits found are restored afterwards, whatever happens")
    winner = None
    with RigGuard(ctx, "tune") as guard, s.runner.interruptible():
        if s.stop:
            guard.stop_service(s.why)
        measure(s, guard, pts, opts.reps)
        curve = [(p.watts, p) for p in pts if p.watts is not None]
        k_w = knee([(w, p.sweep.runs("decode_ts")) for w, p in curve], opts.keep)
        e_w = most_efficient([(w, p.sweep.runs("tokens_per_kwh")) for w, p in curve])
        knee_pt = next((p for w, p in curve if w == k_w), None)
        verdict = confirmation = None
        if knee_pt is not None and knee_pt is not found_pt:
            verdict = judge(knee_pt, found_pt)
            if verdict.better:
                s.say(f"knee {knee_pt.label} beats the limits found ({verdict.why}); confirming it: "
                      f"{opts.reps} more run(s) each")
                measure(s, guard, [found_pt, knee_pt], opts.reps, confirm=True)
                confirmation = judge(knee_pt, found_pt, "confirm")
                winner = knee_pt if confirmation.better else None
    return report(s, pts, found_pt, knee_pt, e_w, verdict, confirmation, winner)


# ---------------------------------------------------------------------------------------------
# the report

def report(s: Session, pts: list[PowerPoint], found_pt: PowerPoint, knee_pt: PowerPoint | None,
           e_w: float | None, verdict: Comparison | None, confirmation: Comparison | None,
           winner: PowerPoint | None) -> dict[str, Any]:
    o = s.opts
    best_decode = max((p.sweep.runs("decode_ts").median or 0 for p in pts), default=0) or None
    f_tpk = found_pt.sweep.runs("tokens_per_kwh").median
    f_dec = found_pt.sweep.runs("decode_ts").median
    rows = []
    for p in pts:
        d, t = p.sweep.runs("decode_ts"), p.sweep.runs("tokens_per_kwh")
        marks = (["found"] if p.found else []) + (["knee"] if p is knee_pt else []) \
            + (["most tokens/kWh"] if p.watts is not None and p.watts == e_w else [])
        rows.append([p.label, str(d.n), d.text(), p.sweep.runs("prefill_ts").text(),
                     _num(p.sweep.runs("power_w").median, ",.0f"), t.text(",.0f"),
                     (f"{d.median / best_decode:.1%}" if d and best_decode else "-"),
                     (f"{t.median / f_tpk:.3f}×" if t and f_tpk else "-"),
                     ", ".join(marks) + (f" FAILED: {p.errors[-1]}" if p.errors and not d else "")])
    s.ctx.console.table(
        f"tune --power: {s.name}, decode tg{o.n_gen} / prefill pp{o.n_prompt} at depth {o.power_depth}, "
        f"{o.reps} run(s) per limit", ["limit", "runs", "decode t/s median (min–max)", "prefill t/s",
                                        "power W", "decode tokens/kWh", "of best decode", "vs found", ""],
        rows)
    summary: dict[str, Any] = {}
    if knee_pt is not None:
        kd = knee_pt.sweep.runs("decode_ts").median
        kt = knee_pt.sweep.runs("tokens_per_kwh").median
        summary["knee"] = {"label": knee_pt.label, "watts": knee_pt.watts,
                           "decode_share_of_best": kd / best_decode if kd and best_decode else None,
                           "decode_vs_found": kd / f_dec if kd and f_dec else None,
                           "tokens_per_kwh_vs_found": kt / f_tpk if kt and f_tpk else None}
        s.say(f"knee (lowest limit keeping >= {o.keep:.0%} of the best decode t/s): {knee_pt.label}, "
              + (f"{kd / best_decode:.1%} of the best decode t/s ({kd / best_decode - 1:+.1%})" if kd and best_decode else "")
              + (f", {kt / f_tpk:.3f}× the tokens/kWh of the limits found ({found_pt.label})" if kt and f_tpk else ""))
    if e_w is not None:
        ep = next(p for p in pts if p.watts == e_w)
        ed = ep.sweep.runs("decode_ts").median
        summary["most_efficient"] = {"label": ep.label, "watts": e_w,
                                     "decode_share_of_best": ed / best_decode if ed and best_decode else None}
        s.say(f"most decode tokens/kWh: {ep.label} ({_num(ep.sweep.runs('tokens_per_kwh').median, ',.0f')} "
              f"tokens/kWh" + (f", {ed / best_decode:.1%} of the best decode t/s)" if ed and best_decode else ")"))
    if knee_pt is None:
        s.say("no limit produced a decode result")
    elif knee_pt is found_pt:
        s.say(f"the limits found ({found_pt.label}) are the knee already: {NO_GAIN}")
    elif winner is not None:
        s.say(f"winner {winner.label} ({confirmation.why} on the confirmation runs)")
    else:
        why = (f"it did not hold up on the confirmation runs: {confirmation.why}" if confirmation else
               f"knee {knee_pt.label} vs found {found_pt.label}: {verdict.why}" if verdict else "")
        s.say(f"{NO_GAIN} ({why})")
    out_dir = s.out_dir()
    doc = {**s.header("llama-rig tune --power"),
           "what": (f"llama-bench -p {o.n_prompt} -n {o.n_gen} -d {o.power_depth} -r {o.bench_reps} per run, "
                    f"{o.reps} runs per power limit in interleaved rounds; power = sum of the swept GPUs' "
                    "draw during the generation runs; tokens/kWh = decode t/s * 3600 / (W / 1000)"),
           "rule": RULE, "keep": o.keep, "found": found_pt.limits,
           "points": [p.as_dict() for p in pts], **summary,
           "verdict": ({"knee_vs_found": verdict.why if verdict else None,
                        "confirmation": confirmation.why if confirmation else None}),
           "winner": winner.label if winner else NO_GAIN, "applied": None}
    result = {"dir": str(out_dir), "points": pts, "found": found_pt, "knee": knee_pt,
              "most_efficient": e_w, "winner": winner, "applied": None}
    if o.apply:
        if winner is None:
            s.say(f"--apply: nothing written ({NO_GAIN})")
        else:
            result["applied"] = doc["applied"] = s.apply(
                "gpus", {"power_limit": winner.watts},
                f"the boot unit uses it after `invoke provision --host {s.name} --only gpu` "
                f"(or `invoke gpu.power --host {s.name}`), which also sets it now")
    s.write_json(out_dir, "tune-power.json", doc)
    if o.charts and charts_available(s.ctx):
        from ..charts import power_chart
        power_chart(out_dir / "tune-power.png", [p.as_dict() for p in pts if p.watts is not None],
                    f"tune --power {s.name}: median and range of {o.reps} runs per limit",
                    knee=knee_pt.watts if knee_pt else None, efficient=e_w, found=found_pt.watts)
    s.say(f"results in {out_dir}/")
    if knee_pt is None:
        raise StepError("tune --power: no power limit produced a result")
    return result
