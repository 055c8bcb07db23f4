"""Runs ON an RPC worker before ggml-rpc-server starts (stdlib only), installed as
<prefix>/bin/llama-rig-rpc-prune:  llama-rig-rpc-prune DIR MAX_BYTES

The tensor cache (`-c`) grows by every tensor > 10 MiB it is sent and nothing upstream trims it:
remove the least recently used files until DIR holds at most MAX_BYTES. Prints one line."""
import os
import sys


def main(argv):
    if len(argv) != 3:
        print("usage: llama-rig-rpc-prune DIR MAX_BYTES", file=sys.stderr)
        return 2
    top, cap = argv[1], int(argv[2])
    files = []
    for root, _dirs, names in os.walk(top):
        for n in names:
            p = os.path.join(root, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.isfile(p) and not os.path.islink(p):
                files.append((max(st.st_atime, st.st_mtime), st.st_size, p))
    total = sum(f[1] for f in files)
    removed = freed = 0
    for _t, size, p in sorted(files):
        if total <= cap:
            break
        try:
            os.unlink(p)
        except OSError:
            continue
        total -= size
        removed += 1
        freed += size
    print("rpc tensor cache %s: %d files, %.1f MB kept, %d removed (%.1f MB)"
          % (top, len(files) - removed, total / 1e6, removed, freed / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
