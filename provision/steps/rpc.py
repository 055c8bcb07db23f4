"""`rpc`: llama.cpp's RPC backend across boxes (the pure parts are in provision/rpc.py).

On a WORKER (`rpc.bind`): the service user, the tensor cache dir, `llama-rpc-server.service`
(ggml-rpc-server -H <bind> -p <port> [-c], hardened), the nft table where nftables is installed,
enabled and running; restarted when its unit or the build behind `current` changed.

On a MAIN host (`rpc.workers`): every worker is read over SSH (read only) -- its build must be the
main's commit and flags (else the step fails, naming the node, and llama-server is not started);
`llama-rig-rpc-watch.service` is installed; a worker whose rpc server restarted or whose build
changed since llama-server last started owes llama-server a restart.

`gate(ctx)` (called by `steps.service.restart_and_wait` before every start of llama-server) checks
the builds again and waits until every worker accepts a connection from the main host.

A worker provisioned in the same run as its main (`provision --host main,worker` on fresh boxes)
runs first, and the main's rpc step waits for the worker's (provision/peers.py): one run brings up
both.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .. import remote
from .. import rpc, sections
from ..engine import Call, Change, Context, Run, Step, WriteFile
from ..errors import ConnectError, RigError, StepError
from ..facts import host as hostfacts
from ..target import connect, quote

HANDLER = "llama-server.restart"
STATE_KEY = "rpc"


# ---------------------------------------------------------------------------------------------
# worker side


@dataclass
class WorkerObserved:
    build: rpc.Build = field(default_factory=rpc.Build)
    binary_now: str | None = None  # realpath of the rpc server binary under current/
    user_exists: bool = False
    active: bool = False
    enabled: bool = False
    nft: str | None = None  # path of nft, None: nftables not installed
    nft_loaded: bool = False
    cache_owner: str | None = None
    unit_now: str | None = None
    nft_now: str | None = None
    prune_now: str | None = None
    health_now: str | None = None  # the health responder script
    health_unit_now: str | None = None
    health_active: bool = False
    health_enabled: bool = False
    started: dict[str, Any] = field(default_factory=dict)


def _sections(text: str) -> dict[str, list[str]]:
    return {k: [ln.strip() for ln in v] for k, v in sections.split(text).items()}


_first = sections.first


def observe_worker(ctx: Context) -> WorkerObserved:
    cfg = ctx.cfg
    u = cfg["paths"]["service_user"]
    b = rpc.bin_dir(cfg)
    r = ctx.target.run("; ".join([
        rpc.build_script(cfg["paths"]["prefix"]),
        f"echo @@passwd; getent passwd {quote(u)}",
        f"echo @@active; systemctl is-active {rpc.UNIT} 2>/dev/null",
        f"echo @@enabled; systemctl is-enabled {rpc.UNIT} 2>/dev/null",
        f"echo @@hactive; systemctl is-active {rpc.HEALTH_UNIT} 2>/dev/null",
        f"echo @@henabled; systemctl is-enabled {rpc.HEALTH_UNIT} 2>/dev/null",
        "echo @@nft; command -v nft 2>/dev/null || ls /usr/sbin/nft 2>/dev/null",
        f"echo @@nftlist; nft list table inet {rpc.NFT_TABLE} >/dev/null 2>&1 && echo loaded",
        f"echo @@cache; stat -c %U {quote(rpc.cache_dir(cfg))} 2>/dev/null",
        f"echo @@real; for n in {' '.join(rpc.BINARIES)}; do [ -x {quote(b)}/$n ] && readlink -f {quote(b)}/$n && break; done",
        "true"]), sudo=True, check=False)
    build = rpc.parse_build(r.stdout)
    sec = _sections(r.stdout)
    t = ctx.target
    return WorkerObserved(
        build=build, binary_now=_first(sec, "real") or None,
        user_exists=len(_first(sec, "passwd").split(":")) >= 7,
        active=_first(sec, "active") == "active", enabled=_first(sec, "enabled") == "enabled",
        nft=_first(sec, "nft") or None, nft_loaded=_first(sec, "nftlist") == "loaded",
        cache_owner=_first(sec, "cache") or None,
        unit_now=t.read_file(rpc.UNIT_PATH), nft_now=t.read_file(rpc.NFT_PATH),
        prune_now=t.read_file(rpc.prune_path(cfg)),
        health_now=t.read_file(rpc.health_path(cfg)), health_unit_now=t.read_file(rpc.HEALTH_UNIT_PATH),
        health_active=_first(sec, "hactive") == "active", health_enabled=_first(sec, "henabled") == "enabled",
        started=dict(ctx.state.get("rpc_worker", {}) or {}))


def plan_worker(cfg: dict, obs: WorkerObserved, allowed: list[str], restart_fn=None,
                warn=None) -> list[Change]:
    """Worker: observed state in -> changes out (pure)."""
    if not obs.build.commit:
        raise StepError(f"no llama.cpp build under {cfg['paths']['prefix']}/llama.cpp/current: "
                        "run the llama step first")
    binary_name = obs.build.rpc_binary
    if not binary_name:
        raise StepError(f"the llama.cpp build {obs.build.short()} has no ggml-rpc-server or rpc-server "
                        "(set llama_cpp.rpc: true and run the llama step)")
    from .service import create_user_change
    u = cfg["paths"]["service_user"]
    changes: list[Change] = []
    if not obs.user_exists:
        changes.append(create_user_change(cfg))
    cdir = rpc.cache_dir(cfg)
    if obs.cache_owner != u:
        changes.append(Run(f"tensor cache dir {cdir} (owned by {u}, 0700)", commands=[
            f"mkdir -p {quote(cdir)} && chown {quote(u)}: {quote(cdir)} && chmod 0700 {quote(cdir)}"]))
    reasons: list[str] = []
    if cfg["rpc"]["cache"] and cfg["rpc"]["cache_max_gb"]:
        src = remote.source("rpc_cache_prune.py")
        if src != obs.prune_now:
            changes.append(WriteFile(f"cache pruner {rpc.prune_path(cfg)}", path=rpc.prune_path(cfg),
                                     content=src, before=obs.prune_now, mode=0o755))
    unit = rpc.render_worker_unit(cfg, f"{rpc.bin_dir(cfg)}/{binary_name}")
    if unit != obs.unit_now:
        changes.append(WriteFile(f"unit {rpc.UNIT_PATH}", path=rpc.UNIT_PATH, content=unit,
                                 before=obs.unit_now))
        changes.append(Run("systemctl daemon-reload (unit changed)", commands=["systemctl daemon-reload"]))
        reasons.append("unit changed")
    if cfg["rpc"]["firewall"]:
        if obs.nft:
            nft = rpc.render_nft(cfg, allowed)
            if nft != obs.nft_now:
                changes.append(WriteFile(f"nft table {rpc.NFT_TABLE} ({rpc.NFT_PATH}): only "
                                         f"{', '.join(allowed) or 'nobody'} may reach port {cfg['rpc']['port']}",
                                         path=rpc.NFT_PATH, content=nft, before=obs.nft_now))
            if nft != obs.nft_now or not obs.nft_loaded:
                changes.append(Run(f"load nft table {rpc.NFT_TABLE}",
                                   commands=[f"{quote(obs.nft)} -f {quote(rpc.NFT_PATH)}"]))
        elif warn is not None:
            warn(f"rpc: nftables is not installed: port {cfg['rpc']['port']} is protected only by the "
                 f"private bind {cfg['rpc']['bind']} (install nftables to let only the main host in)")
    elif obs.nft and (obs.nft_loaded or obs.nft_now is not None):
        changes.append(Run(f"remove nft table {rpc.NFT_TABLE} (rpc.firewall is off)", commands=[
            f"{quote(obs.nft)} delete table inet {rpc.NFT_TABLE} 2>/dev/null; rm -f {quote(rpc.NFT_PATH)}"]))
    if not obs.enabled:
        changes.append(Run(f"enable {rpc.UNIT}", commands=[f"systemctl enable {rpc.UNIT}"]))
    # the health responder the main host asks (the rpc port itself serves one client at a time)
    hsrc, hunit = remote.source("rpc_health.py"), rpc.render_health_unit(cfg)
    hreasons = []
    if hsrc != obs.health_now:
        changes.append(WriteFile(f"health responder {rpc.health_path(cfg)}", path=rpc.health_path(cfg),
                                 content=hsrc, before=obs.health_now, mode=0o755))
        hreasons.append("helper changed")
    if hunit != obs.health_unit_now:
        changes.append(WriteFile(f"unit {rpc.HEALTH_UNIT_PATH}", path=rpc.HEALTH_UNIT_PATH, content=hunit,
                                 before=obs.health_unit_now))
        changes.append(Run("systemctl daemon-reload (unit changed)", commands=["systemctl daemon-reload"]))
        hreasons.append("unit changed")
    if hreasons or not obs.health_active or not obs.health_enabled:
        changes.append(Run(f"enable and (re)start {rpc.HEALTH_UNIT} on {rpc.health_endpoint(cfg)}", commands=[
            f"systemctl enable {rpc.HEALTH_UNIT} && systemctl restart {rpc.HEALTH_UNIT}"]))
    last = obs.started.get("binary")
    if obs.active and obs.binary_now and last and last != obs.binary_now:
        reasons.append(f"build changed ({_build_of(last)} -> {_build_of(obs.binary_now)})")
    if not obs.active:
        reasons.append("not running")
    if reasons:
        verb = "restart" if obs.active else "start"
        changes.append(Call(f"{verb} {rpc.UNIT} on {rpc.endpoint(cfg)} ({'; '.join(reasons)})",
                            fn=restart_fn, data={"action": verb, "reasons": reasons}))
    return changes


def _build_of(binary: str) -> str:
    return os.path.basename(os.path.dirname(os.path.dirname(binary)))


def restart_worker(ctx: Context, timeout: float = 60) -> None:
    """(Re)start the rpc server and wait until it listens on its endpoint."""
    cfg = ctx.cfg
    port = cfg["rpc"]["port"]
    r = ctx.target.run(f"systemctl reset-failed {rpc.UNIT} 2>/dev/null; systemctl restart {rpc.UNIT}",
                       sudo=True, check=False, timeout=120)
    if not r.ok:
        raise StepError(f"systemctl restart {rpc.UNIT} failed: {(r.stderr or r.stdout).strip()[-200:]}; "
                        "journal:\n" + _journal(ctx))
    t0 = time.monotonic()
    while True:
        ls = ctx.target.run(f"ss -Hltn 'sport = :{int(port)}' 2>/dev/null", check=False).stdout
        if rpc.bare(cfg["rpc"]["bind"]) in ls:
            break
        if time.monotonic() - t0 > timeout:
            raise StepError(f"{rpc.UNIT} does not listen on {rpc.endpoint(cfg)} after {timeout:g}s; "
                            "journal:\n" + _journal(ctx))
        time.sleep(0.5)
    real = ctx.target.run(f"for n in {' '.join(rpc.BINARIES)}; do [ -x {quote(rpc.bin_dir(cfg))}/$n ] && "
                          f"readlink -f {quote(rpc.bin_dir(cfg))}/$n && break; done; true", check=False)
    ctx.say(f"rpc: {rpc.UNIT} listening on {rpc.endpoint(cfg)} after {time.monotonic() - t0:.1f}s")
    if not ctx.check:
        ctx.state.data["rpc_worker"] = {"binary": real.stdout.strip() or None,
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        ctx.state.save()


def _journal(ctx: Context, unit: str = rpc.UNIT, n: int = 20) -> str:
    r = ctx.target.run(f"journalctl -u {unit} -n {int(n)} --no-pager -o cat", sudo=True, check=False)
    return (r.stdout.strip() or r.stderr.strip())[-2000:]


# ---------------------------------------------------------------------------------------------
# main side: the workers seen from the main host


@dataclass
class WorkerView:
    name: str
    endpoint: str
    build: rpc.Build
    invocation: str
    active: str
    gpus: Any = None  # GpuFacts of the worker


def read_worker(host, console, gpus: bool = False) -> WorkerView:
    """A worker's build and rpc unit, read over SSH (read only). StepError when unreachable."""
    try:
        target = connect(host)
    except ConnectError as e:
        raise StepError(f"rpc worker {host.name} is unreachable: {e}") from None
    try:
        wctx = Context(host, target, console, check=True)
        cfg = host.cfg
        r = target.run("; ".join([
            rpc.build_script(cfg["paths"]["prefix"]),
            f"echo @@unit; systemctl show {rpc.UNIT} -p InvocationID -p ActiveState 2>/dev/null",
            "true"]), check=False)
        sec = _sections(r.stdout)
        props = dict(x.split("=", 1) for x in sec.get("unit", []) if "=" in x)
        gf = hostfacts.gpu(wctx) if gpus else None
        if gf is not None and gf.available:
            gf = _count_own_as_free(target, gf)
        return WorkerView(host.name, rpc.endpoint(cfg), rpc.parse_build(r.stdout),
                          props.get("InvocationID", ""), props.get("ActiveState", "") or "unknown", gf)
    except ConnectError as e:
        raise StepError(f"rpc worker {host.name} went away: {e}") from None
    finally:
        try:
            target.close()
        except Exception:  # noqa: BLE001 - closing a dead session may fail any way
            pass


def _count_own_as_free(target, gf):
    """What the worker's own rpc server holds is free for the main's (re)start: the server frees
    its buffers when the main's old connection goes."""
    import dataclasses
    pid = target.run(f"systemctl show -p MainPID --value {rpc.UNIT} 2>/dev/null", check=False).stdout.strip()
    if not pid.isdigit() or pid == "0":
        return gf
    r = target.run("nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits",
                   check=False)
    held: dict[str, int] = {}
    for line in r.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[1] == pid and parts[2].isdigit():
            held[parts[0]] = held.get(parts[0], 0) + int(parts[2])
    if not held:
        return gf
    gpus = tuple(dataclasses.replace(g, memory_used_mib=max(0, (g.memory_used_mib or 0) - held.get(g.uuid, 0)))
                 for g in gf.gpus)
    return dataclasses.replace(gf, gpus=gpus)


def own_build(ctx: Context) -> rpc.Build:
    return rpc.parse_build(ctx.target.run(rpc.build_script(ctx.cfg["paths"]["prefix"]), check=False).stdout)


def check_workers(ctx: Context, gpus: bool = False) -> list[WorkerView]:
    """Read every worker; StepError naming the first node whose build differs from the main's."""
    mine = own_build(ctx)
    views = []
    for w in ctx.host.rpc_workers:
        v = read_worker(w, ctx.console, gpus)
        err = rpc.compare(ctx.host.name, mine, w.name, v.build)
        if err:
            raise StepError(f"rpc: {err} -- llama-server was not (re)started")
        views.append(v)
    return views


def identity(views: list[WorkerView]) -> dict[str, dict[str, str]]:
    return {v.name: {"endpoint": v.endpoint, "build": v.build.name or "", "invocation": v.invocation}
            for v in views}


def changed_workers(recorded: dict, views: list[WorkerView]) -> list[str]:
    """Why llama-server must restart for its workers (pure): rpc servers restarted, builds changed."""
    out = []
    rec = (recorded or {}).get("workers") or {}
    for v in views:
        r = rec.get(v.name)
        if not r:
            continue
        if r.get("build") and r["build"] != (v.build.name or ""):
            out.append(f"worker {v.name} build changed ({r['build']} -> {v.build.name})")
        elif r.get("invocation") and v.invocation and r["invocation"] != v.invocation:
            out.append(f"worker {v.name}: its rpc server restarted")
        elif r.get("endpoint") and r["endpoint"] != v.endpoint:
            out.append(f"worker {v.name} moved to {v.endpoint}")
    return out


def health_endpoints(ctx: Context) -> list[str]:
    return [rpc.health_endpoint(w.cfg) for w in ctx.host.rpc_workers]


def probe_from_main(ctx: Context, endpoints: list[str], wait_s: float = 0) -> dict[str, dict]:
    """Ask each worker's health responder from the main box (the path llama-server uses)."""
    if wait_s:
        r = ctx.target.run(remote.command("rpc_watch.py", "wait", str(int(wait_s)), *endpoints),
                           check=False, timeout=wait_s + 60)
        if r.exited != 0:
            raise StepError(f"rpc: {(r.stderr or r.stdout).strip()[-300:] or 'workers not answering'} "
                            "-- llama-server was not (re)started")
        return {e: {"up": True, "error": ""} for e in endpoints}
    r = ctx.target.run(remote.command("rpc_watch.py", "probe", *endpoints), check=False, timeout=60)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {e: {"up": False, "error": (r.stderr or "no answer").strip()[-100:]} for e in endpoints}


def gate(ctx: Context) -> None:
    """Before llama-server starts on a main host: same builds everywhere, every worker answers.
    Records what it saw (the restart that follows saves it)."""
    if not getattr(ctx.host, "rpc_workers", None):
        return
    last = ctx.facts.get("rpc.gate")
    if last and time.monotonic() - last < 60:
        return  # checked moments ago (the preflight, then the restart)
    views = check_workers(ctx)
    eps = ctx.cfg["rpc"]["endpoints"]
    ctx.say(f"rpc: waiting for {len(eps)} worker(s) ({', '.join(eps)}), at most {ctx.cfg['rpc']['wait_timeout']}s")
    probe_from_main(ctx, health_endpoints(ctx), wait_s=ctx.cfg["rpc"]["wait_timeout"])
    ctx.facts["rpc.gate"] = time.monotonic()
    if not ctx.check:
        ctx.state.data[STATE_KEY] = {"workers": identity(views)}


def plan_main(cfg: dict, views: list[WorkerView], recorded: dict, watch_now: str | None,
              unit_now: str | None, watch_active: bool, service_installed: bool,
              health_eps: list[str]) -> list[Change]:
    """Main: the watcher and the restart owed to changed workers (pure)."""
    changes: list[Change] = []
    src = remote.source("rpc_watch.py")
    reasons = []
    if src != watch_now:
        changes.append(WriteFile(f"worker watcher {rpc.watch_path(cfg)}", path=rpc.watch_path(cfg),
                                 content=src, before=watch_now, mode=0o755))
        reasons.append("helper changed")
    unit = rpc.render_watch_unit(cfg, health_eps)
    if unit != unit_now:
        changes.append(WriteFile(f"unit {rpc.WATCH_UNIT_PATH}", path=rpc.WATCH_UNIT_PATH, content=unit,
                                 before=unit_now))
        changes.append(Run("systemctl daemon-reload (unit changed)", commands=["systemctl daemon-reload"]))
        reasons.append("unit changed")
    if reasons or not watch_active:
        changes.append(Run(f"enable and (re)start {rpc.WATCH_UNIT}", commands=[
            f"systemctl enable {rpc.WATCH_UNIT} && systemctl restart {rpc.WATCH_UNIT}"]))
    why = changed_workers(recorded, views) if service_installed else []
    if why:
        changes.append(Call(f"llama-server must restart: {'; '.join(why)}", fn=lambda c: None,
                            data={"action": "owe-restart", "reasons": why}, notify=(HANDLER,)))
    return changes


class RpcStep(Step):
    name = "rpc"
    title = "llama.cpp RPC: worker units, nft table; the main's workers checked"

    def plan(self, ctx: Context) -> list[Change]:
        cfg = ctx.cfg
        if rpc.is_worker(cfg):
            obs = observe_worker(ctx)
            if not obs.build.commit and ctx.check:
                return [Call(f"install and start {rpc.UNIT} once llama.cpp is built",
                             data={"action": "pending"})]
            allowed = [rpc.main_address(m.cfg) for m in ctx.host.rpc_mains if rpc.main_address(m.cfg)]
            return plan_worker(cfg, obs, allowed, restart_worker, ctx.warn)
        if ctx.host.rpc_workers:
            if ctx.peers is not None:  # workers provisioned in this same run: their rpc step first
                ctx.peers.wait_step([w.name for w in ctx.host.rpc_workers], self.name, lambda hosts: ctx.say(
                    f"rpc: waiting for {', '.join(hosts)} (provisioned in this run) to finish its rpc step"))
            if ctx.check and not ctx.target.exists(f"{rpc.bin_dir(cfg)}/llama-server"):
                return [Call("check the RPC workers once llama.cpp is built", data={"action": "pending"})]
            try:
                views = check_workers(ctx)
            except StepError as e:
                if not ctx.check:
                    raise
                return [Call(f"llama-server cannot start yet: {e}", data={"action": "blocked", "reason": str(e)})]
            for v in views:
                ctx.say(f"rpc: worker {v.name} {v.endpoint}: {v.build.short()}, {rpc.UNIT} {v.active}")
            r = ctx.target.run(f"systemctl is-active {rpc.WATCH_UNIT} 2>/dev/null", check=False)
            return plan_main(cfg, views, ctx.state.get(STATE_KEY) or {},
                             ctx.target.read_file(rpc.watch_path(cfg)),
                             ctx.target.read_file(rpc.WATCH_UNIT_PATH), r.stdout.strip() == "active",
                             ctx.target.exists("/etc/systemd/system/llama-server.service"),
                             health_endpoints(ctx))
        return []


# ---------------------------------------------------------------------------------------------
# status and the VRAM preflight across boxes


def status_rows(ctx: Context) -> tuple[list[list[str]], list[str]]:
    """Rows for `service.status` on a main host (one per worker) and the problems found."""
    if not getattr(ctx.host, "rpc_workers", None):
        return [], []
    eps = health_endpoints(ctx)
    live = probe_from_main(ctx, eps)
    watched: dict = {}
    try:
        watched = json.loads(ctx.target.read_file(rpc.WATCH_STATE) or "{}").get("workers") or {}
    except (ValueError, AttributeError, RigError):
        watched = {}
    rows, problems = [], []
    mine = own_build(ctx)
    mine_c = (mine.name or "").split("-")[1] if (mine.name or "").count("-") >= 2 else None
    for w, ep, rep_ep in zip(ctx.host.rpc_workers, eps, ctx.cfg["rpc"]["endpoints"]):
        st = live.get(ep) or {"up": False, "error": "not probed"}
        since = (watched.get(ep) or {}).get("since")
        when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if since and \
            (watched.get(ep) or {}).get("up") == st["up"] else ""
        wb = st.get("build") or ""
        if st["up"] and mine_c and wb.count("-") >= 2 and wb.split("-")[1] != mine_c:
            rows.append([f"rpc worker {w.name}", f"{rep_ep} up{when}, build {wb}: VERSION SKEW"])
            problems.append(f"rpc worker {w.name} ({rep_ep}) runs build {wb} but {ctx.host.name} runs "
                            f"{mine.name}: every node must run the same commit")
        elif st["up"]:
            rows.append([f"rpc worker {w.name}", f"{rep_ep} up{when}, build {wb or '?'}"])
        else:
            rows.append([f"rpc worker {w.name}", f"{rep_ep} DOWN: {st.get('error') or 'no answer'}{when}"])
            problems.append(f"rpc worker {w.name} ({rep_ep}) is not serving for {ctx.host.name}: "
                            f"{st.get('error') or 'no answer'}")
    return rows, problems


def worker_status(ctx: Context) -> bool:
    """`service.status` on a worker: its rpc unit and whether it listens."""
    cfg = ctx.cfg
    r = ctx.target.run(f"systemctl show {rpc.UNIT} -p ActiveState -p SubState -p NRestarts "
                       f"-p ActiveEnterTimestamp -p UnitFileState; echo @@ss; "
                       f"ss -Hltn 'sport = :{int(cfg['rpc']['port'])}' 2>/dev/null", check=False)
    sec = sections.split("@@props\n" + r.stdout, ("props", "ss"))
    head, ss = "\n".join(sec["props"]), "\n".join(sec["ss"])
    props = dict(x.split("=", 1) for x in head.splitlines() if "=" in x)
    listening = rpc.bare(cfg["rpc"]["bind"]) in ss
    rows = [["unit", f"{rpc.UNIT} {props.get('ActiveState') or '-'} ({props.get('SubState') or '-'}), "
                     f"{props.get('UnitFileState') or '-'}"],
            ["since / restarts", f"{props.get('ActiveEnterTimestamp') or '-'} / {props.get('NRestarts') or '-'}"],
            ["endpoint", f"{rpc.endpoint(cfg)} " + ("listening" if listening else "NOT listening")],
            ["main host(s)", ", ".join(m.name for m in ctx.host.rpc_mains) or "-"]]
    ctx.console.table(f"rpc worker: {ctx.host.name}", ["what", "value"], rows)
    if props.get("ActiveState") != "active" or not listening:
        raise StepError(f"{rpc.UNIT} is not serving on {rpc.endpoint(cfg)}; journal:\n" + _journal(ctx))
    return False


def remote_devices(ctx: Context) -> list[rpc.RemoteDevice]:
    """The devices the workers expose, in llama.cpp's order, with free MiB from their nvidia-smi."""
    out: list[rpc.RemoteDevice] = []
    for w in ctx.host.rpc_workers:
        v = read_worker(w, ctx.console, gpus=True)
        gf = v.gpus
        gpus = list(gf.gpus) if gf is not None and gf.available else []
        pick = w.cfg["rpc"]["gpus"]
        if pick:
            gpus = [g for g in gpus if str(g.index) in pick]
        if not gpus:
            out.append(rpc.RemoteDevice(w.name, f"{w.name} CPU", None))
        for g in gpus:
            free = (g.memory_total_mib or 0) - (g.memory_used_mib or 0)
            out.append(rpc.RemoteDevice(w.name, f"{w.name} GPU {g.index} ({g.name})", free))
    return out


def preflight_remote(ctx: Context, devices: dict[str, tuple[int, int, int]], margin: int) -> None:
    """The VRAM preflight for the workers' devices: llama-fit-params (run with --rpc) estimates
    each RPC device; each worker GPU's free memory comes from its own nvidia-smi."""
    if not getattr(ctx.host, "rpc_workers", None) or not rpc.remote_rows(devices):
        return
    rep = rpc.check_remote_fit(devices, remote_devices(ctx), margin)
    ctx.console.table(f"VRAM preflight: RPC workers of {ctx.host.name} (MiB, margin {margin})",
                      ["device", "model", "context", "compute", "total", "free", "fit"], rep.rows)
    if not rep.ok:
        raise StepError("VRAM preflight: the plan does not fit on the RPC workers — "
                        + "; ".join(rep.problems) + " (change server.tensor_split: the workers' devices "
                        "come first; llama-server was not restarted)")
