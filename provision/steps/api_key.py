"""The llama-server API key (`server.api_key`, `server.api_key_file`), part of the service step.

* `auto` (the default): a key made ON THE RIG, once (32 bytes from /dev/urandom, as 64 hex
  digits), kept in KEY_PATH (`/etc/llama-rig/api-key`, root:<service group>, 0640: the service
  user reads it, nobody else but root). llama-server gets `--api-key-file KEY_PATH`: the key is in
  neither its argv nor its environment. It never travels to the control machine: the probes that
  need it (readiness completion, `service.status`, `invoke status`, bench's TTFT) run on the rig
  as root and read the file there; the opencode step copies it on the rig for `opencode.user`.
  Only `opencode.config --local` brings it to the control machine, where opencode runs.
* `server.api_key_file: PATH` (a file on the CONTROL machine): that key is installed in KEY_PATH
  instead of a generated one (the same file, mode and flag).
* `none`: no key; every provision warns while `server.host` is not a loopback address.

Rotating the key: delete KEY_PATH on the rig and provision (a new key, one restart, the opencode
copy follows).
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from .. import remote
from ..engine import Change, Context, Run, WriteFile
from ..errors import StepError
from ..secrets import register
from ..target import quote

KEY_DIR = "/etc/llama-rig"
KEY_PATH = f"{KEY_DIR}/api-key"
KEY_MODE = 0o640
HANDLER = "llama-server.restart"


def mode(cfg: dict) -> str:
    """'none', 'file' (server.api_key_file on the control machine) or 'auto' (made on the rig)."""
    s = cfg["server"]
    if s.get("api_key", "auto") == "none":
        return "none"
    return "file" if s.get("api_key_file") else "auto"


def enabled(cfg: dict) -> bool:
    return mode(cfg) != "none"


def server_args(cfg: dict) -> list[str]:
    """What llama-server's command line gets: the key's PATH, never the key."""
    return ["--api-key-file", KEY_PATH] if enabled(cfg) else []


def keyed(cfg: dict, command: str) -> str:
    """`command` (a probe reading one JSON line on stdin) fed with the rig's key by
    remote/key_inject.py (file -> pipe -> probe, on the rig); run it as root
    (sudo=auth.enabled(cfg)). Unchanged when the server has no key."""
    if not enabled(cfg):
        return command
    return f"{remote.command('key_inject.py', KEY_PATH)} | {command}"


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def read_control_key(cfg: dict) -> str | None:
    """server.api_key_file lives on the CONTROL machine; the key is registered as a secret."""
    path = cfg["server"].get("api_key_file")
    if not path or mode(cfg) == "none":
        return None
    full = os.path.expanduser(path)
    try:
        with open(full) as fh:
            key = fh.read().strip()
    except OSError as e:
        raise StepError(f"server.api_key_file: cannot read {path}: {e.strerror}") from None
    if not key or "\n" in key:
        raise StepError(f"server.api_key_file: {path} must hold exactly one non-empty line")
    register(key)
    return key


# ---------------------------------------------------------------------------------------------
# the key file on the rig


@dataclass
class KeyFile:
    exists: bool = False
    owner: str = ""
    group: str = ""
    mode: int = 0
    size: int = 0
    content: str | None = None  # read only to compare with an explicit key (mode 'file')


def observe(ctx: Context, explicit: bool) -> KeyFile:
    """stat of KEY_PATH (as root); its content only when there is an explicit key to compare."""
    r = ctx.target.run(f"stat -c '%U %G %a %s' {quote(KEY_PATH)} 2>/dev/null", sudo=True, check=False)
    parts = r.stdout.split()
    if not r.ok or len(parts) != 4:
        return KeyFile()
    kf = KeyFile(True, parts[0], parts[1], int(parts[2], 8), int(parts[3]))
    if explicit:
        kf.content = ctx.target.read_file(KEY_PATH, sudo=True)
        register((kf.content or "").strip())
    return kf


def generate_command(group: str) -> str:
    """Make KEY_PATH on the rig, unless it holds a key already (the key never leaves the rig)."""
    f, g = quote(KEY_PATH), quote(group)
    d = quote(KEY_DIR)  # the folder stays 0755 (the env file lives there too); the key is 0640
    return (f"[ -d {d} ] || install -d -m 0755 {d}; umask 077; if [ ! -s {f} ]; then "
            f"t=$(mktemp {quote(KEY_DIR + '/.api-key.XXXXXX')}) && "
            f"{{ od -An -N32 -tx1 /dev/urandom | tr -d ' \\n'; echo; }} > \"$t\" && "
            f"chown root:{g} \"$t\" && chmod 0640 \"$t\" && mv -f \"$t\" {f}; fi")


def plan(cfg: dict, kf: KeyFile, group: str, control_key: str | None) -> list[Change]:
    """Observed key file in -> changes out (pure). A new or replaced key restarts the server."""
    m = mode(cfg)
    if m == "none":
        return []
    if m == "file":
        want = (control_key or "") + "\n"
        if kf.content != want or kf.owner != "root" or kf.group != group or kf.mode != KEY_MODE:
            return [WriteFile(f"API key file {KEY_PATH} (server.api_key_file, root:{group} 0640)",
                              path=KEY_PATH, content=want, before=kf.content, mode=KEY_MODE,
                              owner="root", group=group, secret=True,
                              notify=(HANDLER,) if kf.content != want else ())]
        return []
    if not kf.exists or kf.size == 0:
        return [Run(f"generate the API key on the rig: {KEY_PATH} (root:{group} 0640)",
                    commands=[generate_command(group)], notify=(HANDLER,))]
    if kf.owner != "root" or kf.group != group or kf.mode != KEY_MODE:
        return [Run(f"fix {KEY_PATH}: root:{group} 0640 (was {kf.owner}:{kf.group} {kf.mode:o})",
                    commands=[f"chown root:{quote(group)} {quote(KEY_PATH)} && chmod 0640 {quote(KEY_PATH)}"])]
    return []


def warn_open(ctx: Context) -> None:
    """`server.api_key: none` on an address others can reach: said at every provision."""
    s = ctx.cfg["server"]
    if mode(ctx.cfg) == "none" and not is_loopback(s["host"]):
        ctx.warn(f"server.api_key is none and llama-server listens on {s['host']}:{s['port']}: "
                 "anyone who can reach that port can use the GPUs (set server.api_key: auto)")


def read_on_rig(ctx: Context) -> str:
    """The key itself, for `opencode.config --local` (opencode runs on this machine). Registered as
    a secret before anything can print it."""
    text = ctx.target.read_file(KEY_PATH, sudo=True)
    key = (text or "").strip()
    register(key)
    if not key:
        raise StepError(f"{KEY_PATH} is missing on {ctx.host.name}: run `invoke provision "
                        f"--host {ctx.host.name}` first")
    return key.splitlines()[0]
