"""`service`: llama-server as a systemd system unit run by a dedicated unprivileged user.

Files: the unit `/etc/systemd/system/llama-server.service` (hardened: read-only system, no home,
private /tmp, only the NVIDIA devices) and the env file `/etc/llama-rig/llama-server.env` (0600),
both rendered from templates/, a readiness helper `<prefix>/bin/llama-rig-health` that the
unit's ExecStartPost= runs until /health (open without the key) answers 200, and the API key
file `/etc/llama-rig/api-key` (api_key.py: made on the rig, passed as --api-key-file).

Restarts: only when the unit, the env file, the binary (`current` moved; the llama step notifies
`llama-server.restart`) or the model changed. The engine persists the notified handler as "owed"
before a change is applied, so a run that fails before the restart restarts next time. When this
step (re)starts the server itself it marks the handler paid — one restart per run, never two.
Before a (re)start the VRAM preflight (llama-fit-params) checks the -ts plan against each GPU's
free memory; after it, /health must be 200 and one real chat completion must answer.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .. import sections, values
from ..engine import Call, Change, Context, Run, Step, WriteFile
from ..errors import CommandError, StepError, UsageError
from ..target import join, quote
from . import api_key as auth
from .vram_preflight import preflight  # the service step's own, before every (re)start

SERVICE = "llama-server.service"
UNIT_PATH = f"/etc/systemd/system/{SERVICE}"
ENV_DIR = "/etc/llama-rig"
ENV_PATH = f"{ENV_DIR}/llama-server.env"
GPU_UNIT = "llama-rig-gpu.service"
HANDLER = "llama-server.restart"


# ---------------------------------------------------------------------------------------------
# paths


def binary_path(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/llama.cpp/current/bin/llama-server"


def fit_params_path(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/llama.cpp/current/bin/llama-fit-params"


def helper_path(cfg: dict) -> str:
    return f"{cfg['paths']['prefix']}/bin/llama-rig-health"


def user_home(cfg: dict) -> str:
    return f"{cfg['paths']['state_dir']}/home"


def health_url(cfg: dict) -> str:
    return f"http://127.0.0.1:{cfg['server']['port']}/health"


# ---------------------------------------------------------------------------------------------
# the command line (pure)


def _num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1:
        return str(int(x))
    return str(x)


def _ts(values: list[float]) -> str:
    return ",".join(str(int(v)) if float(v).is_integer() else repr(float(v)) for v in values)


def _attn_batch_flags(s: dict) -> list[str]:
    """-fa (when not auto), -b, -ub: shared by the server and its fit-params preflight."""
    out = ["-fa", s["flash_attn"]] if s["flash_attn"] != "auto" else []
    if s["batch_size"]:
        out += ["-b", str(s["batch_size"])]
    if s["ubatch_size"]:
        out += ["-ub", str(s["ubatch_size"])]
    return out


def _rpc_flags(cfg: dict) -> list[str]:
    """`--rpc w1:50052,w2:50052` on a main host with RPC workers (provision/rpc.py)."""
    eps = (cfg.get("rpc") or {}).get("endpoints")
    return ["--rpc", ",".join(eps)] if eps else []


def server_argv(cfg: dict, model_path: str, binary: str) -> list[str]:
    """The rendered llama-server command line: every seed flag mapped from the inventory.
    Used by the unit's ExecStart= and, without systemd, for GPU proofs."""
    s = cfg["server"]
    argv = [binary, "-m", model_path, "--host", s["host"], "--port", str(s["port"]),
            "-ngl", str(s["n_gpu_layers"]), "-c", str(s["ctx_size"]),
            "-ctk", s["cache_type_k"], "-ctv", s["cache_type_v"],
            "--parallel", str(s["parallel"]), "--split-mode", s["split_mode"]]
    argv += _rpc_flags(cfg)
    if s["tensor_split"]:
        argv += ["-ts", _ts(s["tensor_split"])]
    if not s["warmup"]:
        argv.append("--no-warmup")
    argv += ["--temp", _num(s["temp"]), "--top-p", _num(s["top_p"]), "--top-k", str(s["top_k"]),
             "--min-p", _num(s["min_p"])]
    argv.append("--jinja" if s["jinja"] else "--no-jinja")
    if s["alias"]:
        argv += ["--alias", s["alias"]]
    # /metrics behind the API's bind and key; /slots off unless asked (it shows the prompts)
    argv += (["--metrics"] if s["metrics"] else []) + ([] if s["slots"] else ["--no-slots"])
    argv += auth.server_args(cfg)  # --api-key-file PATH: the key is in neither argv nor env
    argv += _attn_batch_flags(s)
    argv += list(s["extra_args"])
    return argv


def fit_params_argv(cfg: dict, model_path: str, binary: str) -> list[str]:
    """llama-fit-params with the memory-relevant flags of server_argv and `-fitp on`."""
    s = cfg["server"]
    argv = [binary, "-m", model_path, "-c", str(s["ctx_size"]), "-ctk", s["cache_type_k"],
            "-ctv", s["cache_type_v"], "-ngl", str(s["n_gpu_layers"]), "-sm", s["split_mode"]]
    argv += _rpc_flags(cfg)
    if s["tensor_split"]:
        argv += ["-ts", _ts(s["tensor_split"])]
    argv += _attn_batch_flags(s)
    argv += ["-fitp", "on"]
    return argv


# ---------------------------------------------------------------------------------------------
# rendered files (pure)


def render_unit(cfg: dict, model_path: str, binary: str | None = None) -> str:
    from ..templates import render
    s, p = cfg["server"], cfg["paths"]
    return render(
        "llama-server.service.j2", alias=s["alias"] or "llama-server", model_path=model_path,
        gpu_unit=GPU_UNIT, user=p["service_user"], group=p["service_user"],
        workdir=user_home(cfg), env_file=ENV_PATH,
        argv=server_argv(cfg, model_path, binary or binary_path(cfg)),
        health_argv=[helper_path(cfg), health_url(cfg), str(s["start_timeout"])],
        start_timeout=s["start_timeout"], restart_sec=10, limit_nofile=65536,
        start_limit_interval=max(600, s["start_timeout"] * 3), start_limit_burst=5,
        protect_home=protect_home(model_path, user_home(cfg), p["prefix"]))


def protect_home(*paths: str) -> str:
    """ProtectHome=yes hides /home, /root and /run/user; a model, prefix or state dir kept there
    needs read-only (its home stays writable through ReadWritePaths=)."""
    homes = ("/home", "/root", "/run/user")
    return "read-only" if any(x == h or x.startswith(h + "/") for x in paths for h in homes) else "yes"


def render_env() -> str:
    from ..templates import render
    return render("llama-server.env.j2")


def render_helper(cfg: dict) -> str:
    from ..templates import render
    return render("llama-rig-health.sh.j2", python="/usr/bin/python3",
                  default_timeout=cfg["server"]["start_timeout"])


read_api_key = auth.read_control_key  # the explicit key (server.api_key_file), else None


# ---------------------------------------------------------------------------------------------
# what the box has now


@dataclass
class Observed:
    user_exists: bool = False
    user_home: str | None = None
    user_shell: str | None = None
    unit_now: str | None = None
    env_now: str | None = None
    helper_now: str | None = None
    enabled: bool = False
    active: bool = False
    binary_now: str | None = None  # realpath of the `current` llama-server
    started: dict[str, Any] = field(default_factory=dict)  # state record of the last start
    owed: bool = False
    systemd: bool = True
    model_readable: bool | None = None  # by the service user (None: user missing / not checked)
    key: auth.KeyFile = field(default_factory=auth.KeyFile)  # /etc/llama-rig/api-key


def observe(ctx: Context, model_path: str | None = None) -> Observed:
    cfg = ctx.cfg
    u = cfg["paths"]["service_user"]
    script = "; ".join([
        f"echo @@passwd; getent passwd {quote(u)}",
        f"echo @@enabled; systemctl is-enabled {SERVICE} 2>/dev/null",
        f"echo @@active; systemctl is-active {SERVICE} 2>/dev/null",
        f"echo @@binary; readlink -f {quote(binary_path(cfg))} 2>/dev/null",
        "echo @@init; [ -d /run/systemd/system ] && echo systemd",
        "true"])
    sec = sections.split(ctx.target.run(script, check=False).stdout)
    pw = sections.first(sec, "passwd").split(":")
    t = ctx.target
    return Observed(
        user_exists=len(pw) >= 7, user_home=pw[5] if len(pw) >= 7 else None,
        user_shell=pw[6] if len(pw) >= 7 else None,
        unit_now=t.read_file(UNIT_PATH), env_now=t.read_file(ENV_PATH, sudo=True),
        helper_now=t.read_file(helper_path(cfg)),
        enabled=sections.first(sec, "enabled") == "enabled",
        active=sections.first(sec, "active") == "active",
        binary_now=(sections.first(sec, "binary") or None)
        if t.exists(binary_path(cfg)) else None,
        started=dict(ctx.state.get("service", {}) or {}),
        owed=HANDLER in ctx.state.owed,
        systemd=sections.first(sec, "init") == "systemd",
        model_readable=None if len(pw) < 7 or not model_path else t.run(
            f"runuser -u {quote(u)} -- test -r {quote(model_path)}", sudo=True, check=False).ok,
        key=auth.observe(ctx, auth.mode(cfg) == "file") if auth.enabled(cfg) else auth.KeyFile())


NOLOGIN = "/usr/sbin/nologin"


def create_user_change(cfg: dict) -> Run:
    """The service user (llama-server here, ggml-rpc-server on an RPC worker): a system user with
    no login shell, its home under the state dir."""
    p = cfg["paths"]
    u, home = p["service_user"], user_home(cfg)
    return Run(f"create system user {u} (no login shell, home {home})", commands=[
        f"mkdir -p {quote(p['state_dir'])}",
        f"useradd --system --user-group --home-dir {quote(home)} --create-home "
        f"--shell {NOLOGIN} --comment 'llama-rig llama-server' {quote(u)}"])


def plan(cfg: dict, obs: Observed, model_path: str, api_key: str | None,
         restart_fn=None) -> list[Change]:
    """Observed state in -> changes out (pure; `restart_fn` is what the restart Call runs)."""
    if not obs.systemd:
        raise StepError("this box does not run systemd (no /run/systemd/system): the llama-server "
                        "unit cannot be installed; use `invoke service.argv` to get the command line")
    p = cfg["paths"]
    u = p["service_user"]
    home = user_home(cfg)
    changes: list[Change] = []
    if not obs.user_exists:
        changes.append(create_user_change(cfg))
    elif obs.user_home != home or obs.user_shell not in (NOLOGIN, "/bin/false", "/usr/bin/false"):
        changes.append(Run(f"fix user {u}: home {home}, no login shell", commands=[
            f"mkdir -p {quote(home)} && chown {quote(u)}: {quote(home)}",
            f"usermod --home {quote(home)} --shell {NOLOGIN} {quote(u)}"]))
    if obs.model_readable is False or not obs.user_exists:
        d = os.path.dirname(model_path)
        grant = Run(f"let {u} read the model ({d})", commands=[
            f"chgrp -R {quote(u)} {quote(d)} && chmod -R g+rX {quote(d)}"])
        changes.append(grant)  # (after creating a new user: it must be able to read the model)
    helper = render_helper(cfg)
    if helper != obs.helper_now:
        changes.append(WriteFile(f"readiness helper {helper_path(cfg)}", path=helper_path(cfg),
                                 content=helper, before=obs.helper_now, mode=0o755))
    reasons: list[str] = []
    key_changes = auth.plan(cfg, obs.key, u, api_key)
    changes += key_changes
    if any(HANDLER in ch.notify for ch in key_changes):
        reasons.append("API key file changed")
    env = render_env()
    if env != obs.env_now:
        old_key = bool(obs.env_now and "LLAMA_API_KEY" in obs.env_now)  # the key's old place
        changes.append(WriteFile(f"env file {ENV_PATH}" + (" (LLAMA_API_KEY removed)" if old_key else ""),
                                 path=ENV_PATH, content=env, before=obs.env_now, mode=0o600,
                                 secret=old_key, notify=(HANDLER,)))
        reasons.append("env file changed")
    unit = render_unit(cfg, model_path)
    if unit != obs.unit_now:
        changes.append(WriteFile(f"unit {UNIT_PATH}", path=UNIT_PATH, content=unit,
                                 before=obs.unit_now, notify=(HANDLER,)))
        changes.append(Run("systemctl daemon-reload (unit changed)", commands=["systemctl daemon-reload"]))
        reasons.append("unit changed")
    if not obs.enabled:
        changes.append(Run(f"enable {SERVICE}", commands=[f"systemctl enable {SERVICE}"]))
    if obs.owed:
        reasons.append("restart owed (binary, model or config changed earlier)")
    last_bin = obs.started.get("binary")
    if obs.active and obs.binary_now and last_bin and last_bin != obs.binary_now:
        reasons.append(f"binary changed ({os.path.basename(os.path.dirname(os.path.dirname(last_bin)))}"
                       f" -> {os.path.basename(os.path.dirname(os.path.dirname(obs.binary_now)))})")
    if obs.active and obs.started.get("model") and obs.started["model"] != model_path:
        reasons.append("model changed")
    if not obs.active:
        reasons.append("not running")
    if reasons:
        verb = "restart" if obs.active else "start"
        changes.append(Call(f"{verb} {SERVICE} ({'; '.join(reasons)}), wait for /health, test a completion",
                            fn=restart_fn, data={"action": verb, "reasons": reasons},
                            notify=(HANDLER,) if obs.owed or obs.active else ()))
    return changes


# ---------------------------------------------------------------------------------------------
# acting on the box


def unit_installed(ctx: Context) -> bool:
    """For the llama step's update/rollback: is there a unit to restart?"""
    return ctx.target.exists(UNIT_PATH)


def is_active(ctx: Context) -> bool:
    """Is llama-server running now (systemd's view)?"""
    r = ctx.target.run(f"systemctl is-active {SERVICE} 2>/dev/null", check=False)
    return r.stdout.strip() == "active"


def stop(ctx: Context) -> None:
    """Stop llama-server (bench and tune borrow its GPU memory); `restart_and_wait` brings it back."""
    ctx.target.run(f"systemctl stop {SERVICE}", sudo=True, timeout=120)


def _model_path(ctx: Context) -> str:
    from . import model as model_step
    return str(model_step.shard1_path(ctx))


def journal_tail(ctx: Context, n: int = 30) -> str:
    r = ctx.target.run(f"journalctl -u {SERVICE} -n {int(n)} --no-pager -o cat", sudo=True, check=False)
    return r.stdout.strip() or r.stderr.strip()


def probe(ctx: Context, what: list[str], api_key: str | None = None, timeout: float = 300,
          max_tokens: int = 8) -> dict[str, tuple[int, str, float]]:
    """HTTP requests to the server from the box itself (127.0.0.1) through `remote/http_probe.py`;
    the key travels on stdin (and never to /health)."""
    from .. import remote
    s = ctx.cfg["server"]
    chat = {"model": s["alias"] or "default", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Reply with one word: ready"}]}
    known = {"health": ("/health", None, False), "props": ("/props", None, True),
             "models": ("/v1/models", None, True), "chat": ("/v1/chat/completions", chat, True)}
    reqs = [{"name": w, "path": known[w][0], "body": known[w][1], "auth": known[w][2],
             "timeout": timeout if w == "chat" else 30} for w in what]
    args = {"base": f"http://127.0.0.1:{s['port']}", "key": api_key, "requests": reqs}
    r = ctx.target.run(auth.keyed(ctx.cfg, remote.command("http_probe.py", "requests")), stdin=json.dumps(args),
                       sudo=auth.enabled(ctx.cfg), check=False, timeout=timeout + 60)
    try:
        return {k: tuple(v) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    except (ValueError, IndexError):
        raise StepError(f"cannot probe llama-server on the box: {(r.stderr or r.stdout).strip()[-300:]}")


def check_serving(ctx: Context, api_key: str | None) -> dict[str, float]:
    """/health 200 and one real chat completion, else StepError with the journal tail."""
    res = probe(ctx, ["health", "chat"], api_key, timeout=min(600, ctx.cfg["server"]["start_timeout"]))
    hc, hbody, hs = res["health"]
    if hc != 200:
        raise StepError(f"/health answered {hc or 'nothing'} ({hbody.strip()[:200]}); journal:\n"
                        + journal_tail(ctx))
    cc, cbody, cs = res["chat"]
    try:
        reply = json.loads(cbody)["choices"][0]["message"]
        text = (reply.get("content") or reply.get("reasoning_content") or "").strip()
    except (ValueError, KeyError, IndexError, TypeError):
        text = None
    if cc != 200 or text is None:
        raise StepError(f"chat completion failed ({cc or 'no answer'}: {cbody.strip()[:300]}); journal:\n"
                        + journal_tail(ctx))
    ctx.say(f"service: /health 200 in {hs * 1000:.0f} ms; chat completion in {cs * 1000:.0f} ms: {text[:60]!r}")
    return {"health_s": hs, "chat_s": cs}


def restart_and_wait(ctx: Context, api_key: str | None = None, model_path: str | None = None) -> dict:
    """(Re)start llama-server through systemd (ExecStartPost gates on /health), then check
    /health and a real completion. Marks the `llama-server.restart` handler paid."""
    if api_key is None:
        api_key = read_api_key(ctx.cfg)
    from . import rpc as rpc_step
    rpc_step.gate(ctx)  # RPC workers (if any): same build, answering
    timeout = ctx.cfg["server"]["start_timeout"] + 60
    t0 = time.monotonic()
    r = ctx.target.run(f"systemctl reset-failed {SERVICE} 2>/dev/null; systemctl restart {SERVICE}",
                       sudo=True, check=False, timeout=timeout)
    start_s = time.monotonic() - t0
    if not r.ok:
        raise StepError(f"systemctl restart {SERVICE} failed (exit {r.exited}) after {start_s:.1f}s: "
                        f"{(r.stderr or r.stdout).strip()[-200:]}; journal:\n" + journal_tail(ctx))
    ctx.say(f"service: {SERVICE} started and ready in {start_s:.1f}s")
    res = check_serving(ctx, api_key)
    binary = ctx.target.run(f"readlink -f {quote(binary_path(ctx.cfg))}", check=False).stdout.strip()
    rec = {"binary": binary or None, "model": model_path, "start_s": round(start_s, 2),
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if model_path is None:
        rec["model"] = (ctx.state.get("service") or {}).get("model")
    if not ctx.check:
        ctx.state.data["service"] = rec
        ctx.state.paid(HANDLER)
        ctx.state.save()
    return {"start_s": start_s, **res}


# ---------------------------------------------------------------------------------------------
# the step


class ServiceStep(Step):
    name = "service"
    title = "llama-server systemd unit, env file, readiness, restarts"

    def plan(self, ctx: Context) -> list[Change]:
        if (ctx.cfg.get("rpc") or {}).get("bind"):
            return []  # an RPC worker serves ggml-rpc-server (steps/rpc.py), not llama-server
        auth.warn_open(ctx)
        have_binary = ctx.target.exists(binary_path(ctx.cfg))
        try:
            model_path = _model_path(ctx)
        except StepError as e:
            if ctx.check:  # a fresh box in --check: the llama/model steps would provide them
                return [Call(f"install and start {SERVICE} once the model is in place ({e})",
                             data={"action": "pending", "reason": str(e)})]
            raise
        if not have_binary:
            if ctx.check:
                return [Call(f"install and start {SERVICE} once llama.cpp is built "
                             f"({binary_path(ctx.cfg)} not there yet)",
                             data={"action": "pending", "reason": "binary missing"})]
            raise StepError(f"{binary_path(ctx.cfg)} not found: run the llama step first")
        api_key = read_api_key(ctx.cfg)
        obs = observe(ctx, model_path)

        def do_restart(c: Context) -> None:
            preflight(c, model_path)
            restart_and_wait(c, api_key, model_path)

        return plan(ctx.cfg, obs, model_path, api_key, do_restart)

    def handlers(self):
        return {HANDLER: _handler}


def _handler(ctx: Context) -> None:
    """Owed restart when the service step itself did not run (e.g. `--only llama`)."""
    if (ctx.cfg.get("rpc") or {}).get("bind") or not unit_installed(ctx):
        ctx.say(f"handler: {SERVICE} is not installed yet — nothing to restart")
        return
    try:
        model_path = _model_path(ctx)
    except Exception:  # noqa: BLE001 - the preflight is best effort here
        model_path = None
    if model_path:
        preflight(ctx, model_path)
    restart_and_wait(ctx, model_path=model_path)


# ---------------------------------------------------------------------------------------------
# tasks: status, logs, restart, argv


def _no_answer(body: str, port: int, timeout: float) -> str:
    """What the probe's exception text means, in words (never a raw URLError)."""
    b = body.lower()
    if "refused" in b:
        return f"no answer: nothing listens on 127.0.0.1:{port}"
    if "timed out" in b or "timeout" in b:
        return f"no answer within {timeout:g} s on 127.0.0.1:{port}"
    if "reset" in b or "remote end closed" in b:
        return f"no answer: the connection to 127.0.0.1:{port} was closed"
    return f"no answer on 127.0.0.1:{port}"


def status(ctx: Context) -> bool:
    """systemd state, /health, /props build_info, /v1/models. Not installed yet: says what to run
    (not an error); installed but not serving: StepError."""
    name = ctx.host.name
    port = ctx.cfg["server"]["port"]
    from . import rpc as rpc_step
    if (ctx.cfg.get("rpc") or {}).get("bind"):
        return rpc_step.worker_status(ctx)
    if not ctx.target.exists(UNIT_PATH):
        ctx.say(f"service: {SERVICE} is not installed on {name} yet — run "
                f"`invoke provision --host {name}`")
        return False
    r = ctx.target.run(f"systemctl show {SERVICE} -p LoadState -p ActiveState -p SubState -p MainPID "
                       "-p NRestarts -p ActiveEnterTimestamp -p UnitFileState", check=False)
    props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if not r.ok or "ActiveState" not in props:
        why = ((r.stderr or r.stdout).strip().splitlines() or [f"systemctl exit {r.exited}"])[-1]
        raise StepError(f"systemd does not answer on {name} ({why[:160]}): {SERVICE} is installed "
                        "but cannot run without it")
    api_key = read_api_key(ctx.cfg)
    res = probe(ctx, ["health", "props", "models"], api_key, timeout=10)
    rows = [["unit", f"{props.get('ActiveState') or '-'} ({props.get('SubState') or '-'}), "
                     f"{props.get('UnitFileState') or '-'}"],
            ["since", props.get("ActiveEnterTimestamp") or "-"],
            ["pid / restarts", f"{props.get('MainPID') or '-'} / {props.get('NRestarts') or '-'}"]]
    hc, hb, hs = res["health"]
    rows.append(["/health", f"{hc} in {hs * 1000:.0f} ms {hb.strip()[:80]}" if hc
                 else _no_answer(hb, port, 10)])
    pc, pb, _ = res["props"]
    try:
        build = json.loads(pb).get("build_info", "-") if pc == 200 else (f"HTTP {pc}" if pc else "-")
    except (ValueError, AttributeError):
        build = "- (not JSON)"
    rows.append(["build_info", build])
    mc, mb, _ = res["models"]
    try:
        ids = (", ".join(m["id"] for m in json.loads(mb)["data"]) if mc == 200
               else (f"HTTP {mc}" if mc else "-"))
    except (ValueError, KeyError, TypeError):
        ids = "- (not the expected JSON)"
    rows.append(["/v1/models", ids])
    rpc_rows, rpc_problems = rpc_step.status_rows(ctx)
    ctx.console.table(f"service: {name}", ["what", "value"], rows + rpc_rows)
    if rpc_problems:
        raise StepError("; ".join(rpc_problems) + f" -- llama-server cannot serve without it")
    if props.get("ActiveState") != "active" or hc != 200:
        health = f"/health {hc}" if hc else _no_answer(hb, port, 10)
        raise StepError(f"{SERVICE} is not serving ({props.get('ActiveState') or '-'}, {health}); "
                        f"`invoke service.logs --host {name}` shows why")
    return False


def logs(ctx: Context, lines: int = 50) -> bool:
    r = ctx.target.run(f"journalctl -u {SERVICE} -n {int(lines)} --no-pager", sudo=True, check=False)
    for line in r.stdout.splitlines():
        ctx.console.line(line)
    return False


def restart(ctx: Context) -> bool:
    if not unit_installed(ctx):
        raise StepError(f"{UNIT_PATH} is not installed: run `invoke provision` first")
    if ctx.check:
        ctx.say(f"service: would restart {SERVICE}")
        return True
    restart_and_wait(ctx)
    return True


def argv_for(cfg: dict, model: str) -> str:
    """The llama-server command line for `model` (a path on the rig), as a shell line. Pure."""
    err = values.abs_path(model)
    if err:
        raise UsageError(f"command line: --model: {err}")
    return join(server_argv(cfg, model, binary_path(cfg)))


def argv_text(ctx: Context, model: str | None = None) -> str:
    return argv_for(ctx.cfg, model or _model_path(ctx))


def print_argv(ctx: Context, model: str | None = None) -> bool:
    ctx.console.line(argv_text(ctx, model))
    return False
