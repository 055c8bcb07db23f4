"""`invoke status [--host X | --all] [--watch] [--json]`: the fleet in one table, one row per host.

Each host is read in ONE remote round trip (`remote/rig_status.py`, passed whole to `python3 -c`,
the API key on stdin): systemd state and uptime of llama-server, /health, /metrics (requests,
tokens/s -- llama-server runs with `--metrics`, behind the same key as the API), /props, the
current llama.cpp build and commit, the model commit `current` points at, the GPUs (nvidia-smi:
count, power draw/limit, temperature, memory) and the sha256 of the rendered files. On this machine
that is compared with the host's lock file (`locks/<host>.lock.yaml`): what differs is named in a
word (llama.cpp, model, unit, env, gpu-unit, opencode, power, gpus).

An unreachable host is a row that says why, never a failure of the table. `--watch` redraws the
table (rich Live on a terminal) every `--interval` seconds until Ctrl-C, keeping the SSH sessions
open between refreshes; `--json` prints one object per host for scripts.

Exit status: 0 every host serves, 1 a reachable host does not serve, 3 a host is unreachable.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import remote
from .errors import ConnectError, ExitStatus, RigError
from .facts import gpu as gpu_facts
from .facts import metrics as metrics_facts

SERVICE = "llama-server.service"
PROBE_TIMEOUT_S = 30
COLUMNS = ["host", "service", "up", "health", "build", "model", "drift", "gpus", "power W", "temp",
           "vram GiB", "req", "gen t/s", "tokens"]


def api_key(cfg: dict) -> str | None:
    """The key /metrics and /props need. The one place status reads it (the key's source may move
    to the rig: change it here)."""
    from .steps.service import read_api_key
    return read_api_key(cfg)


# ---------------------------------------------------------------------------------------------
# reading one host


def status_input(cfg: dict, key: str | None) -> str:
    from . import lock as lk
    oc = cfg.get("opencode") or {}
    return json.dumps({
        "port": cfg["server"]["port"], "key": key, "prefix": cfg["paths"]["prefix"],
        "state_dir": cfg["paths"]["state_dir"], "service": SERVICE,
        "files": {"llama-server.service": lk.SERVICE_UNIT, "llama-server.env": lk.SERVICE_ENV,
                  "llama-rig-gpu.service": lk.GPU_UNIT},
        "opencode_user": oc.get("user") if oc.get("enabled") else None,
        "gpu_query": gpu_facts.QUERY, "timeout": 5})


def probe_command() -> str:
    return remote.command("rig_status.py")


def read_raw(target: Any, cfg: dict, key: str | None) -> dict:
    """One round trip: rig_status.py on the rig -> its JSON."""
    from .steps import api_key as auth  # no explicit key: the rig's key file, read there
    r = target.run(auth.keyed(cfg, probe_command()), sudo=True, stdin=status_input(cfg, key) + "\n",
                   check=False, timeout=PROBE_TIMEOUT_S)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1:]
    if not line:
        raise RigError(f"status probe failed (exit {r.exited}): "
                       f"{(r.stderr.strip() or r.stdout.strip() or 'no output')[-200:]}")
    return json.loads(line[0])


# ---------------------------------------------------------------------------------------------
# turning it into a row (pure)


def _dur(s: float | None) -> str:
    if s is None or s < 0:
        return "-"
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def gpu_summary(query: str, temps: str) -> dict[str, Any]:
    """nvidia-smi rows (the facts' query, one parser) + temperatures -> totals for the row."""
    gpus = gpu_facts.parse_query(query) if query.strip() else ()
    t: dict[int, float] = {}
    for ln in temps.splitlines():
        parts = [p.strip() for p in ln.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                t[int(parts[0])] = float(parts[1])
            except ValueError:
                pass

    def total(vals: list) -> float | None:
        vals = [v for v in vals if v is not None]
        return round(sum(vals), 2) if vals else None
    return {"count": len(gpus), "names": sorted({g.name for g in gpus}),
            "power_draw_w": total([g.power_draw for g in gpus]),
            "power_limit_w": total([g.power_limit for g in gpus]),
            "power_limits_w": [g.power_limit for g in gpus],
            "temperature_c_max": max(t.values()) if t else None,
            "temperatures_c": [t.get(g.index) for g in gpus],
            "memory_used_mib": total([g.memory_used_mib for g in gpus]),
            "memory_total_mib": total([g.memory_total_mib for g in gpus])}


DRIFT_WORDS = (("llama_cpp.", "llama.cpp"), ("model.", "model"),
               ("rendered.llama-server.service", "unit"), ("rendered.llama-server.env", "env"),
               ("rendered.llama-rig-gpu.service", "gpu-unit"), ("rendered.opencode.json", "opencode"),
               ("power.", "power"), ("hardware.gpu_count", "gpus"))


def drift(lock_doc: dict | None, seen: dict[str, Any]) -> tuple[str, list[str]]:
    """(words, details): what differs between the host's lock and what was read. `seen` has the
    same dotted keys as a flattened lock (only those status reads)."""
    if lock_doc is None:
        return "no lock", []
    from . import lock as lk
    want = lk.flatten(lock_doc.get("lock") or {})
    details, words = [], []
    for key in sorted(seen):
        if key not in want and not key.startswith("rendered."):
            continue
        a, b = want.get(key), seen[key]
        if a == b or (key.startswith("rendered.") and a is None):
            continue
        details.append(f"{key}: lock {_short(a)} ≠ rig {_short(b)}")
        for prefix, word in DRIFT_WORDS:
            if key.startswith(prefix) and word not in words:
                words.append(word)
    return (", ".join(words) if words else "-"), details


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) >= 40 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    return "null" if v is None else str(v)


def observe(name: str, raw: dict, lock_doc: dict | None) -> dict[str, Any]:
    """The raw probe of one host (+ its lock) -> the status object (JSON-ready)."""
    sd = raw.get("systemd") or {}
    active = sd.get("ActiveState") or "?"
    up = None
    try:
        since = int(sd.get("ActiveEnterTimestampMonotonic") or 0)
        if active == "active" and since:
            up = (int(raw.get("monotonic_us") or 0) - since) / 1e6
    except ValueError:
        pass
    http = raw.get("http") or {}
    hc = (http.get("health") or [0, "", 0])[0]
    mc, mbody = (http.get("metrics") or [0, ""])[:2]
    metrics = metrics_facts.summary(metrics_facts.parse(mbody)) if mc == 200 else {}
    props_build = None
    if (http.get("props") or [0])[0] == 200:
        try:
            props_build = json.loads(http["props"][1]).get("build_info")
        except ValueError:
            pass
    build = raw.get("build") or {}
    info = build.get("info") or {}
    st = raw.get("state") or {}
    model_state = st.get("model") or {}
    model_commit = raw.get("model_current") or (model_state.get("commit") if model_state.get("layout") != "commits" else None)
    g = raw.get("gpus") or {}
    try:
        gpus = gpu_summary(g.get("query") or "", g.get("temps") or "")
    except ValueError as e:
        gpus = {"count": 0, "error": str(e)}
    if g.get("error"):
        gpus["error"] = g["error"]
    seen: dict[str, Any] = {"llama_cpp.commit": info.get("commit"), "llama_cpp.build": build.get("name"),
                            "model.commit": model_commit}
    for role, digest in (raw.get("hashes") or {}).items():
        seen[f"rendered.{role}"] = digest
    if gpus.get("count"):
        seen["power.limits_w"] = gpus["power_limits_w"]
        seen["hardware.gpu_count"] = gpus["count"]
    words, details = drift(lock_doc, seen)
    # nothing there yet (no state, no unit): like the other status tasks, not a failure
    fresh = not st and not sd.get("UnitFileState") and active != "active"
    return {"host": name, "reachable": True, "error": None, "provisioned": not fresh,
            "service": {"state": active, "sub": sd.get("SubState"), "uptime_s": up,
                        "restarts": _int(sd.get("NRestarts")), "enabled": sd.get("UnitFileState")},
            "health": hc, "serving": active == "active" and hc == 200,
            "build": {"name": build.get("name"), "commit": info.get("commit"),
                      "number": info.get("build_number"), "build_info": props_build},
            "model": {"repo": model_state.get("repo"), "commit": model_commit,
                      "recorded": model_state.get("commit"), "previous": model_state.get("previous")},
            "drift": words, "drift_details": details, "gpus": gpus, "metrics": metrics,
            "metrics_http": mc, "box_uptime_s": raw.get("uptime_s"), "owed": st.get("owed") or []}


def unreachable(name: str, why: str) -> dict[str, Any]:
    return {"host": name, "reachable": False, "error": why, "serving": False}


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def row(s: dict[str, Any]) -> list[str]:
    if not s.get("reachable"):
        return [s["host"], "UNREACHABLE"] + ["-"] * (len(COLUMNS) - 2)
    sv, b, m, g, mt = s["service"], s["build"], s["model"], s["gpus"], s["metrics"]
    service = sv["state"] + (f" ({sv['sub']})" if sv.get("sub") and sv["sub"] not in ("running", "dead") else "")
    if s.get("provisioned") is False:
        service = "nothing yet"
    build = (b["name"] or "-") if b["name"] else "-"
    if b.get("commit") and b["name"] and b["commit"][:7] not in b["name"]:
        build += f" ({b['commit'][:7]})"
    gpus = "-" if not g.get("count") else f"{g['count']}"
    power = "-" if g.get("power_draw_w") is None else f"{g['power_draw_w']:.0f}/{_num(g.get('power_limit_w'))}"
    vram = ("-" if g.get("memory_total_mib") is None else
            f"{g['memory_used_mib'] / 1024:.1f}/{g['memory_total_mib'] / 1024:.0f}")
    req = "-" if not mt else f"{_num(mt.get('requests_processing'))}+{_num(mt.get('requests_deferred'))}"
    return [s["host"], service, _dur(sv.get("uptime_s")), str(s["health"] or "-"), build,
            (m["commit"] or "-")[:7], s["drift"], gpus, power, _num(g.get("temperature_c_max"), "{:.0f}°C"),
            vram, req, _num(mt.get("predicted_tokens_seconds"), "{:.1f}") if mt else "-",
            _num(mt.get("tokens_predicted_total")) if mt else "-"]


def exit_status(statuses: Sequence[dict]) -> ExitStatus:
    if any(not s.get("reachable") for s in statuses):
        return ExitStatus.UNREACHABLE
    if any(not s.get("serving") and s.get("provisioned", True) for s in statuses):
        return ExitStatus.FAILED  # (a host with nothing provisioned yet is not broken: exit 0)
    return ExitStatus.OK


# ---------------------------------------------------------------------------------------------
# the fleet


class Fleet:
    """Reads hosts in parallel, each in its own daemon thread (Ctrl-C never waits on a stuck SSH
    session); keeps connections for the next refresh."""

    def __init__(self, hosts: Sequence[Any], factory: Callable[[Any], Any], lock_dir: Path):
        self.hosts = list(hosts)
        self.factory = factory
        self.lock_dir = lock_dir
        self.targets: dict[str, Any] = {}

    def lock_doc(self, name: str) -> dict | None:
        from . import lock as lk
        p = lk.lock_path(name, self.lock_dir)
        if not p.exists():
            return None
        try:
            return lk.load(p)
        except RigError:
            return None

    def one(self, host: Any) -> dict:
        t = self.targets.get(host.name)
        notes = []
        try:
            key = api_key(host.cfg)
        except RigError as e:  # the row still shows what needs no key; the note says why not the rest
            key = None
            notes.append(f"{e} (/metrics and /props not read)")
        try:
            if t is None:
                t = self.targets[host.name] = self.factory(host)
            raw = read_raw(t, host.cfg, key)
        except ConnectError as e:
            self.drop(host.name)
            return unreachable(host.name, str(e))
        except RigError as e:
            self.drop(host.name)
            return unreachable(host.name, str(e))
        except Exception as e:  # noqa: BLE001 - a dropped session mid-read: the row says so
            self.drop(host.name)
            return unreachable(host.name, f"{type(e).__name__}: {e}")
        st = observe(host.name, raw, self.lock_doc(host.name))
        st["notes"] = notes
        return st

    def drop(self, name: str) -> None:
        t = self.targets.pop(name, None)
        if t is not None:
            try:
                t.close()
            except Exception:  # noqa: BLE001
                pass

    def read(self, deadline_s: float = PROBE_TIMEOUT_S + 30) -> list[dict]:
        out: dict[str, dict] = {}

        def work(h: Any) -> None:
            out[h.name] = self.one(h)
        threads = [threading.Thread(target=work, args=(h,), daemon=True) for h in self.hosts]
        for th in threads:
            th.start()
        end = time.monotonic() + deadline_s
        for th in threads:
            th.join(max(0.0, end - time.monotonic()))
        return [out.get(h.name) or unreachable(h.name, f"no answer within {deadline_s:.0f}s") for h in self.hosts]

    def close(self) -> None:
        for name in list(self.targets):
            self.drop(name)


def notes(statuses: list[dict]) -> list[str]:
    """The lines under the table: why a host is unreachable, what drifted."""
    out = []
    for s in statuses:
        if not s.get("reachable"):
            out.append(f"{s['host']}: unreachable: {s.get('error')}")
        elif s.get("provisioned") is False:
            out.append(f"{s['host']}: nothing provisioned yet — run `invoke provision --host {s['host']}`")
        out += [f"{s['host']}: {n}" for n in s.get("notes") or []]
        for d in s.get("drift_details") or []:
            out.append(f"{s['host']}: drift: {d}")
    return out


def render(console: Any, statuses: list[dict], title: str) -> None:
    console.table(title, COLUMNS, [row(s) for s in statuses])
    for ln in notes(statuses):
        console.line(f"  {ln}")


def rich_table(statuses: list[dict], title: str) -> Any:
    from rich.table import Table
    from rich.text import Text
    from .secrets import redact
    t = Table(title=Text(title), caption=Text(redact("\n".join(notes(statuses)))) if notes(statuses) else None)
    for c in COLUMNS:
        t.add_column(Text(c))
    for s in statuses:
        style = "red" if not s.get("reachable") or (not s.get("serving") and s.get("provisioned", True)) else (
            "yellow" if s.get("drift") not in ("-",) else None)
        t.add_row(*[Text(redact(str(v))) for v in row(s)], style=style)
    return t


def pause(seconds: float) -> None:
    """Between two refreshes of --watch (Ctrl-C lands here most of the time)."""
    time.sleep(seconds)


def run(app: Any, host: str | None, all_hosts: bool, *, watch: bool = False, interval: float = 5.0,
        as_json: bool = False) -> ExitStatus:
    from .errors import UsageError
    if watch and not interval >= 0.5:
        raise UsageError(f"command line: --interval: must be at least 0.5 seconds, got {interval:g}")
    hosts = app.hosts(host, all_hosts or not host)
    fleet = Fleet(hosts, app.target_factory, app.lock_dir())
    con = app.console

    def title() -> str:
        return f"status ({time.strftime('%Y-%m-%d %H:%M:%S')})"
    try:
        statuses = fleet.read()
        if not watch:
            if as_json:
                con.line(json.dumps(statuses, indent=2, sort_keys=True))
            else:
                render(con, statuses, title())
            return exit_status(statuses)
    finally:
        if not watch:
            threading.Thread(target=fleet.close, daemon=True).start()  # never wait on a stuck session
    try:
        if con.fancy and not as_json:
            from rich.live import Live
            with Live(rich_table(statuses, title()), console=con.rich, refresh_per_second=4) as live:
                while True:
                    pause(interval)
                    statuses = fleet.read()
                    live.update(rich_table(statuses, title()), refresh=True)
        while True:
            if as_json:
                con.line(json.dumps({"at": time.time(), "hosts": statuses}, sort_keys=True))
            else:
                render(con, statuses, title())
            pause(interval)
            statuses = fleet.read()
    except KeyboardInterrupt:
        return ExitStatus.OK  # --watch runs until Ctrl-C: that is how it ends
    finally:
        threading.Thread(target=fleet.close, daemon=True).start()  # never wait on a stuck session
