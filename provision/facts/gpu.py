"""GPUs as nvidia-smi reports them (`--query-gpu ... --format=csv,noheader,nounits`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import sections

QUERY_FIELDS = ("index", "uuid", "name", "pci.bus_id", "compute_cap", "memory.total", "memory.used",
                "persistence_mode", "power.draw", "power.limit", "power.default_limit",
                "power.min_limit", "power.max_limit", "driver_version")
QUERY = ("nvidia-smi --query-gpu=" + ",".join(QUERY_FIELDS) + " --format=csv,noheader,nounits")


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    compute_cap: str | None  # "8.6"
    memory_total_mib: int | None
    memory_used_mib: int | None
    persistence: bool | None
    power_draw: float | None
    power_limit: float | None
    power_default: float | None
    power_min: float | None
    power_max: float | None
    driver_version: str | None

    @property
    def arch(self) -> str | None:
        """CMAKE_CUDA_ARCHITECTURES value: 8.6 -> "86"."""
        return self.compute_cap.replace(".", "") if self.compute_cap else None

    @property
    def power_settable(self) -> bool:
        return self.power_min is not None and self.power_max is not None


@dataclass(frozen=True)
class GpuFacts:
    available: bool  # nvidia-smi present AND the driver answered
    reason: str  # why not available ("" when available)
    gpus: tuple[Gpu, ...] = ()
    cuda_version: str | None = None  # from the nvidia-smi banner ("CUDA Version: 12.8")
    nvidia_smi: str | None = None  # where it is (`command -v nvidia-smi`; None: absent)

    @property
    def driver_version(self) -> str | None:
        return self.gpus[0].driver_version if self.gpus else None


def _num(v: str) -> float | None:
    v = v.strip()
    if not v or v.startswith("[") or v.upper() in ("N/A", "NA"):
        return None
    try:
        return float(v.split()[0])
    except ValueError:
        return None


def _str(v: str) -> str | None:
    v = v.strip()
    return None if not v or v.startswith("[") or v == "N/A" else v


def parse_query(output: str) -> tuple[Gpu, ...]:
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        if not line.lstrip()[:1].isdigit():
            # not a GPU row: a warning nvidia-smi mixes in ("WARNING: infoROM is corrupted ...")
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(QUERY_FIELDS):
            raise ValueError(f"unexpected nvidia-smi line ({len(parts)} fields, want "
                             f"{len(QUERY_FIELDS)}): {line!r}")
        v = dict(zip(QUERY_FIELDS, parts))
        mt, mu = _num(v["memory.total"]), _num(v["memory.used"])
        pm = _str(v["persistence_mode"])
        gpus.append(Gpu(
            index=int(v["index"]), uuid=v["uuid"], name=v["name"], pci_bus_id=v["pci.bus_id"],
            compute_cap=_str(v["compute_cap"]),
            memory_total_mib=int(mt) if mt is not None else None,
            memory_used_mib=int(mu) if mu is not None else None,
            persistence=None if pm is None else pm.lower() == "enabled",
            power_draw=_num(v["power.draw"]), power_limit=_num(v["power.limit"]),
            power_default=_num(v["power.default_limit"]), power_min=_num(v["power.min_limit"]),
            power_max=_num(v["power.max_limit"]), driver_version=_str(v["driver_version"])))
    return tuple(gpus)


_CUDA_RE = re.compile(r"CUDA Version:\s*([0-9.]+)")


def parse_banner_cuda(banner: str) -> str | None:
    m = _CUDA_RE.search(banner)
    return m.group(1) if m else None


GATHER = (
    "if ! command -v nvidia-smi >/dev/null 2>&1; then echo '@@absent'; exit 0; fi; "
    "echo \"@@path $(command -v nvidia-smi)\"; "
    # the banner (CUDA version) is read beside the query: each nvidia-smi call takes a while
    "b=$(mktemp 2>/dev/null) || b=''; [ -z \"$b\" ] || { nvidia-smi 2>/dev/null | head -n 5 >\"$b\" & }; "
    f"out=$({QUERY} 2>&1); rc=$?; echo \"@@rc $rc\"; printf '%s\\n' \"$out\"; wait; "
    "echo '@@banner'; if [ -n \"$b\" ]; then cat \"$b\"; rm -f \"$b\"; else nvidia-smi 2>/dev/null | head -n 5; fi"
)
SECTIONS = ("absent", "path", "rc", "banner")


def parse_gather(output: str) -> GpuFacts:
    parts = {s.name: s for s in sections.parse(output, SECTIONS)}
    if "absent" in parts:
        return GpuFacts(False, "nvidia-smi not found (no NVIDIA driver installed)")
    got = parts.get("rc")
    rc = int(got.arg) if got is not None and got.arg.lstrip("-").isdigit() else 255
    body = got.text if got is not None else ""
    banner = parts["banner"].text if "banner" in parts else ""
    smi = parts["path"].arg or None if "path" in parts else None
    if rc != 0:
        msg = (body.strip().splitlines() or [f"exit {rc}"])[0]
        return GpuFacts(False, f"nvidia-smi failed (exit {rc}): {msg}", nvidia_smi=smi)
    try:
        gpus = parse_query(body)
    except ValueError as e:
        return GpuFacts(False, f"cannot parse nvidia-smi output: {e}", nvidia_smi=smi)
    return GpuFacts(True, "", gpus, parse_banner_cuda(banner), nvidia_smi=smi)


def gather(target) -> GpuFacts:
    return parse_gather(target.run(GATHER, check=False).stdout)
