"""Read what a run reads from a rig's files in ONE round trip (stdlib only; runs on the rig as
root, read-only): `provision/readahead.py` batches the state file, unit files, their enablement
and the sha256 of rendered files into one call.

Input: ONE JSON object as the only argument (never on stdin: invoke feeds a non-tty stdin one
byte per 10 ms over SSH):
    {"read": ["/etc/systemd/system/x.service", ...],   # text of each file
     "sha256": ["/etc/llama-rig/llama-server.env", ...],  # sha256 of each file (content stays)
     "enabled": ["llama-rig-gpu.service", ...]}         # `systemctl is-enabled` of each unit
Output: one JSON line:
    {"read": {path: text | null}, "sha256": {path: hex | null}, "enabled": {unit: "enabled" | ...
     | ""}, "systemd": true | false}
null: the file does not exist (or is not a regular file). Text is UTF-8 (undecodable bytes
replaced). `systemd`: /run/systemd/system exists (systemd is PID 1).
"""
import hashlib
import json
import os
import subprocess
import sys


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def sha256(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return h.hexdigest()


def enabled(units):
    if not units or not os.path.isdir("/run/systemd/system"):
        return {u: "" for u in units}
    out = {}
    for u in units:
        try:
            r = subprocess.run(["systemctl", "is-enabled", "--", u], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
            out[u] = (r.stdout.strip().splitlines() or [""])[0]
        except (OSError, subprocess.SubprocessError):
            out[u] = ""
    return out


def main(argv):
    if len(argv) != 1:
        print("usage: rig_read.py '{\"read\": [...], \"sha256\": [...], \"enabled\": [...]}'",
              file=sys.stderr)
        return 2
    a = json.loads(argv[0])
    print(json.dumps({"read": {p: read(p) for p in a.get("read", [])},
                      "sha256": {p: sha256(p) for p in a.get("sha256", [])},
                      "enabled": enabled(a.get("enabled", [])),
                      "systemd": os.path.isdir("/run/systemd/system")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
