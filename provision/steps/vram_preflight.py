"""The service step's VRAM preflight: llama-fit-params with the server's own memory flags
(`-fitp on`: an estimate per device without loading the weights) against each GPU's free memory,
with a margin for what it does not count. A plan that does not fit is refused before llama-server
is restarted, with a -ts that llama-fit-params itself says fits. Pure parts (parser, checker, -ts
proposal) first, then the run on the box. `service` re-exports these names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import Context
from ..errors import StepError
from ..facts import host as hostfacts
from ..facts.gpu import GpuFacts
from ..target import join

# head room the VRAM preflight leaves on every GPU (server.vram_margin_mib): what llama-fit-params
# does not count -- the CUDA context (~0.5-0.7 GiB on H100/H200, CUDA 13) and the cuBLAS handle and
# workspace created at the first request (measured: benchmarks/gpu-proof-20261127-h200x4-service/)
PREFLIGHT_MARGIN_MIB = 1536


def parse_fit_output(text: str) -> dict[str, tuple[int, int, int]]:
    """`CUDA0 10 68 297` / `Host 9 0 290` lines -> {device: (model, context, compute) MiB}."""
    out: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.lstrip("-").isdigit() for p in parts[1:]):
            out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return out


def cuda_devices(devices: dict[str, tuple[int, int, int]]) -> dict[int, tuple[int, int, int]]:
    """The CUDA<n> rows of parse_fit_output, keyed by n."""
    return {int(d[4:]): v for d, v in devices.items() if d.startswith("CUDA") and d[4:].isdigit()}


@dataclass
class FitReport:
    ok: bool
    rows: list[list[Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    proposed_ts: list[float] | None = None  # set by preflight(): a -ts llama-fit-params says fits


def check_fit(devices: dict[str, tuple[int, int, int]], free_mib: dict[int, int],
              names: dict[int, str] | None = None, margin: int = PREFLIGHT_MARGIN_MIB) -> FitReport:
    """Compare llama-fit-params' estimate per CUDA device with the GPU's free memory."""
    rep = FitReport(ok=True)
    for dev, (m, c, k) in sorted(devices.items(), key=lambda kv: (not kv[0].startswith("CUDA"), kv[0])):
        need = m + c + k
        if dev.startswith("CUDA") and dev[4:].isdigit():
            idx = int(dev[4:])
            free = free_mib.get(idx)
            fits = free is not None and need + margin <= free
            label = f"GPU {idx}" + (f" ({names[idx]})" if names and idx in names else "")
            rep.rows.append([dev, m, c, k, need, "?" if free is None else free,
                             "ok" if fits else "DOES NOT FIT"])
            if not fits:
                rep.ok = False
                rep.problems.append(
                    f"{label}: needs {need} MiB (model {m} + context {c} + compute {k}) + "
                    f"{margin} MiB margin but only {free if free is not None else '?'} MiB are free")
        else:
            rep.rows.append([dev, m, c, k, need, "-", "host memory"])
    return rep


def propose_ts(cuda: dict[int, tuple[int, int, int]], free_mib: dict[int, int],
               margin: int = PREFLIGHT_MARGIN_MIB) -> list[float] | None:
    """A -ts proportional to what each GPU has free for weights + KV (free - compute - margin),
    scaled so the largest share is 1 (two decimals, like the seed's 0.9,1,1,...)."""
    idxs = sorted(free_mib)
    room = {i: max(0, free_mib[i] - (cuda.get(i, (0, 0, 0))[2]) - margin) for i in idxs}
    top = max(room.values(), default=0)
    if top <= 0:
        return None
    need = sum(m + c for m, c, _ in cuda.values())
    if need > sum(room.values()):
        return None  # no split fits: the plan needs less context, a smaller quant or more GPUs
    return [round(room[i] / top, 2) for i in idxs]


def fitted_ts(estimate: Callable[[list[float]], dict[int, tuple[int, int, int]] | None],
              cuda: dict[int, tuple[int, int, int]], free_mib: dict[int, int],
              margin: int = PREFLIGHT_MARGIN_MIB, tries: int = 5) -> list[float] | None:
    """A -ts that llama-fit-params itself says fits, or None.

    Starts from propose_ts (shares proportional to each GPU's room) and checks each candidate with
    `estimate(ts)` (llama-fit-params with that -ts): layers are whole, so a GPU may get more than
    its proportional share, and compute buffers move with the split. A GPU that still overflows
    has its share cut by the part that does not fit, and the next candidate is checked."""
    ts = propose_ts(cuda, free_mib, margin)
    seen: list[list[float]] = []
    for _ in range(tries):
        if ts is None or ts in seen:
            return None
        seen.append(ts)
        est = estimate(ts)
        if not est:
            return None
        idxs = sorted(free_mib)
        over = {i: sum(est.get(i, (0, 0, 0))) + margin - free_mib[i] for i in idxs}
        over = {i: o for i, o in over.items() if o > 0}
        if not over:
            return ts
        new = list(ts)
        for i, o in over.items():
            m, c, _ = est.get(i, (0, 0, 0))
            if m + c <= 0:
                return None  # its compute buffer and the margin alone do not fit
            pos = idxs.index(i)
            new[pos] = math.floor(100 * ts[pos] * max(0.0, (m + c - o) / (m + c))) / 100
        top = max(new)
        if top <= 0:
            return None
        ts = [round(x / top, 2) for x in new]
    return None


# ---------------------------------------------------------------------------------------------
# on the box


def free_memory(ctx: Context, gf: GpuFacts) -> dict[int, int]:
    """Free MiB per GPU index, counting what our running llama-server holds as free (a restart
    releases it)."""
    from . import service as svc
    free = {g.index: (g.memory_total_mib or 0) - (g.memory_used_mib or 0) for g in gf.gpus}
    pid = ctx.target.run(f"systemctl show -p MainPID --value {svc.SERVICE} 2>/dev/null",
                         check=False).stdout.strip()
    if pid.isdigit() and pid != "0":
        r = ctx.target.run("nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory "
                           "--format=csv,noheader,nounits", check=False)
        by_uuid = {g.uuid: g.index for g in gf.gpus}
        for line in r.stdout.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) == 3 and parts[1] == pid and parts[2].isdigit() and parts[0] in by_uuid:
                free[by_uuid[parts[0]]] += int(parts[2])
    return free


def preflight(ctx: Context, model_path: str) -> FitReport | None:
    """Run llama-fit-params with the server's flags; refuse a plan that does not fit. Returns
    None (after a visible warning) where it cannot run."""
    from . import rpc as rpc_step
    from . import service as svc

    def skipped(reason: str) -> None:
        ctx.warn(f"VRAM preflight: skipped — {reason}")

    rpc_step.gate(ctx)  # RPC workers (if any): same build and answering, before llama-fit-params --rpc

    gf = hostfacts.gpu(ctx)
    if not gf.available or not gf.gpus:
        skipped(f"no GPU ({gf.reason or 'nvidia-smi lists none'})")
        return None
    if ctx.cfg["server"]["n_gpu_layers"] == 0:
        skipped("server.n_gpu_layers is 0 (nothing is offloaded)")
        return None
    fit = svc.fit_params_path(ctx.cfg)
    if not ctx.target.exists(fit):
        skipped(f"{fit} not found (add llama-fit-params to llama_cpp.targets)")
        return None

    def run_fit(ts: list[float] | None = None):
        cfg = ctx.cfg if ts is None else {**ctx.cfg, "server": {**ctx.cfg["server"], "tensor_split": ts}}
        r = ctx.target.run(join(svc.fit_params_argv(cfg, model_path, fit)),
                           env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, check=False, timeout=600)
        return r, parse_fit_output(r.stdout)

    r, devices = run_fit()
    if r.exited != 0 or not devices:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        skipped(f"llama-fit-params failed (exit {r.exited}): {tail}")
        return None
    if not any(d.startswith("CUDA") for d in devices):
        skipped("CPU build: llama-fit-params reports no CUDA device ("
                + ", ".join(f"{d} {sum(v)} MiB" for d, v in devices.items()) + ")")
        return None
    free = free_memory(ctx, gf)
    margin = ctx.cfg["server"]["vram_margin_mib"]
    rep = check_fit(devices, free, {g.index: g.name for g in gf.gpus}, margin)
    ctx.console.table(f"VRAM preflight: {ctx.host.name} (MiB, margin {margin})",
                      ["device", "model", "context", "compute", "total", "free", "fit"], rep.rows)
    rpc_step.preflight_remote(ctx, devices, margin)  # the RPC workers' devices (if any)
    if not rep.ok:
        def estimate(ts: list[float]) -> dict[int, tuple[int, int, int]] | None:
            r2, d2 = run_fit(ts)
            return cuda_devices(d2) if r2.exited == 0 else None
        rep.proposed_ts = fitted_ts(estimate, cuda_devices(devices), free, margin)
        hint = (f"; try server.tensor_split: [{', '.join(svc._num(x) for x in rep.proposed_ts)}] "
                "(llama-fit-params: fits)"
                if rep.proposed_ts else "; llama-fit-params finds no tensor split that fits: lower "
                "server.ctx_size, use a smaller quant or more GPUs")
        raise StepError("VRAM preflight: the plan does not fit — " + "; ".join(rep.problems) + hint
                        + " (llama-server was not restarted)")
    return rep
