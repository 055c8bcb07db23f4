"""llama-bench command lines from the service's configuration (`server` section of the inventory).

llama-bench spells some flags differently from llama-server: `-ts` values are joined with `/`
(a comma would start a sweep) and `-fa` takes 1/0 instead of on/off/auto.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import UsageError

DEFAULT_DEPTHS = (4096, 8192, 16384, 32768, 65536, 131072, 198000)
SEED_BATCH = 2048  # llama.cpp defaults the seed ran with (it never set -b/-ub)
SEED_UBATCH = 512


def fmt_num(x: float) -> str:
    """0.9 -> "0.9", 1.0 -> "1" (how the seed writes its -ts)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:g}"


def ts_arg(tensor_split: Sequence[float] | None) -> str | None:
    """llama-bench's -ts: values joined with '/' (a comma would start a sweep)."""
    if not tensor_split:
        return None
    return "/".join(fmt_num(v) for v in tensor_split)


def fa_arg(flash_attn: str) -> str:
    """llama-server's on/off/auto -> llama-bench's 1/0. `auto` turns FA on wherever it can, and a
    quantized V cache (the seed's q8_0) needs it, so auto benches as 1 (the seed's `-fa 1`)."""
    return "0" if flash_attn == "off" else "1"


@dataclass
class BenchFlags:
    """The llama-bench flags that come from the service's configuration (+ tune's overrides)."""

    n_gpu_layers: int = 999
    split_mode: str = "layer"
    tensor_split: list[float] | None = None
    flash_attn: str = "auto"
    cache_type_k: str = "q8_0"
    cache_type_v: str = "q8_0"
    batch_size: int | None = None
    ubatch_size: int | None = None
    rpc: str | None = None  # `--rpc w1:50052,...`: the main host's RPC workers (provision/rpc.py)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "BenchFlags":
        s = cfg["server"]
        return cls(n_gpu_layers=s["n_gpu_layers"], split_mode=s["split_mode"],
                   tensor_split=list(s["tensor_split"]) if s["tensor_split"] else None,
                   flash_attn=s["flash_attn"], cache_type_k=s["cache_type_k"],
                   cache_type_v=s["cache_type_v"], batch_size=s["batch_size"],
                   ubatch_size=s["ubatch_size"],
                   rpc=",".join((cfg.get("rpc") or {}).get("endpoints") or []) or None)

    def but(self, **changes: Any) -> "BenchFlags":
        """A copy with some flags changed (tune's candidates)."""
        return BenchFlags(**{**self.__dict__, **changes})

    def describe(self) -> str:
        return " ".join(self.argv())

    def argv(self) -> list[str]:
        out = ["-ngl", str(self.n_gpu_layers), "-sm", self.split_mode]
        if self.rpc:
            out += ["--rpc", self.rpc]
        ts = ts_arg(self.tensor_split)
        if ts:
            out += ["-ts", ts]
        out += ["-fa", fa_arg(self.flash_attn), "-ctk", self.cache_type_k, "-ctv", self.cache_type_v]
        if self.batch_size:
            out += ["-b", str(self.batch_size)]
        if self.ubatch_size:
            out += ["-ub", str(self.ubatch_size)]
        return out


def bench_argv(binary: str, model: str, flags: BenchFlags, *, depths: Sequence[int],
               n_prompt: int = 512, n_gen: int = 128, reps: int = 3,
               output: str = "jsonl", progress: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """`llama-bench -m M -ngl .. -sm .. -ts a/b/c -fa 1 -ctk .. -ctv .. [-b -ub] -p -n -d -r -o`."""
    if not depths:
        raise UsageError("bench: no depths given")
    argv = [binary, "-m", model, *flags.argv(), "-p", str(n_prompt), "-n", str(n_gen),
            "-d", ",".join(str(int(d)) for d in depths), "-r", str(reps), "-o", output]
    if progress:
        argv.append("--progress")
    return argv + list(extra)


def parse_depths(spec: str | Sequence[int] | None) -> list[int]:
    """"4096,8192,16K,198000" -> [4096, 8192, 16384, 198000] (K = 1024)."""
    if spec is None or spec == "":
        return list(DEFAULT_DEPTHS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int] = []
    for it in items:
        s = str(it).strip()
        if not s:
            continue
        m = re.fullmatch(r"(\d+)\s*([kK]?)", s)
        if not m:
            raise UsageError(f"command line: --depths: not a token count: {s!r}")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise UsageError("command line: --depths: empty")
    return out


def parse_count(spec: Any, option: str, minimum: int = 1, maximum: int = 1_000_000) -> int:
    """A whole number from the command line (`--reps 3`), else one UsageError line."""
    try:
        n = int(str(spec).strip())
    except ValueError:
        raise UsageError(f"command line: --{option}: not a whole number: {spec!r}") from None
    if n < minimum or n > maximum:
        raise UsageError(f"command line: --{option}: must be between {minimum} and {maximum}, got {n}")
    return n
