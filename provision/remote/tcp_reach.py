"""Can this rig open a TCP connection to HOST PORT? (run ON the destination of a direct copy,
before anything is written anywhere; stdlib only). Exit 0, or exit 1 with `Error: reason` on
stderr. Usage: python3 -c SOURCE HOST PORT"""
import socket
import sys


def main(argv):
    try:
        socket.create_connection((argv[0], int(argv[1])), 5).close()
    except OSError as e:
        return "%s: %s" % (type(e).__name__, e.strerror or e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
