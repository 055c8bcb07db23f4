"""llama.cpp's RPC backend: one model across boxes (pure parts; the step is steps/rpc.py).

A WORKER (a host with `rpc.bind`) runs `ggml-rpc-server` (`rpc-server` in older trees) as the
systemd unit `llama-rpc-server.service`, bound to that private address, with the tensor cache
(`-c`, under `rpc.cache_dir`, pruned to `rpc.cache_max_gb` at each start) and, where nftables is
installed, the nft table `llama_rig_rpc` that lets only its main host(s) reach the port (the RPC
server has no authentication at all).

A MAIN host (`rpc.workers`) gets `--rpc w1:50052,w2:50052` on llama-server's command line; llama.cpp
puts the RPC devices FIRST in its device list, so `server.tensor_split` names the workers' devices
(in `rpc.workers` order, each worker's exposed GPUs in order; a CPU-only worker is one device) and
then the local GPUs. Every node must run the same llama.cpp commit and build flags (`compare`); the
main's llama-server starts only once every worker answers (`steps.rpc.gate`), and
`llama-rig-rpc-watch.service` restarts it when a worker that went away is back.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

UNIT = "llama-rpc-server.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
WATCH_UNIT = "llama-rig-rpc-watch.service"
WATCH_UNIT_PATH = f"/etc/systemd/system/{WATCH_UNIT}"
WATCH_STATE = "/run/llama-rig-rpc/workers.json"
HEALTH_UNIT = "llama-rig-rpc-health.service"
HEALTH_UNIT_PATH = f"/etc/systemd/system/{HEALTH_UNIT}"
NFT_TABLE = "llama_rig_rpc"
NFT_PATH = "/etc/llama-rig/rpc.nft"
BINARIES = ("ggml-rpc-server", "rpc-server")  # new name first
GPU_UNIT = "llama-rig-gpu.service"
SERVER_UNIT = "llama-server.service"
# cmake arguments that may differ between nodes: the GPU architectures of each box, and the build
# number/commit passed for shallow clones (they follow from the commit, which is compared)
_NODE_ARGS = ("-DCMAKE_CUDA_ARCHITECTURES=", "-DLLAMA_BUILD_NUMBER=", "-DLLAMA_BUILD_COMMIT=")


def is_worker(cfg: dict) -> bool:
    return bool(cfg["rpc"]["bind"])


def is_main(cfg: dict) -> bool:
    return bool(cfg["rpc"]["workers"])


def bare(addr: str) -> str:
    return addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr


def endpoint(cfg: dict) -> str:
    """`10.0.0.2:50052` / `[fd00::2]:50052` of a worker."""
    a = bare(cfg["rpc"]["bind"])
    return f"[{a}]:{cfg['rpc']['port']}" if ":" in a else f"{a}:{cfg['rpc']['port']}"


def health_endpoint(cfg: dict) -> str:
    """The worker's health responder (remote/rpc_health.py): the same address, the rpc port + 1."""
    a = bare(cfg["rpc"]["bind"])
    port = health_port(cfg)
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


def health_port(cfg: dict) -> int:
    p = cfg["rpc"]["port"]
    return p + 1 if p < 65535 else p - 1


def rpc_arg(endpoints: list[str]) -> str:
    return ",".join(endpoints)


def worker_devices(cfg: dict) -> int:
    """How many devices a worker exposes: its rpc.gpus, else its gpus.count, else one CPU."""
    if cfg["rpc"]["gpus"]:
        return len(cfg["rpc"]["gpus"])
    return cfg["gpus"]["count"] or 1


def cache_dir(cfg: dict) -> str:
    return cfg["rpc"]["cache_dir"] or f"{cfg['paths']['state_dir']}/rpc-cache"


def bin_dir(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/llama.cpp/current/bin"


def prune_path(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/bin/llama-rig-rpc-prune"


def health_path(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/bin/llama-rig-rpc-health"


def watch_path(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/bin/llama-rig-rpc-watch"


def worker_home(cfg: dict) -> str:
    return f"{cfg['paths']['state_dir']}/home"


# ---------------------------------------------------------------------------------------------
# the inventory: main hosts and their workers


def link_hosts(hosts: dict, groups: dict[str, list[str]], fname: str) -> None:
    """rpc.workers (host or group names) -> Host.rpc_workers / Host.rpc_mains, checked; the derived
    cfg["rpc"]["endpoints"] (what --rpc gets). Called by inventory.from_data once every host is
    merged; every problem is one InventoryError line (exit 2)."""
    from . import values
    from .errors import InventoryError
    from .inventory import _did_you_mean
    from .values import cut
    for h in hosts.values():
        where = f"{fname}: host {h.name!r}"
        rpc, lc = h.cfg["rpc"], h.cfg["llama_cpp"]
        if (rpc["workers"] or rpc["bind"]) and not lc["rpc"]:
            raise InventoryError(f"{where}: {'rpc.workers' if rpc['workers'] else 'rpc.bind'}: needs "
                                 "llama_cpp.rpc: true (the build needs GGML_RPC=ON)")
        if rpc["workers"] and rpc["bind"]:
            raise InventoryError(f"{where}: rpc.bind: a main host (rpc.workers) is not a worker itself")
        for w in rpc["workers"]:
            names = groups.get(w, [w] if w in hosts else None)
            if names is None:
                raise InventoryError(f"{where}: rpc.workers: unknown host or group {cut(w)}"
                                     + _did_you_mean(w, [*hosts, *groups]))
            for n in names:
                wk = hosts[n]
                if n == h.name:
                    raise InventoryError(f"{where}: rpc.workers: {n!r} is this host itself")
                if not wk.cfg["rpc"]["bind"]:
                    raise InventoryError(f"{fname}: host {n!r}: rpc.bind: required on a worker of "
                                         f"{h.name!r} (a private address of {n!r})")
                if wk not in h.rpc_workers:
                    h.rpc_workers.append(wk)
                    wk.rpc_mains.append(h)
        if h.rpc_workers:
            rpc["endpoints"] = [endpoint(w.cfg) for w in h.rpc_workers]  # derived, not a key
            ts, n = h.cfg["server"]["tensor_split"], h.cfg["gpus"]["count"]
            want = sum(worker_devices(w.cfg) for w in h.rpc_workers) + n
            if ts is not None and len(ts) != want:
                raise InventoryError(
                    f"{where}: server.tensor_split: has {len(ts)} values but the workers expose "
                    f"{want - n} device(s) and gpus.count is {n}: list the workers' devices first "
                    f"(rpc.workers order), then the local GPUs ({want} values)")
        if rpc["workers"] and not rpc["address"] and any(w.cfg["rpc"]["firewall"] for w in h.rpc_workers):
            addr = h.cfg["connection"]["address"]
            if h.is_local or not addr or values.rpc_address(addr):
                raise InventoryError(f"{where}: rpc.address: required on a main host whose "
                                     "connection.address is not a private IP address (the workers "
                                     "let only this address in)")


# ---------------------------------------------------------------------------------------------
# rendered files


def worker_argv(cfg: dict, binary: str) -> list[str]:
    r = cfg["rpc"]
    argv = [binary, "-H", bare(r["bind"]), "-p", str(r["port"])]
    if r["cache"]:
        argv.append("-c")
    return argv


def render_worker_unit(cfg: dict, binary: str) -> str:
    from .templates import render
    r, p = cfg["rpc"], cfg["paths"]
    cap = int(r["cache_max_gb"] * 1e9)
    return render("llama-rpc-server.service.j2", endpoint=endpoint(cfg), firewall=r["firewall"],
                  nft_table=NFT_TABLE, gpu_unit=GPU_UNIT, user=p["service_user"],
                  group=p["service_user"], workdir=worker_home(cfg), cache_dir=cache_dir(cfg),
                  visible_devices=",".join(r["gpus"]),
                  prune_argv=["/usr/bin/python3", prune_path(cfg), cache_dir(cfg), str(cap)]
                  if r["cache"] and cap else [],
                  argv=worker_argv(cfg, binary))


def render_nft(cfg: dict, allowed: list[str]) -> str:
    """The worker's nft table: `allowed` (the main hosts' addresses) may reach the port."""
    from .templates import render
    a4 = sorted({bare(a) for a in allowed if ipaddress.ip_address(bare(a)).version == 4})
    a6 = sorted({bare(a) for a in allowed if ipaddress.ip_address(bare(a)).version == 6})
    loop = ipaddress.ip_address(bare(cfg["rpc"]["bind"])).is_loopback
    return render("llama-rig-rpc.nft.j2", table=NFT_TABLE,
                  port=f"{{ {cfg['rpc']['port']}, {health_port(cfg)} }}",
                  allow_loopback=loop, allow4=a4, allow6=a6)


def render_health_unit(cfg: dict) -> str:
    from .templates import render
    p = cfg["paths"]
    return render("llama-rig-rpc-health.service.j2", endpoint=health_endpoint(cfg), rpc_unit=UNIT,
                  user=p["service_user"], group=p["service_user"],
                  argv=["/usr/bin/python3", health_path(cfg), bare(cfg["rpc"]["bind"]), str(health_port(cfg)),
                        UNIT, f"{cfg['paths']['prefix']}/llama.cpp/current", str(cfg["rpc"]["port"])])


def main_address(main_cfg: dict) -> str:
    """Where a worker sees its main host come from (inventory checked that one is set)."""
    return main_cfg["rpc"]["address"] or main_cfg["connection"]["address"]


def render_watch_unit(cfg: dict, endpoints: list[str]) -> str:
    """`endpoints`: the workers' health responders (health_endpoint)."""
    from .templates import render
    return render("llama-rig-rpc-watch.service.j2",
                  argv=["/usr/bin/python3", watch_path(cfg), "watch", WATCH_STATE, SERVER_UNIT,
                        f"{cfg['paths']['prefix']}/llama.cpp/current", *endpoints])


# ---------------------------------------------------------------------------------------------
# build identity: the same commit and flags on every node


@dataclass(frozen=True)
class Build:
    """What a node's `current` llama.cpp build is (from its llama-rig-build.json)."""

    name: str | None = None
    commit: str | None = None
    args: tuple[str, ...] = ()
    binaries: frozenset[str] = frozenset()

    @property
    def rpc_binary(self) -> str | None:
        return next((b for b in BINARIES if b in self.binaries), None)

    def flags(self) -> tuple[str, ...]:
        return tuple(a for a in self.args if not a.startswith(_NODE_ARGS))

    def short(self) -> str:
        return f"{self.name or '?'} (commit {(self.commit or '?')[:12]})"


def build_script(prefix: str) -> str:
    from .target import quote
    cur = quote(f"{prefix}/llama.cpp/current")
    return "; ".join([
        f"echo @@name; readlink {cur} 2>/dev/null",
        f"echo @@info; cat {cur}/llama-rig-build.json 2>/dev/null; echo",
        f"echo @@bin; ls -1 {cur}/bin 2>/dev/null",
        "true"])


def parse_build(output: str) -> Build:
    sec: dict[str, list[str]] = {}
    cur = None
    for line in output.splitlines():
        if line in ("@@name", "@@info", "@@bin"):
            cur = line[2:]
            sec[cur] = []
        elif cur:
            sec[cur].append(line)
    name = next((x.strip().rstrip("/").split("/")[-1] for x in sec.get("name", []) if x.strip()), None)
    try:
        info = json.loads("\n".join(sec.get("info", [])).strip() or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    args = info.get("cmake_args") or []
    return Build(name, info.get("commit") or None,
                 tuple(str(a) for a in args) if isinstance(args, list) else (),
                 frozenset(x.strip() for x in sec.get("bin", []) if x.strip()))


def compare(main_name: str, main: Build, worker_name: str, worker: Build) -> str | None:
    """None when the two builds can work together, else one line saying which node differs."""
    if not worker.commit:
        return f"worker {worker_name} has no llama.cpp build (provision it first)"
    if not main.commit:
        return f"{main_name} has no llama.cpp build"
    if worker.commit != main.commit:
        return (f"version skew: worker {worker_name} runs llama.cpp {worker.short()} but "
                f"{main_name} runs {main.short()}; every node must run the same commit "
                f"(provision {worker_name} with the same llama_cpp.ref)")
    if worker.flags() != main.flags():
        a, b = set(main.flags()), set(worker.flags())
        diff = sorted(b - a) + [f"no {x}" for x in sorted(a - b)]
        return (f"build flags differ: worker {worker_name} was built with {', '.join(diff) or 'another order'}"
                f" ({worker.short()}) unlike {main_name}; every node must use the same flags")
    if not worker.rpc_binary:
        return f"worker {worker_name}: its build {worker.short()} has no ggml-rpc-server (llama_cpp.rpc)"
    return None


# ---------------------------------------------------------------------------------------------
# the VRAM preflight across boxes


@dataclass
class RemoteDevice:
    worker: str
    label: str  # "w1 GPU 0 (NVIDIA H100)" / "w1 CPU"
    free_mib: int | None  # None: host memory (not checked here)


@dataclass
class RemoteFit:
    ok: bool = True
    rows: list[list[Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def remote_rows(devices: dict[str, tuple[int, int, int]]) -> list[tuple[str, tuple[int, int, int]]]:
    """The RPC devices of a llama-fit-params report, in its order (not CUDAn, not Host/CPU)."""
    return [(d, v) for d, v in devices.items()
            if not (d.startswith("CUDA") and d[4:].isdigit()) and d not in ("Host", "CPU")
            and "RPC" in d.upper()]


def check_remote_fit(devices: dict[str, tuple[int, int, int]], remote: list[RemoteDevice],
                     margin: int) -> RemoteFit:
    """llama-fit-params' estimate for the RPC devices against each worker GPU's free memory."""
    rep = RemoteFit()
    rows = remote_rows(devices)
    for i, (dev, (m, c, k)) in enumerate(rows):
        need = m + c + k
        rd = remote[i] if i < len(remote) else None
        if rd is None or rd.free_mib is None:
            rep.rows.append([dev, m, c, k, need, "-", rd.label if rd else "?"])
            continue
        fits = need + margin <= rd.free_mib
        rep.rows.append([dev, m, c, k, need, rd.free_mib, ("ok " if fits else "DOES NOT FIT ") + rd.label])
        if not fits:
            rep.ok = False
            rep.problems.append(f"{rd.label}: needs {need} MiB (model {m} + context {c} + compute {k}) + "
                                f"{margin} MiB margin but only {rd.free_mib} MiB are free")
    return rep
