"""`opencode`: merge a llama-cpp provider into a user's opencode config, as data.

On the rig for `opencode.user` (`~user/.config/opencode/opencode.json`), or with
`invoke opencode.config --local` on the control machine. json load -> merge -> dump: the user's
other providers and keys stay; `model`/`small_model` are set only when the user has none; the
original is backed up once (`opencode.json.llama-rig.bak`) before the first change; nothing is
written when the file is already right; a malformed file is an error and stays untouched.
Schema: opencode-ai 1.18.x (`npm`, `name`, `options.baseURL`, `options.apiKey`,
`models.<id>.limit.{context,output}`) — not the seed's `contextLength` keys.

The API key (server.api_key, steps/api_key.py) is never written into the JSON: `apiKey` is
`{file:llama-rig-<provider>.key}`, a reference opencode resolves relative to the config file's
folder. On the rig that file is a copy of /etc/llama-rig/api-key made on the rig (`install -m 0600
-o USER`: the key does not travel); `--local` fetches the key once into the same name beside this
machine's config (0600).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from ..engine import Call, Change, Context, Step
from ..errors import StepError
from ..target import quote
from . import api_key as auth

SCHEMA_URL = "https://opencode.ai/config.json"
BACKUP_SUFFIX = ".llama-rig.bak"


def base_url(cfg: dict, address: str) -> str:
    oc = cfg["opencode"]
    if oc["base_url"]:
        return oc["base_url"].rstrip("/")
    host = address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg['server']['port']}/v1"


def model_id(cfg: dict) -> str:
    return cfg["server"]["alias"] or "llama-server"


def key_name(cfg: dict) -> str:
    """The key file beside opencode.json (one per provider: several rigs, several keys)."""
    return f"llama-rig-{cfg['opencode']['provider_id']}.key"


def key_ref(cfg: dict) -> str:
    return "{file:" + key_name(cfg) + "}"


OUR_REFS = ("{env:LLAMA_API_KEY}",)  # what earlier versions wrote (dropped when there is no key)


def provider_block(cfg: dict, url: str, has_key: bool) -> dict[str, Any]:
    s, oc = cfg["server"], cfg["opencode"]
    ctx = s["ctx_size"] // max(1, s["parallel"]) if s["ctx_size"] else 0
    mid = model_id(cfg)
    options: dict[str, Any] = {"baseURL": url}
    if has_key:
        options["apiKey"] = key_ref(cfg)
    return {
        "npm": "@ai-sdk/openai-compatible",
        "name": "llama.cpp (llama-server)",
        "options": options,
        "models": {
            mid: {
                "name": f"{mid} (llama-rig)",
                "tool_call": True,
                "limit": {"context": ctx, "output": min(oc["output_limit"], ctx) if ctx else oc["output_limit"]},
            }
        },
    }


def parse(text: str | None, where: str) -> dict[str, Any] | None:
    """The user's file as a dict (None when absent). Malformed -> StepError (file untouched)."""
    if text is None:
        return None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StepError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        "fix it by hand — llama-rig leaves it untouched") from None
    if not isinstance(data, dict):
        raise StepError(f"{where} must hold a JSON object, found {type(data).__name__}; left untouched")
    return data


def merge(existing: dict[str, Any] | None, cfg: dict, url: str, has_key: bool) -> dict[str, Any]:
    """Pure: the user's config with our provider merged in (everything else kept)."""
    out = copy.deepcopy(existing) if existing else {}
    out.setdefault("$schema", SCHEMA_URL)
    pid = cfg["opencode"]["provider_id"]
    providers = out.get("provider")
    if not isinstance(providers, dict):
        providers = {}
    want = provider_block(cfg, url, has_key)
    cur = providers.get(pid) if isinstance(providers.get(pid), dict) else {}
    merged = copy.deepcopy(cur)
    for k in ("npm", "name"):
        merged[k] = want[k]
    opts = dict(merged.get("options") or {}) if isinstance(merged.get("options"), dict) else {}
    opts["baseURL"] = want["options"]["baseURL"]
    if has_key:
        opts["apiKey"] = want["options"]["apiKey"]
    elif opts.get("apiKey") in OUR_REFS + (key_ref(cfg),):
        del opts["apiKey"]
    merged["options"] = opts
    models = dict(merged.get("models") or {}) if isinstance(merged.get("models"), dict) else {}
    for mid, body in want["models"].items():
        m = dict(models.get(mid) or {}) if isinstance(models.get(mid), dict) else {}
        for bad in ("contextLength", "supportsStructuredOutputs"):  # the seed's ignored keys
            m.pop(bad, None)
        m.update(body)
        models[mid] = m
    merged["models"] = models
    providers[pid] = merged
    out["provider"] = providers
    ref = f"{pid}/{model_id(cfg)}"
    for k in ("model", "small_model"):
        if not out.get(k):
            out[k] = ref
    return out


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def has_api_key(cfg: dict) -> bool:
    return auth.enabled(cfg)


# ---------------------------------------------------------------------------------------------
# on the rig


def user_paths(ctx: Context, user: str) -> tuple[str, str, str]:
    """(home, primary group, config file path) of `user` on the box."""
    r = ctx.target.run(f"getent passwd {quote(user)} && id -gn {quote(user)}", check=False)
    lines = r.stdout.strip().splitlines()
    if not r.ok or len(lines) < 2:
        raise StepError(f"opencode.user: no user {user!r} on the box")
    home = lines[0].split(":")[5]
    return home, lines[1].strip(), f"{home}/.config/opencode/opencode.json"


def plan_rig(ctx: Context) -> list[Change]:
    cfg = ctx.cfg
    oc = cfg["opencode"]
    if not oc["enabled"] or not oc["user"]:
        return []
    user = oc["user"]
    home, group, path = user_paths(ctx, user)
    if ctx.target.exists(f"{home}/.config/opencode/opencode.jsonc", sudo=True):
        ctx.warn(f"{home}/.config/opencode/opencode.jsonc exists and wins over opencode.json "
                 "(opencode reads the .jsonc): merge the provider there by hand")
    text = ctx.target.read_file(path, sudo=True)
    existing = parse(text, f"{ctx.host.name}:{path}")
    url = base_url(cfg, ctx.host.address)
    key_changes, has_key = plan_key_copy(ctx, user, group, os.path.dirname(path))
    new = merge(existing, cfg, url, has_key)
    if existing is not None and new == existing:
        return key_changes
    content = dump(new)
    backup = path + BACKUP_SUFFIX

    def write(c: Context) -> None:
        t = c.target
        d = os.path.dirname(path)
        t.run(f"for d in {quote(home + '/.config')} {quote(d)}; do [ -d \"$d\" ] || "
              f"install -d -m 0755 -o {quote(user)} -g {quote(group)} \"$d\"; done", sudo=True)
        if text is not None and not t.exists(backup, sudo=True):
            t.run(f"cp -p {quote(path)} {quote(backup)}", sudo=True)
        mode = 0o600
        if text is not None:
            r = t.run(f"stat -c %a {quote(path)}", sudo=True, check=False)
            if r.ok and r.stdout.strip().isdigit():
                mode = int(r.stdout.strip(), 8)
        t.write_file(path, content, mode=mode, owner=user, group=group)

    from ..engine import file_diff
    ch = Call(f"opencode config {path} (provider {oc['provider_id']} -> {url})"
              + ("" if text is None else f", backup {os.path.basename(backup)}"),
              fn=write, data={"path": path, "content": content})
    ch.diff = lambda: file_diff(path, text, content)  # type: ignore[method-assign]
    return key_changes + [ch]


def plan_key_copy(ctx: Context, user: str, group: str, conf_dir: str) -> tuple[list[Change], bool]:
    """The user's copy of the rig's API key beside opencode.json, made ON the rig (0600, the
    user's). Returns (changes, whether the config may reference it)."""
    dest = f"{conf_dir}/{key_name(ctx.cfg)}"
    if not auth.enabled(ctx.cfg):
        if ctx.target.exists(dest, sudo=True):
            return [Call(f"remove {dest} (server.api_key: none)",
                         fn=lambda c: c.target.run(f"rm -f {quote(dest)}", sudo=True))], False
        return [], False
    k, d = quote(auth.KEY_PATH), quote(dest)
    r = ctx.target.run(f"test -s {k} || exit 3; cmp -s {k} {d} || exit 4; stat -c '%U %a' {d}",
                       sudo=True, check=False)
    if r.exited == 3:
        if ctx.check:  # the service step makes it earlier in the same run
            return [Call(f"copy the API key to {dest} once {auth.KEY_PATH} exists", fn=None)], True
        ctx.warn(f"opencode: {auth.KEY_PATH} is not there yet (the service step makes it): "
                 "the config gets the key reference at the next provision")
        return [], False
    if r.ok and r.stdout.split() == [user, "600"]:
        return [], True

    def copy(c: Context) -> None:
        c.target.run(f"for x in {quote(os.path.dirname(conf_dir))} {quote(conf_dir)}; do [ -d \"$x\" ] || "
                     f"install -d -m 0755 -o {quote(user)} -g {quote(group)} \"$x\"; done; "
                     f"install -m 0600 -o {quote(user)} -g {quote(group)} {k} {d}", sudo=True)
    return [Call(f"copy the API key to {dest} (0600 {user}, on the rig)", fn=copy)], True


class OpencodeStep(Step):
    name = "opencode"
    title = "opencode provider config for the rig's llama-server"

    def plan(self, ctx: Context) -> list[Change]:
        if (ctx.cfg.get("rpc") or {}).get("bind"):
            return []  # an RPC worker holds no model and serves no API (steps/rpc.py)
        return plan_rig(ctx)


# ---------------------------------------------------------------------------------------------
# on the control machine (`opencode.config --local`)


def local_config_path() -> Path:
    if os.environ.get("OPENCODE_CONFIG"):
        return Path(os.environ["OPENCODE_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "opencode" / "opencode.json"


def apply_local(cfg: dict, address: str, path: Path, check: bool = False,
                key: str | None = None) -> tuple[bool, str]:
    """Merge into a file on this machine; `key` (read on the rig) goes to key_name() beside it,
    0600. Returns (changed, new content)."""
    text = path.read_text() if path.exists() else None
    existing = parse(text, str(path))
    new = merge(existing, cfg, base_url(cfg, address), key is not None)
    content = dump(new)
    key_path = path.with_name(key_name(cfg))
    key_changed = False
    if key is not None:
        try:
            key_changed = key_path.read_text() != key + "\n" or key_path.stat().st_mode & 0o077 != 0
        except OSError:
            key_changed = True
        if key_changed and not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = key_path.with_name(key_path.name + ".llama-rig-new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(key + "\n")
            os.replace(tmp, key_path)
    if existing is not None and new == existing:
        return key_changed, content
    if not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        if text is not None and not backup.exists():
            backup.write_text(text)
            os.chmod(backup, path.stat().st_mode & 0o777)
        tmp = path.with_name(path.name + ".llama-rig-new")
        tmp.write_text(content)
        os.chmod(tmp, (path.stat().st_mode & 0o777) if text is not None else 0o600)
        os.replace(tmp, path)
    return True, content


# ---------------------------------------------------------------------------------------------
# tasks


def task_rig(ctx: Context, check: bool = False) -> bool:
    """`opencode.config --host X`: the step's plan, applied now (or shown with --check)."""
    oc = ctx.cfg["opencode"]
    if not oc["user"]:
        raise StepError("opencode.user is not set for this host (whose config should get the provider?)")
    changes = plan_rig(ctx) if oc["enabled"] else []
    if not oc["enabled"]:
        ctx.warn("opencode.enabled is false: nothing to do")
    if not changes:
        ctx.say("opencode: ok (no change)")
    for ch in changes:
        ctx.say(f"opencode: {'would ' if check else ''}change: {ch.description}")
        if check:
            d = ch.diff()
            if d:
                ctx.console.diff(d)
        else:
            ch.apply(ctx)
    return bool(changes)


def task_local(app, host: str | None, all_hosts: bool, check: bool):
    """`opencode.config --local`: merge the host's provider into this machine's config."""
    from ..errors import ExitStatus, UsageError
    hosts = app.hosts(host, all_hosts)
    if len(hosts) != 1:
        raise UsageError("opencode.config --local: pick exactly one host (the provider points at it)")
    h = hosts[0]
    path = local_config_path()
    key = None
    if auth.enabled(h.cfg):  # the key opencode needs HERE: read once on the rig (sudo), never shown
        key = auth.read_control_key(h.cfg)
        if key is None:
            from ..engine import Context
            target = app.target_factory(h)
            try:
                key = auth.read_on_rig(Context(h, target, app.console, check=check))
            finally:
                target.close()
    changed, content = apply_local(h.cfg, h.address, path, check=check, key=key)
    verb = ("would change" if check else "changed") if changed else "ok (no change)"
    app.console.line(f"opencode: {path}: {verb} (provider {h.cfg['opencode']['provider_id']} -> "
                     f"{base_url(h.cfg, h.address)})")
    return ExitStatus.OK
