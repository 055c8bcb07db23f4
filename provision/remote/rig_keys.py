#!/usr/bin/env python3
"""The temporary, restricted SSH key of a direct rig-to-rig copy (stdlib only); runs on the SOURCE
rig as its login user (no sudo: it edits that user's own ~/.ssh/authorized_keys).

  add     stdin {"tag": "llama-rig-copy-<id>", "pubkey": "ssh-ed25519 AAAA...", "from": [addresses],
                 "items": [ITEM...], "rate": BYTES_PER_S, "minutes": 10, "script": <rig_copy.py text>}
          writes ~/.cache/llama-rig-copy/<tag>/rig_copy.py and allow.json (the items, the rate, a
          deadline), and appends to ~/.ssh/authorized_keys:
            restrict,from="<addresses>",expiry-time="<deadline>",command="nice -n 10 python3
            .../rig_copy.py serve .../allow.json" ssh-ed25519 AAAA... <tag>
          -- the key can run nothing but `serve` (which sends only the allowed items, read-only, at
          the allowed rate), from the destination's addresses only, with no pty or forwarding, and
          sshd stops accepting it after the deadline even if nobody removes it. Expired lines and
          directories that runs which died left behind are removed first.
  remove  stdin {"tag": ...}: the line and the directory go.

Output: one JSON line. authorized_keys is rewritten atomically (temp file + rename, 0600).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

TAG_PREFIX = "llama-rig-copy-"
KEYS_DIR = ".cache/llama-rig-copy"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _keys_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".ssh", "authorized_keys")


def _expired(line: str, now: float) -> bool:
    m = re.search(r'expiry-time="(\d{12})"', line)
    if not m:
        return False
    return time.strftime("%Y%m%d%H%M", time.localtime(now)) > m.group(1)


def _write_keys(path: str, lines: list[str]) -> None:
    real = os.path.realpath(path)
    d = os.path.dirname(real)
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = os.path.join(d, f".authorized_keys.llama-rig-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, real)


def _read_keys(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return fh.readlines()
    except FileNotFoundError:
        return []


def _rmtree(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)


def keys(action: str, cfg: dict) -> int:
    home = os.path.expanduser("~")
    base = os.path.join(home, KEYS_DIR)
    path = _keys_file()
    lines = _read_keys(path)
    now = time.time()
    tag = cfg.get("tag") or ""
    if not tag.startswith(TAG_PREFIX) or not all(c.isalnum() or c in "-_" for c in tag):
        sys.stderr.write(f"bad tag {tag!r}\n")
        return 2
    if action == "remove":
        keep = [ln for ln in lines if not ln.rstrip().endswith(" " + tag)]
        if keep != lines:
            _write_keys(path, keep)
        _rmtree(os.path.join(base, tag))
        emit({"removed": len(lines) - len(keep)})
        return 0
    if action != "add":
        sys.stderr.write(f"unknown keys action {action!r}\n")
        return 2
    # leftovers of runs that died: expired lines and their directories
    stale = [ln for ln in lines if f" {TAG_PREFIX}" in ln and _expired(ln, now)]
    lines = [ln for ln in lines if ln not in stale]
    live = {ln.rstrip().rsplit(" ", 1)[-1] for ln in lines if f" {TAG_PREFIX}" in ln}
    if os.path.isdir(base):
        for name in os.listdir(base):
            if name.startswith(TAG_PREFIX) and name not in live:
                _rmtree(os.path.join(base, name))
    d = os.path.join(base, tag)
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    helper = os.path.join(d, "rig_copy.py")
    with open(helper, "w") as fh:
        fh.write(cfg["script"])
    minutes = float(cfg.get("minutes") or 10)
    deadline = now + minutes * 60
    allow = {"items": cfg.get("items") or [], "rate": cfg.get("rate") or 0, "deadline": deadline}
    allow_path = os.path.join(d, "allow.json")
    fd = os.open(allow_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(allow, fh)
    pub = " ".join(str(cfg["pubkey"]).split()[:2])
    for ch in pub:
        if not (ch.isalnum() or ch in "+/=- "):
            sys.stderr.write("bad public key\n")
            return 2
    command = f"nice -n 10 {sys.executable} {helper} serve {allow_path}"
    if any(c in command for c in '"\\\n'):
        sys.stderr.write(f"cannot build a forced command from {command!r}\n")
        return 2
    opts = ["restrict", f'expiry-time="{time.strftime("%Y%m%d%H%M", time.localtime(deadline + 60))}"',
            f'command="{command}"']
    frm = [a for a in cfg.get("from") or [] if a and all(c.isalnum() or c in ".:-%*?" for c in a)]
    if frm:
        opts.insert(1, f'from="{",".join(frm)}"')
    line = f"{','.join(opts)} {pub} {tag}\n"
    _write_keys(path, lines + [line])
    emit({"added": tag, "keys_file": path, "command": command, "deadline": deadline})
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("add", "remove"):
        sys.stderr.write("usage: rig_keys.py add|remove < JSON\n")
        return 2
    line = sys.stdin.readline()
    return keys(argv[0], json.loads(line) if line.strip() else {})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
