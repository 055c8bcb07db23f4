"""`facts`: read the box and report it. Never changes anything."""
from __future__ import annotations

from ..engine import Change, Context, Step
from ..facts import host as hostfacts


def summary_rows(hf: hostfacts.HostFacts, gf) -> list[list[str]]:
    rows = [
        ["os", hf.os_pretty],
        ["kernel", f"{hf.kernel} ({hf.arch})"],
        ["cpu", f"{hf.cpus} × {hf.cpu_model}".strip()],
        ["memory", f"{hf.mem_total_kib / 1048576:.1f} GiB"],
        ["disk free", f"{hf.disk_free_bytes / 1e9:.1f} GB at {hf.disk_path}"],
        ["nvcc", f"{hf.nvcc_version} ({hf.nvcc_path})" if hf.nvcc_path else "not found"],
        ["gcc / cmake", f"{hf.gcc_version or '-'} / {hf.cmake_version or '-'}"],
        ["driver / CUDA", f"{gf.driver_version or '-'} / {gf.cuda_version or '-'}" if gf.available
         else gf.reason],
    ]
    rows.append(["CUDA toolkit", hf.cuda_home or "-"])
    rows.append(["secure boot", {True: "on" + (" (MOK enrolled)" if hf.mok_enrolled else ""),
                                 False: "off", None: "unknown"}[hf.secure_boot]])
    if hf.nouveau_loaded:
        rows.append(["nouveau", "loaded" + (" (blacklisted: gone after a reboot)" if hf.nouveau_blacklisted else "")])
    for g in gf.gpus:
        rows.append([f"gpu {g.index}", f"{g.name}, cc {g.compute_cap}, {g.memory_total_mib} MiB, "
                     f"power {g.power_limit} W (min {g.power_min}, max {g.power_max}, default "
                     f"{g.power_default}), persistence {'on' if g.persistence else 'off'}"])
    if hf.reboot_required:
        rows.append(["reboot", "REQUIRED (" + ", ".join(hf.reboot_packages) + ")"])
    return rows


class FactsStep(Step):
    name = "facts"
    title = "read the box"

    def plan(self, ctx: Context) -> list[Change]:
        hf, gf = hostfacts.host_and_gpu(ctx, read_ahead=True)
        ctx.say(f"facts: {hf.os_pretty}, kernel {hf.kernel}, {hf.cpus} CPUs, "
                f"{hf.mem_total_kib // 1048576} GiB RAM, {len(gf.gpus)} GPU(s)"
                + (f" [{gf.gpus[0].name}]" if gf.gpus else "")
                + (f", nvcc {hf.nvcc_version}" if hf.nvcc_version else ""))
        if hf.reboot_required:
            ctx.warn("reboot required (" + (", ".join(hf.reboot_packages) or "see /var/run/reboot-required")
                     + ")")
        return []
