"""Runs ON the main host of an RPC setup (stdlib only), installed as <prefix>/bin/llama-rig-rpc-watch.

    llama-rig-rpc-watch wait TIMEOUT HOST:PORT...   exit 0 once every worker accepts a TCP
                                                    connection, 1 (naming the missing ones) at TIMEOUT
    llama-rig-rpc-watch probe HOST:PORT...          one JSON line: {endpoint: {"up": bool, "error": str}}
    llama-rig-rpc-watch watch STATE UNIT HOST:PORT...
        every few seconds: probe the workers, write STATE (JSON: per endpoint up/since/error), and
        restart UNIT when a worker that was down is back and every worker is up (llama-server's
        connection to it died with it), or when UNIT failed and every worker is up again.
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


def probe_one(ep, timeout=3.0):
    try:
        with socket.create_connection(split(ep), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, (e.strerror or type(e).__name__ or str(e))


def probe(eps, timeout=3.0):
    out = {}
    for ep in eps:
        ok, err = probe_one(ep, timeout)
        out[ep] = {"up": ok, "error": err}
    return out


def wait(timeout, eps):
    deadline = time.monotonic() + timeout
    while True:
        res = probe(eps, 2.0)
        down = [ep for ep, r in res.items() if not r["up"]]
        if not down:
            return 0
        if time.monotonic() >= deadline:
            print("RPC workers not answering after %gs: %s" % (timeout, ", ".join(
                "%s (%s)" % (ep, res[ep]["error"]) for ep in down)), file=sys.stderr)
            return 1
        time.sleep(1.0)


def unit_state(unit):
    r = subprocess.run(["systemctl", "is-active", unit], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    return r.stdout.strip()


def watch(state_path, unit, eps):
    last = {}
    since = {}
    while True:
        res = probe(eps)
        now = time.time()
        came_back = False
        for ep, r in res.items():
            prev = last.get(ep)
            if prev is None or prev != r["up"]:
                since[ep] = now
                if prev is False and r["up"]:
                    came_back = True
            last[ep] = r["up"]
            r["since"] = since[ep]
        all_up = all(r["up"] for r in res.values())
        action = None
        if all_up:
            st = unit_state(unit)
            if came_back and st in ("active", "activating"):
                action = "restart (a worker is back)"
            elif st == "failed":
                action = "restart (it failed; every worker is up)"
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
    if len(argv) >= 4 and argv[1] == "watch":
        watch(argv[2], argv[3], argv[4:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
