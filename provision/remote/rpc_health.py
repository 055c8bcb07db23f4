"""Runs ON an RPC worker (stdlib only), installed as <prefix>/bin/llama-rig-rpc-health and run by
llama-rig-rpc-health.service:  llama-rig-rpc-health HOST PORT UNIT CURRENT RPC_PORT

ggml-rpc-server serves ONE client at a time with a listen backlog of 1: while llama-server is
connected, a TCP probe of its port waits in that backlog and the next one times out, so the main
host cannot tell "busy" from "gone" there. This answers instead, on the next port of the same
private address: each connection gets one JSON line -- the rpc unit's state and invocation id (a
new one = the rpc server restarted), whether it listens, and the build behind CURRENT -- then is
closed. It reads only; the nft table lets only the main host(s) reach it.
"""
import json
import os
import socket
import subprocess
import sys


def state(unit, current, rpc_port):
    r = subprocess.run(["systemctl", "show", unit, "-p", "ActiveState", "-p", "InvocationID"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=10)
    props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    listening = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # tcp6 is absent without IPv6
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == rpc_port:
                listening = True
    return {"unit": props.get("ActiveState", "unknown"), "invocation": props.get("InvocationID", ""),
            "listening": listening, "build": os.path.basename(os.path.realpath(current))}


def main(argv):
    if len(argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, unit, current, rpc_port = argv[1], int(argv[2]), argv[3], argv[4], int(argv[5])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        try:
            conn.settimeout(5)
            conn.sendall((json.dumps(state(unit, current, rpc_port)) + "\n").encode())
        except Exception:  # noqa: BLE001 - one bad client must not end the responder
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
