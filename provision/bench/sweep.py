"""`invoke bench`: the seed's context sweep (llama-bench) on one host, with GPU power, energy,
TTFT and charts.

Numbers:
* prefill t/s, decode t/s: llama-bench `avg_ts` of `pp<n_prompt> @ d<depth>` and `tg<n_gen> @ d<depth>`.
* power W: GPU power summed over all GPUs during the generation runs of that depth (results.py).
* decode tokens/kWh = decode t/s × 3600 / (W / 1000) — the seed's formula (46.3 t/s at 818 W →
  ~203,765; the seed prints 203,854 because it used unrounded t/s: 46.32 t/s reproduces it).
* TTFT: *measured* = llama-server's own `timings.prompt_ms` for a prompt of exactly `depth` token
  ids (ttft.py), sent on the rig to the running service; *derived* = depth / prefill t/s (the same
  prompt processed at the speed llama-bench measured at that depth). Every row says which.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import StepError
from ..facts import host as hostfacts
from ..steps import model as model_step
from ..steps import service as service_step
from .flags import DEFAULT_DEPTHS, BenchFlags, bench_argv
from .guard import SERVICE, RigGuard, decide_stop
from .results import (DEFAULT_BASELINE, TABLE_COLUMNS, BenchPoint, apply_power, compare,
                      comparison_rows, fmt, load_baseline, points_from, results_dir, table_rows,
                      write_results)
from .run import RigBench, power_query
from .ttft import measure_ttft


# ---------------------------------------------------------------------------------------------
# what to bench on the rig

def default_binary(cfg: dict[str, Any]) -> str:
    return f"{cfg['paths']['prefix']}/llama.cpp/current/bin/llama-bench"


def check_binary(ctx, binary: str) -> None:
    if not ctx.target.exists(binary, sudo=True):
        raise StepError(f"{binary} not found (build llama.cpp with the llama-bench target, or pass --binary)")


def find_model(ctx, model: str | None = None) -> str:
    """`--model` as given (it must exist), else shard 1 of the configured model -- only when the
    model step verified every file of it (never a guess among the .gguf files in the model dir)."""
    if model:
        if not ctx.target.exists(model, sudo=True):
            raise StepError(f"--model {model}: no such file on {ctx.host.name}")
        return model
    try:
        return model_step.shard1_path(ctx)
    except StepError as e:
        raise StepError(f"no verified model to bench: {e} (or name a file with --model)") from None


def charts_available(ctx) -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        ctx.warn("matplotlib is not installed (pip install 'llama-rig[bench]'): no PNG charts")
        return False


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
    cfg = ctx.cfg
    flags = BenchFlags.from_cfg(cfg)
    binary = opts.binary or default_binary(cfg)
    check_binary(ctx, binary)
    model = find_model(ctx, opts.model)
    gf = hostfacts.gpu(ctx)
    n_gpus = len(gf.gpus) if gf.available else 0
    installed = service_step.unit_installed(ctx)
    active = installed and service_step.is_active(ctx)
    stop, why = decide_stop(opts.service, n_gpus, bool(cfg["llama_cpp"]["cuda"]), flags.n_gpu_layers, active,
                           rpc=bool(flags.rpc))
    _log(ctx, f"{binary} -m {model} {flags.describe()}")
    _log(ctx, f"depths {','.join(map(str, opts.depths))}, pp{opts.n_prompt}/tg{opts.n_gen}, "
              f"{opts.reps} rep(s), power sampling: {'on, ' + str(n_gpus) + ' GPU(s)' if n_gpus else 'off (no GPUs)'}")
    if not stop:
        _log(ctx, f"{SERVICE} left as it is ({why})")
    runner = RigBench(ctx, sample_power=n_gpus > 0, interval=opts.interval, timeout=opts.timeout,
                      power_ids=opts.power_ids)
    points: list[BenchPoint] = []
    build: dict[str, Any] = {}
    with RigGuard(ctx, "bench") as guard, runner.interruptible():
        if stop:
            guard.stop_service(why)
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
            _log(ctx, f"d{d}: pp {fmt(pt.prefill_ts, ',.1f')} t/s, tg {fmt(pt.decode_ts, ',.1f')} t/s, "
                      f"power {fmt(pt.power_w, ',.0f')} W ({time.monotonic() - t0:.1f}s)")
            if opts.on_point:
                opts.on_point(pt)
    stopped = stop
    ttft: dict[int, dict[str, Any]] = {}
    if opts.ttft and installed and service_step.is_active(ctx):
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
    charts = opts.charts and charts_available(ctx)
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
