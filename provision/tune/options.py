"""The options of `invoke tune` and their parsers (each bad value is one UsageError line, exit 2,
before any host is contacted)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .significance import MIN_REPS

DEFAULT_PAIRS: tuple[tuple[int, int], ...] = (
    (512, 2048),  # the seed (llama.cpp defaults)
    (1024, 2048), (2048, 2048),
    (1024, 4096), (2048, 4096), (4096, 4096),
    # b > ub: several ubatches per batch, which a layer split pipelines across its GPUs
    (512, 8192), (1024, 8192), (2048, 8192), (4096, 8192), (8192, 8192))
DEFAULT_KEEP = 0.95
DEFAULT_POWER_POINTS = 6  # minimum .. default limit in this many steps
MAX_WATTS = 2000


def parse_pairs(spec: str | None) -> list[tuple[int, int]]:
    """"512/2048,4096/4096" -> [(512, 2048), (4096, 4096)] as (ubatch, batch); default: DEFAULT_PAIRS.
    The current flags' pair is added by the tune itself (it is the reference)."""
    if not spec:
        return list(DEFAULT_PAIRS)
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)/(\d+)", item)
        if not m:
            raise UsageError(f"command line: --pairs: expected UBATCH/BATCH like 512/2048, got {item!r}")
        ub, b = int(m.group(1)), int(m.group(2))
        if ub < 1 or b < 1 or ub > b:
            raise UsageError(f"command line: --pairs: {item}: need 1 <= ubatch <= batch")
        if (ub, b) not in out:
            out.append((ub, b))
    if not out:
        raise UsageError("command line: --pairs: empty")
    return out


def parse_watts(spec: str | None) -> list[float] | None:
    """"250,275,300,350" -> [250.0, 275.0, 300.0, 350.0] (sorted, no duplicates); None/"" -> None
    (the tune then sweeps each GPU's allowed range: minimum .. default limit)."""
    if spec is None or str(spec).strip() == "":
        return None
    out: list[float] = []
    for item in str(spec).split(","):
        s = item.strip().lower().removesuffix("w").strip()
        if not s:
            continue
        try:
            w = float(s)
        except ValueError:
            raise UsageError(f"command line: --watts: not a number of watts: {item.strip()!r}") from None
        if not (0 < w <= MAX_WATTS):
            raise UsageError(f"command line: --watts: {item.strip()} is outside 1..{MAX_WATTS} W")
        if w not in out:
            out.append(w)
    if not out:
        raise UsageError("command line: --watts: empty")
    return sorted(out)


def parse_keep(spec: Any) -> float:
    """`--keep 0.95` (or `95%`): the share of the best decode t/s the knee must keep."""
    if spec is None or str(spec).strip() == "":
        return DEFAULT_KEEP
    s = str(spec).strip()
    try:
        v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise UsageError(f"command line: --keep: not a fraction like 0.95 or 95%: {s!r}") from None
    if not (0.5 <= v <= 1.0):
        raise UsageError(f"command line: --keep: must be between 0.5 and 1 (50%..100%), got {s}")
    return v


def parse_reps(spec: Any) -> int:
    """`--reps N`: separate llama-bench runs of every point (a winner needs at least MIN_REPS)."""
    try:
        n = int(str(spec).strip())
    except ValueError:
        raise UsageError(f"command line: --reps: not a whole number: {spec!r}") from None
    if not (1 <= n <= 50):
        raise UsageError(f"command line: --reps: must be between 1 and 50, got {n}")
    return n


@dataclass
class TuneOptions:
    # what is measured
    power: bool = False  # the power sweep instead of batch sizes / splits
    depth: int | None = None  # batch: prompt length (pp<depth>, default 8192); power: KV depth (default 4096)
    reps: int = 3  # separate llama-bench runs of every point
    pairs: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_PAIRS))
    splits: bool = True  # with several GPUs: -ts variants and split modes
    watts: list[float] | None = None  # power: the limits to try (None: each GPU's min .. default)
    keep: float = DEFAULT_KEEP  # power: the knee keeps this share of the best decode t/s
    n_prompt: int = 512  # power: prefill test size
    n_gen: int = 256  # power: decode test size
    bench_reps: int = 2  # power: llama-bench's own -r inside each run (longer power windows)
    gpu_ids: list[int] | None = None  # power: the GPUs to sweep and sample (default: all)
    # how
    service: str = "auto"
    binary: str | None = None
    model: str | None = None
    results_root: str = "results"
    apply: bool = False
    inventory_path: str = "hosts.yaml"
    charts: bool = True
    timeout: float | None = None
    interval: float = 0.2  # power sampling interval (s)

    @property
    def batch_depth(self) -> int:
        return self.depth if self.depth is not None else 8192

    @property
    def power_depth(self) -> int:
        return self.depth if self.depth is not None else 4096


def check_mode(opts: TuneOptions, *, watts: Any = None, keep: Any = None, pairs: Any = None) -> None:
    """Options that only mean something in one mode are refused in the other."""
    if not opts.power and (watts is not None or keep is not None):
        raise UsageError("command line: --watts and --keep need --power")
    if not opts.power and opts.depth is not None and opts.depth < 1:
        raise UsageError("command line: --depth: the batch tune needs a prompt of at least 1 token")
    if opts.power and pairs is not None:
        raise UsageError("command line: --pairs does not go with --power (the power sweep runs at "
                         "the service's flags)")
