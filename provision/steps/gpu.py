"""`gpu`: persistence mode, per-GPU power limits (validated against each board's range before
anything is set), and a oneshot unit `llama-rig-gpu.service` that reapplies both at boot, ordered
before llama-server. The expected GPU count/model is checked: a missing GPU is an error."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import readahead
from ..engine import Change, Context, Run, Step, WriteFile
from ..errors import CommandError, StepError
from ..facts import host as hostfacts
from ..facts.gpu import Gpu, GpuFacts
from ..target import quote

UNIT_NAME = "llama-rig-gpu.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
NVIDIA_SMI = "/usr/bin/nvidia-smi"
TOLERANCE_W = 0.5


def _w(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


def check_inventory(cfg: dict, gf: GpuFacts) -> list[str]:
    """Expected count/model vs found. Errors raise; soft findings come back as warnings."""
    g = cfg["gpus"]
    want_n, want_model = g["count"], g["model"]
    warnings: list[str] = []
    if not want_n and g["power_limit"] is None:
        return warnings
    if not gf.available:
        if want_n:
            raise StepError(f"gpus.count is {want_n} but {gf.reason}")
        raise StepError(f"gpus.power_limit is set but {gf.reason}")
    found = len(gf.gpus)
    if want_n and found < want_n:
        raise StepError(f"expected {want_n} GPUs (gpus.count) but nvidia-smi shows {found}: "
                        + ", ".join(f"{x.index}: {x.name} {x.pci_bus_id}" for x in gf.gpus)
                        + " — a missing GPU is an error (check cabling/risers, `nvidia-smi -L`, dmesg)")
    if want_n and found > want_n:
        warnings.append(f"nvidia-smi shows {found} GPUs, gpus.count says {want_n}: using all {found} "
                        "for power settings")
    if want_model:
        odd = [x for x in gf.gpus if x.name.strip() != want_model.strip()]
        if odd:
            raise StepError(f"expected every GPU to be {want_model!r} (gpus.model) but found "
                            + ", ".join(f"GPU {x.index} = {x.name!r}" for x in odd))
    return warnings


def wanted_limits(cfg: dict, gpus: tuple[Gpu, ...], watts: float | None = None) -> dict[int, float]:
    """GPU index -> wanted watts (empty when no limit is configured)."""
    pl = watts if watts is not None else cfg["gpus"]["power_limit"]
    if pl is None:
        return {}
    if isinstance(pl, list):
        if len(pl) != len(gpus):
            raise StepError(f"gpus.power_limit has {len(pl)} values but nvidia-smi shows {len(gpus)} GPUs")
        return {g.index: float(v) for g, v in zip(gpus, pl)}
    return {g.index: float(pl) for g in gpus}


def validate_limits(wanted: dict[int, float], gpus: tuple[Gpu, ...]) -> list[str]:
    """Every wanted limit inside its board's range, checked BEFORE anything is set.
    Boards that do not report a range are skipped with a warning."""
    by = {g.index: g for g in gpus}
    bad, warnings = [], []
    for idx, w in sorted(wanted.items()):
        g = by[idx]
        if not g.power_settable:
            warnings.append(f"GPU {idx} ({g.name}) reports no power limit range "
                            "(power management not supported): its limit is left as is")
            continue
        if w < g.power_min - 1e-6 or w > g.power_max + 1e-6:
            bad.append(f"GPU {idx} ({g.name}): {_w(w)} W is outside the allowed range "
                       f"{_w(g.power_min)}–{_w(g.power_max)} W")
    if bad:
        raise StepError("gpus.power_limit: " + "; ".join(bad) + " — nothing was changed")
    return warnings


def group_by_value(limits: dict[int, float]) -> list[tuple[str, str]]:
    """{0: 350, 1: 350, 2: 300} -> [("0,1", "350"), ("2", "300")] (order of first index)."""
    groups: dict[str, list[int]] = {}
    for idx in sorted(limits):
        groups.setdefault(_w(limits[idx]), []).append(idx)
    return [(",".join(str(i) for i in ids), w) for w, ids in groups.items()]


def render_unit(cfg: dict, gpus: tuple[Gpu, ...], nvidia_smi: str = NVIDIA_SMI,
                watts: float | None = None) -> str:
    from ..templates import render
    limits = {i: w for i, w in wanted_limits(cfg, gpus, watts).items()
              if next(g for g in gpus if g.index == i).power_settable}
    return render("llama-rig-gpu.service.j2", persistence=bool(cfg["gpus"]["persistence"]),
                  nvidia_smi=nvidia_smi, limits=group_by_value(limits))


class NvidiaSmi(Run):
    """nvidia-smi commands as root; translates its documented exit codes into clear errors and
    surfaces "Treating as warning" lines."""

    def apply(self, ctx: Context) -> None:
        for c in self.commands:
            r = ctx.target.run(c, sudo=self.sudo, check=False, timeout=self.timeout)
            text = (r.stdout + r.stderr).strip()
            if r.exited == 4 or "Insufficient Permissions" in text:
                raise StepError(f"`{c}` needs root: nvidia-smi says Insufficient Permissions "
                                f"(exit {r.exited}) — connect as root or give "
                                f"{ctx.host.cfg['connection']['user']} sudo (connection.sudo)")
            if r.exited != 0:
                tail = " / ".join(text.splitlines()[-2:]) or f"exit {r.exited}"
                raise StepError(f"`{c}` failed (exit {r.exited}): {tail}")
            for line in text.splitlines():
                if "not supported" in line.lower():
                    ctx.warn(f"nvidia-smi: {line.strip()}")


@dataclass
class Observed:
    """What the box has now besides nvidia-smi's query (read in plan, passed to the pure plan)."""

    nvidia_smi: str = NVIDIA_SMI
    unit_now: str | None = None
    unit_enabled: bool = False
    systemd: bool = True


def plan(cfg: dict, gf: GpuFacts, obs: Observed, watts: float | None = None,
         unit: bool = True) -> tuple[list[Change], list[str]]:
    """GPU facts in -> (changes, warnings) out. Raises StepError before any change is planned
    when the inventory does not match the GPUs or a limit is out of range."""
    warnings = check_inventory(cfg, gf)
    g = cfg["gpus"]
    if not gf.available or not gf.gpus or (not g["count"] and g["power_limit"] is None and watts is None):
        return [], warnings
    changes: list[Change] = []
    smi = obs.nvidia_smi
    wanted = wanted_limits(cfg, gf.gpus, watts)
    warnings += validate_limits(wanted, gf.gpus)
    if g["persistence"]:
        off = [x.index for x in gf.gpus if x.persistence is False]
        if off:
            ids = ",".join(map(str, off))
            changes.append(NvidiaSmi(f"persistence mode on for GPU {ids}",
                                     commands=[f"{smi} -i {ids} -pm 1"]))
    by = {x.index: x for x in gf.gpus}
    differ = {i: w for i, w in wanted.items() if by[i].power_settable
              and (by[i].power_limit is None or abs(by[i].power_limit - w) > TOLERANCE_W)}
    for ids, w in group_by_value(differ):
        now = ", ".join(sorted({_w(by[int(i)].power_limit) if by[int(i)].power_limit is not None
                                else "?" for i in ids.split(",")}))
        changes.append(NvidiaSmi(f"power limit {w} W on GPU {ids} (now {now} W)",
                                 commands=[f"{smi} -i {ids} -pl {w}"]))
    if unit and obs.systemd:
        content = render_unit(cfg, gf.gpus, smi, watts)
        if content != obs.unit_now:
            changes.append(WriteFile(f"boot unit {UNIT_PATH}", path=UNIT_PATH, content=content,
                                     before=obs.unit_now))
        if content != obs.unit_now or not obs.unit_enabled:
            changes.append(Run(f"enable {UNIT_NAME} (reapplies the limits at boot)", commands=[
                "systemctl daemon-reload", f"systemctl enable {UNIT_NAME}"]))
    return changes, warnings


readahead.wants(lambda ctx: readahead.Want(read=[UNIT_PATH], enabled=[UNIT_NAME]))


def observe(ctx: Context) -> Observed:
    """nvidia-smi's path from the GPU facts; the unit, its state and systemd read ahead."""
    return Observed(nvidia_smi=hostfacts.gpu(ctx).nvidia_smi or NVIDIA_SMI,
                    unit_now=readahead.read_file(ctx, UNIT_PATH),
                    unit_enabled=readahead.enabled(ctx, UNIT_NAME) == "enabled",
                    systemd=readahead.systemd(ctx))


def confirm(ctx: Context, watts: float | None = None) -> None:
    """Re-query nvidia-smi: limits that did not take are an error, unsupported boards a warning."""
    hostfacts.invalidate(ctx, "gpu")
    gf = hostfacts.gpu(ctx)
    if not gf.available:
        raise StepError(f"after setting: {gf.reason}")
    wanted = wanted_limits(ctx.cfg, gf.gpus, watts)
    bad = []
    for x in gf.gpus:
        w = wanted.get(x.index)
        if w is None:
            continue
        if not x.power_settable or x.power_limit is None:
            ctx.warn(f"GPU {x.index} ({x.name}): power limit not reported/supported — "
                     f"could not confirm {_w(w)} W")
            continue
        if abs(x.power_limit - w) > TOLERANCE_W:
            bad.append(f"GPU {x.index} is at {_w(x.power_limit)} W, wanted {_w(w)} W")
    if ctx.cfg["gpus"]["persistence"]:
        off = [str(x.index) for x in gf.gpus if x.persistence is False]
        if off:
            bad.append(f"persistence mode still off on GPU {','.join(off)}")
    if bad:
        raise StepError("nvidia-smi did not take the settings: " + "; ".join(bad))


class GpuStep(Step):
    name = "gpu"
    title = "persistence mode, power limits, boot unit"

    def plan(self, ctx: Context) -> list[Change]:
        gf = hostfacts.gpu(ctx)
        changes, warnings = plan(ctx.cfg, gf, observe(ctx))
        for w in warnings:
            ctx.warn(w)
        return changes

    def verify(self, ctx: Context) -> None:
        confirm(ctx)


def apply_now(ctx: Context, watts: float | None = None) -> bool:
    """`gpu.power`: with watts, set every GPU to it for this run (validated; the boot unit keeps
    the inventory's value); without, apply the inventory (limits + boot unit). True if changed."""
    gf = hostfacts.gpu(ctx)
    if watts is not None and not gf.gpus:
        raise StepError(f"--watts given but no GPU answers: {gf.reason or 'nvidia-smi lists none'}")
    changes, warnings = plan(ctx.cfg, gf, observe(ctx), watts=watts, unit=watts is None)
    for w in warnings:
        ctx.warn(w)
    if not changes:
        ctx.say("gpu: ok (no change)")
    for ch in changes:
        ctx.say(f"gpu: {'would ' if ctx.check else ''}change: {ch.description}")
        if not ctx.check:
            ch.apply(ctx)
    if changes and not ctx.check:
        confirm(ctx, watts)
    status_table(ctx)
    return bool(changes)


def status_rows(gf: GpuFacts) -> list[list[Any]]:
    def n(v, unit=""):
        return "n/a" if v is None else f"{_w(v)}{unit}"
    rows = []
    for x in gf.gpus:
        rng = (f"{_w(x.power_min)}–{_w(x.power_max)} W" if x.power_settable else "n/a")
        mem = (f"{n(x.memory_used_mib)} / {n(x.memory_total_mib)} MiB")
        rows.append([x.index, x.name, n(x.power_limit, " W"), rng, n(x.power_draw, " W"), mem,
                     "on" if x.persistence else "off" if x.persistence is False else "n/a"])
    return rows


def status_table(ctx: Context) -> None:
    hostfacts.invalidate(ctx, "gpu")
    gf = hostfacts.gpu(ctx)
    if not gf.available:
        raise StepError(gf.reason)
    ctx.console.table(f"gpus: {ctx.host.name}", ["index", "name", "limit", "range", "draw",
                                                 "memory used/total", "persistence"],
                      status_rows(gf))


__all__ = ["GpuStep", "plan", "Observed", "apply_now", "status_table", "status_rows", "quote"]
