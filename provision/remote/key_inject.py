"""Puts the API key of the file named by argv[1] into the one-line JSON a probe reads on stdin
(as "key", unless the caller set one), and writes that line to stdout for the next command of
the pipe (`python3 -c key_inject.py KEY_PATH | python3 -c http_probe.py ...`, as root).

The key goes from the file to the probe through a pipe on the rig: never through argv, the
environment or the control machine. An unreadable file leaves "key" unset (the server's 401 then
says why) and one line on stderr. Runs as `python3 -c` (stdlib only).
"""
import json
import sys


def main() -> int:
    args = json.loads(sys.stdin.readline() or "{}")
    if not args.get("key"):
        try:
            with open(sys.argv[1]) as fh:
                args["key"] = fh.readline().strip() or None
        except OSError as e:
            sys.stderr.write("llama-rig: cannot read the API key file %s: %s\n" % (sys.argv[1], e.strerror))
    sys.stdout.write(json.dumps(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
