"""Runs ON the main host of an RPC setup (stdlib only), installed as <prefix>/bin/llama-rig-rpc-watch.
Each HOST:PORT is a worker's health responder (remote/rpc_health.py: the rpc port + 1), which says
whether its rpc server runs and listens, and its invocation id.

    llama-rig-rpc-watch wait TIMEOUT HOST:PORT...   exit 0 once every worker's rpc server is up, 1
                                                    (naming the missing ones) at TIMEOUT
    llama-rig-rpc-watch probe HOST:PORT...          one JSON line: {endpoint: {"up": bool, ...}}
    llama-rig-rpc-watch watch STATE UNIT CURRENT HOST:PORT...
        every few seconds: ask the workers, write STATE (JSON: per endpoint up/since/error), and
        restart UNIT (llama-server) once every worker is up when one of them was gone or its rpc
        server restarted (llama-server's connection to it died with it), or when UNIT failed --
        never while a worker's build is at another commit than CURRENT (this host's build link):
        that start is refused until provision makes them the same.
"""
import json
import os
import socket
import subprocess
import sys
import time

INTERVAL = 3.0


def split(ep):
    host, _, port = ep.rpartition(":")
    return host.strip("[]"), int(port)


def ask(ep, timeout=3.0):
    try:
        with socket.create_connection(split(ep), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        st = json.loads(data.decode() or "{}")
    except (OSError, ValueError) as e:
        err = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return {"up": False, "error": "no answer (%s)" % err}
    up = st.get("unit") == "active" and bool(st.get("listening"))
    err = "" if up else "rpc server %s%s" % (st.get("unit"), "" if st.get("listening") else ", not listening")
    st.update(up=up, error=err)
    return st


def probe(eps, timeout=3.0):
    return {ep: ask(ep, timeout) for ep in eps}


def wait(timeout, eps):
    deadline = time.monotonic() + timeout
    while True:
        res = probe(eps, 2.0)
        down = [ep for ep, r in res.items() if not r["up"]]
        if not down:
            return 0
        if time.monotonic() >= deadline:
            print("RPC workers not ready after %gs: %s" % (timeout, ", ".join(
                "%s (%s)" % (ep, res[ep]["error"]) for ep in down)), file=sys.stderr)
            return 1
        time.sleep(1.0)


def commit_of(build):
    """b7000-1a2b3c4-9f8e7d6c -> 1a2b3c4 (llama-rig's build directory names)."""
    parts = (build or "").split("-")
    return parts[1] if len(parts) >= 3 else None


def unit_state(unit):
    r = subprocess.run(["systemctl", "is-active", unit], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    return r.stdout.strip()


def watch(state_path, unit, current, eps):
    last, since, inv = {}, {}, {}
    pending = None  # why UNIT must restart once every worker is up
    while True:
        res = probe(eps)
        now = time.time()
        mine = commit_of(os.path.basename(os.path.realpath(current)))
        skew = [ep for ep, r in res.items() if r["up"] and mine and commit_of(r.get("build")) not in (None, mine)]
        for ep in skew:
            res[ep]["skew"] = "build %s, this host runs %s" % (res[ep].get("build"), mine)
        for ep, r in res.items():
            prev = last.get(ep)
            if prev is None or prev != r["up"]:
                since[ep] = now
                if prev is False and r["up"]:
                    pending = pending or "worker %s is back" % ep
            if r["up"] and r.get("invocation"):
                if inv.get(ep) and inv[ep] != r["invocation"]:
                    pending = pending or "the rpc server of %s restarted" % ep
                inv[ep] = r["invocation"]
            last[ep] = r["up"]
            r["since"] = since[ep]
        action = None
        if skew:
            if pending:
                print("%s: not restarted (%s): version skew: %s" % (unit, pending, "; ".join(
                    "%s %s" % (ep, res[ep]["skew"]) for ep in skew)), flush=True)
            pending = None
        elif all(r["up"] for r in res.values()):
            st = unit_state(unit)
            if pending and st in ("active", "activating", "failed"):
                action = "restart (%s)" % pending
            elif st == "failed":
                action = "restart (it failed; every worker is up)"
            pending = None
            if action:
                subprocess.run(["systemctl", "reset-failed", unit], stderr=subprocess.DEVNULL)
                subprocess.run(["systemctl", "restart", "--no-block", unit])
                print("%s: %s" % (unit, action), flush=True)
        doc = {"checked": now, "workers": res, "last_action": action}
        tmp = state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, state_path)
        time.sleep(INTERVAL)


def main(argv):
    if len(argv) >= 3 and argv[1] == "wait":
        return wait(float(argv[2]), argv[3:])
    if len(argv) >= 2 and argv[1] == "probe":
        print(json.dumps(probe(argv[2:])))
        return 0
    if len(argv) >= 5 and argv[1] == "watch":
        watch(argv[2], argv[3], argv[4], argv[5:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
