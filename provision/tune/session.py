"""What every tune on a host starts from: the llama-bench binary, the model, the current flags, the
GPUs, whether the service must make room, the rig runner -- plus the VRAM preflight of a candidate
(the service step's own `preflight()`, with the candidate's flags) and writing the results.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.flags import SEED_BATCH, SEED_UBATCH, BenchFlags
from ..bench.guard import SERVICE, decide_stop
from ..bench.results import results_dir
from ..bench.run import RigBench
from ..bench.sweep import check_binary, default_binary, find_model
from ..errors import StepError
from ..facts import host as hostfacts
from ..facts.gpu import GpuFacts
from ..steps import service as service_step
from .inventory_edit import apply_to_inventory
from .options import TuneOptions
from .significance import MIN_REPS


def current_flags(cfg: dict[str, Any]) -> BenchFlags:
    """The service's flags with -b/-ub spelled out (llama.cpp's defaults where unset)."""
    f = BenchFlags.from_cfg(cfg)
    return f.but(batch_size=f.batch_size or SEED_BATCH, ubatch_size=f.ubatch_size or SEED_UBATCH)


@dataclass
class Session:
    ctx: Any
    opts: TuneOptions
    flags: BenchFlags  # the current flags (-b/-ub spelled out)
    binary: str
    model: str
    gf: GpuFacts
    n_used: int  # GPUs the server uses
    stop: bool
    why: str
    runner: RigBench

    @property
    def name(self) -> str:
        return self.ctx.host.name

    def say(self, text: str) -> None:
        self.ctx.say(f"tune: {text}")

    def preflight(self, **server: Any) -> tuple[bool | None, str]:
        """The service step's VRAM preflight with these server settings: (True, "fits"),
        (False, why it does not fit) or (None, why it could not check)."""
        cfg = {**self.ctx.cfg, "server": {**self.ctx.cfg["server"], **server}}
        cctx = dataclasses.replace(self.ctx, host=dataclasses.replace(self.ctx.host, cfg=cfg))
        try:
            rep = service_step.preflight(cctx, self.model)
        except StepError as e:
            return False, str(e).replace(" (llama-server was not restarted)", "")
        return (True, "fits") if rep else (None, "not checked (see the warning above)")

    def out_dir(self) -> Path:
        return results_dir(self.opts.results_root, self.name)

    def write_json(self, out_dir: Path, name: str, doc: dict[str, Any]) -> Path:
        p = out_dir / name
        p.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return p

    def header(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "host": self.name,
                "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "binary": self.binary, "model": self.model, "current_flags": self.flags.argv(),
                "reps": self.opts.reps, "gpus": [g.name for g in self.gf.gpus]}

    def apply(self, section: str, values: dict[str, Any], then: str) -> dict[str, Any]:
        """Write the winner into the host's entry of the inventory (comments kept)."""
        diff = apply_to_inventory(self.opts.inventory_path, self.name, values, section=section)
        if diff:
            self.say(f"wrote {', '.join(f'{section}.{k}' for k in values)} to {self.opts.inventory_path}")
            self.ctx.console.diff(diff)
        else:
            self.say(f"{self.opts.inventory_path} already has these values")
        self.say(then)
        return values


def open_session(ctx, opts: TuneOptions, *, sample_power: bool = False) -> Session:
    cfg = ctx.cfg
    flags = current_flags(cfg)
    binary = opts.binary or default_binary(cfg)
    check_binary(ctx, binary)
    model = find_model(ctx, opts.model)
    gf = hostfacts.gpu(ctx)
    n_gpus = len(gf.gpus) if gf.available else 0
    # GPUs the server uses: gpus.count when the inventory says (CUDA_VISIBLE_DEVICES may hide some)
    n_used = min(n_gpus, cfg["gpus"]["count"]) if cfg["gpus"]["count"] else n_gpus
    active = service_step.unit_installed(ctx) and service_step.is_active(ctx)
    stop, why = decide_stop(opts.service, n_gpus, bool(cfg["llama_cpp"]["cuda"]), flags.n_gpu_layers, active,
                           rpc=bool(flags.rpc))
    runner = RigBench(ctx, sample_power=sample_power, interval=opts.interval, timeout=opts.timeout,
                      power_ids=opts.gpu_ids)
    s = Session(ctx, opts, flags, binary, model, gf, n_used, stop, why, runner)
    if opts.reps < MIN_REPS:
        ctx.warn(f"tune: {opts.reps} run(s) per point: too few to tell a gain from noise, so no winner "
                 f"can be named (the rule needs {MIN_REPS})")
    if not stop:
        s.say(f"{SERVICE} left as it is ({why})")
    return s
