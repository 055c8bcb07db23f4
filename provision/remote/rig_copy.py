#!/usr/bin/env python3
"""Copy files and directory trees from one rig to another (stdlib only); runs on both rigs.

Sub-commands:

  send        on the SOURCE, read-only. One JSON line on stdin:
                {"items": [ITEM...], "rate": BYTES_PER_S (0 = no limit)}
              ITEM = {"id": "m0", "kind": "file", "path": "/abs", "offset": N}
                   | {"id": "b", "kind": "tree", "path": "/abs/dir", "include": ["bin", "lib"],
                      "skip_names": ["stats"], "skip_dirs": ["tmp"], "tolerant": false}
              writes a framed byte stream (below) on stdout, paced by a token bucket.
  serve ALLOW on the SOURCE, as the forced command of a temporary authorized_keys line (the direct
              path): SSH_ORIGINAL_COMMAND is `ping` or `send <base64url JSON {"items": [{"id": ID,
              "offset": N}]}>`; only the items written into ALLOW (a JSON file) can be asked for,
              at ALLOW's rate, before ALLOW's deadline.
  recv        on the DESTINATION. One JSON line on stdin:
                {"items": {ID: {"kind": "file", "dest": "/abs/final", "partial": "/abs/partial",
                                "mode": 0o644 (default: the source's, group/other write off)}
                           | {"kind": "tree", "dest": "/abs/dir", "skip_existing": false,
                              "tolerant": false}},
                 "via": null | ["ssh", ...], "progress_s": 2.0}
              reads the stream from stdin (relayed by the control machine) or from the stdout of
              `via` (direct: ssh to the source's `serve`). A file item is written to its partial
              path, fsynced and renamed onto its final path only when complete: a final path never
              holds half a file. An interrupted file item keeps its partial; the next copy asks the
              source to resume at its size. JSON event lines on stdout:
                {"event": "start"|"progress"|"done"|"error"|"summary", ...}
  probe       on the DESTINATION. stdin {"paths": [...], "df": "/dir"} -> {"sizes": {p: n|null},
              "free": bytes}

The temporary key that lets the destination run `serve` on the source is rig_keys.py's job.

Stream: frames of a 4-byte big-endian header length, a JSON header, and for `data` frames the
header's `n` payload bytes. Headers: item {id, kind} · file {rel, size, offset, mode, mtime_ns} ·
data {n} · eof {bytes, sha256 (whole file only), changed} · dir {rel, mode} · link {rel, target} ·
error {id, rel, error} · skip {rel, error} · done {id} · end {bytes, seconds}.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import time

CHUNK = 1 << 20


class StreamGone(Exception):
    """The other end of our stdout went away (copy cancelled): stop quietly."""


# ---------------------------------------------------------------------------------------------
# sending


class TokenBucket:
    """`rate` bytes/s on average, bursts up to `cap` bytes; rate 0 = no limit."""

    def __init__(self, rate: float, cap: float | None = None):
        self.rate = float(rate or 0)
        self.cap = float(cap if cap is not None else max(self.rate / 4, 65536))
        self.tokens = self.cap
        self.t = time.monotonic()

    def take(self, n: int) -> float:
        """Spend n tokens; sleep off any debt. Returns the seconds slept."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            time.sleep(wait)
            return wait
        return 0.0


class Out:
    def __init__(self, fh):
        self.fh = fh
        self.bytes = 0

    def frame(self, hdr: dict, payload=b"") -> None:
        h = json.dumps(hdr, separators=(",", ":")).encode()
        try:
            self.fh.write(struct.pack(">I", len(h)) + h)
            if payload:
                self.fh.write(payload)
                self.bytes += len(payload)
        except (OSError, ValueError):
            raise StreamGone() from None

    def flush(self) -> None:
        try:
            self.fh.flush()
        except (OSError, ValueError):
            raise StreamGone() from None


class ReadError(Exception):
    """A source file could not be read (reported as an error frame)."""


def chunk_for(rate: float) -> int:
    if rate and rate > 0:
        return int(max(16384, min(CHUNK, rate / 8)))
    return CHUNK


def send_file(out: Out, path: str, rel: str, offset: int, bucket: TokenBucket, chunk: int) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ReadError(f"{type(e).__name__}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError("not a regular file")
        if offset < 0 or offset > st.st_size:
            offset = 0  # the partial is longer than the file: start over
        out.frame({"t": "file", "rel": rel, "size": st.st_size, "offset": offset,
                   "mode": stat.S_IMODE(st.st_mode) & 0o777, "mtime_ns": st.st_mtime_ns})
        try:
            os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        os.lseek(fd, offset, os.SEEK_SET)
        h = hashlib.sha256() if offset == 0 else None
        buf = bytearray(chunk)
        view = memoryview(buf)
        sent = 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            while True:
                try:
                    n = f.readinto(buf)
                except OSError as e:
                    out.frame({"t": "error", "rel": rel, "error": f"read: {e.strerror or e}"})
                    return sent
                if not n:
                    break
                bucket.take(n)
                out.frame({"t": "data", "n": n}, view[:n])
                if h is not None:
                    h.update(view[:n])
                sent += n
        st2 = os.fstat(fd)
        changed = st2.st_mtime_ns != st.st_mtime_ns or st2.st_size != st.st_size or offset + sent != st.st_size
        out.frame({"t": "eof", "bytes": sent, "sha256": h.hexdigest() if h is not None else None,
                   "changed": changed})
        return sent
    finally:
        os.close(fd)


def send_tree(out: Out, item: dict, bucket: TokenBucket, chunk: int) -> int:
    root = item["path"]
    if not os.path.isdir(root):
        raise ReadError(f"{root}: no such directory")
    skip_names = set(item.get("skip_names") or ())
    skip_dirs = set(item.get("skip_dirs") or ())
    tolerant = bool(item.get("tolerant"))
    total = 0
    tops = item.get("include") or sorted(os.listdir(root))

    def walk(p: str, rel: str) -> None:
        nonlocal total
        try:
            st = os.lstat(p)
        except OSError as e:
            if tolerant:
                out.frame({"t": "skip", "rel": rel, "error": e.strerror or str(e)})
                return
            raise ReadError(f"{rel}: {e.strerror or e}") from None
        name = rel.rsplit("/", 1)[-1]
        if stat.S_ISLNK(st.st_mode):
            out.frame({"t": "link", "rel": rel, "target": os.readlink(p)})
        elif stat.S_ISDIR(st.st_mode):
            if name in skip_dirs:
                return
            out.frame({"t": "dir", "rel": rel, "mode": stat.S_IMODE(st.st_mode) & 0o777})
            try:
                names = sorted(os.listdir(p))
            except OSError as e:
                if tolerant:
                    out.frame({"t": "skip", "rel": rel, "error": e.strerror or str(e)})
                    return
                raise ReadError(f"{rel}: {e.strerror or e}") from None
            for n in names:
                walk(os.path.join(p, n), f"{rel}/{n}")
        elif stat.S_ISREG(st.st_mode):
            if name in skip_names:
                return
            try:
                total += send_file(out, p, rel, 0, bucket, chunk)
            except ReadError as e:
                if not tolerant:
                    raise ReadError(f"{rel}: {e}") from None
                out.frame({"t": "skip", "rel": rel, "error": str(e)})

    for top in tops:
        if "/" in top or top in ("", ".", ".."):
            raise ReadError(f"bad include entry {top!r}")
        p = os.path.join(root, top)
        if os.path.lexists(p):
            walk(p, top)
    return total


def send(req: dict, fh) -> int:
    out = Out(fh)
    rate = float(req.get("rate") or 0)
    bucket = TokenBucket(rate)
    chunk = chunk_for(rate)
    t0 = time.monotonic()
    try:
        for item in req.get("items", []):
            iid = item.get("id")
            out.frame({"t": "item", "id": iid, "kind": item.get("kind")})
            try:
                if item.get("kind") == "file":
                    send_file(out, item["path"], "", int(item.get("offset") or 0), bucket, chunk)
                elif item.get("kind") == "tree":
                    send_tree(out, item, bucket, chunk)
                else:
                    raise ReadError(f"unknown item kind {item.get('kind')!r}")
            except ReadError as e:
                out.frame({"t": "error", "id": iid, "rel": "", "error": str(e)})
                continue
            out.frame({"t": "done", "id": iid})
        out.frame({"t": "end", "bytes": out.bytes, "seconds": round(time.monotonic() - t0, 3)})
        out.flush()
    except StreamGone:
        return 3
    return 0


def serve(allow_path: str) -> int:
    """The forced command of the temporary key: only the allowed items, at the allowed rate."""
    try:
        with open(allow_path) as fh:
            allow = json.load(fh)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"llama-rig copy: cannot read {allow_path}: {e}\n")
        return 2
    if time.time() > float(allow.get("deadline", 0)):
        sys.stderr.write("llama-rig copy: this copy key has expired\n")
        return 2
    cmd = os.environ.get("SSH_ORIGINAL_COMMAND", "").strip()
    if cmd == "ping":
        sys.stdout.write("pong\n")
        return 0
    verb, _, arg = cmd.partition(" ")
    if verb != "send":
        sys.stderr.write("llama-rig copy: refused (this key only copies)\n")
        return 2
    try:
        req = json.loads(base64.urlsafe_b64decode(arg.strip().encode()))
    except (ValueError, TypeError):
        sys.stderr.write("llama-rig copy: bad request\n")
        return 2
    allowed = {it["id"]: it for it in allow.get("items", [])}
    items = []
    for r in req.get("items", []):
        it = allowed.get(r.get("id"))
        if it is None:
            sys.stderr.write(f"llama-rig copy: item {r.get('id')!r} is not allowed\n")
            return 2
        it = dict(it)
        if it.get("kind") == "file":
            it["offset"] = int(r.get("offset") or 0)
        items.append(it)
    return send({"items": items, "rate": allow.get("rate") or 0}, sys.stdout.buffer)


# ---------------------------------------------------------------------------------------------
# receiving


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Truncated(Exception):
    """The stream ended before the `end` frame (the source or the relay went away)."""


class Reader:
    def __init__(self, fh):
        self.fh = fh

    def exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            b = self.fh.read(n - len(buf))
            if not b:
                raise Truncated()
            buf += b
        return bytes(buf)

    def header(self) -> dict:
        (n,) = struct.unpack(">I", self.exact(4))
        if n > 1 << 20:
            raise ValueError("frame header too large (not a llama-rig copy stream)")
        return json.loads(self.exact(n))

    def payload_into(self, n: int, sink) -> None:
        left = n
        while left:
            b = self.fh.read(min(left, CHUNK))
            if not b:
                raise Truncated()
            sink(b)
            left -= len(b)


def safe_join(root: str, rel: str) -> str:
    """root/rel, refusing anything that would land outside root (absolute, `..`, through a link)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"refusing path {rel!r}")
    p = os.path.join(root, *parts)
    parent = os.path.realpath(os.path.dirname(p))
    r = os.path.realpath(root)
    if parent != r and not parent.startswith(r + os.sep):
        raise ValueError(f"refusing path {rel!r} (outside {root})")
    return p


def fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Sink:
    """Where the bytes of one file go: a temp/partial file, renamed onto the final path at eof."""

    def __init__(self, final: str, partial: str, offset: int, mode: int | None):
        self.final, self.partial, self.offset = final, partial, offset
        self.mode = mode
        d = os.path.dirname(partial)
        if d:
            os.makedirs(d, exist_ok=True)
        if offset > 0:
            self.fd = os.open(partial, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            if os.fstat(self.fd).st_size < offset:
                os.close(self.fd)
                raise ValueError(f"partial file shorter than the resume offset {offset}")
            os.ftruncate(self.fd, offset)
            os.lseek(self.fd, offset, os.SEEK_SET)
        else:
            self.fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                              0o600)
        self.h = hashlib.sha256() if offset == 0 else None
        self.n = 0

    def write(self, b: bytes) -> None:
        mv = memoryview(b)
        while mv:
            k = os.write(self.fd, mv)
            mv = mv[k:]
        if self.h is not None:
            self.h.update(b)
        self.n += len(b)

    def finish(self, sha256: str | None) -> None:
        if sha256 is not None and self.h is not None and self.h.hexdigest() != sha256:
            self.abort()
            raise ValueError("the bytes written differ from the bytes sent (sha256)")
        if self.mode is not None:
            os.fchmod(self.fd, self.mode)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.makedirs(os.path.dirname(self.final) or ".", exist_ok=True)
        os.rename(self.partial, self.final)
        fsync_dir(os.path.dirname(self.final) or ".")

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def abort(self) -> None:
        self.close()
        try:
            os.unlink(self.partial)
        except OSError:
            pass


class Receiver:
    """Writes what the stream carries where `items` says; one handler per frame type."""

    def __init__(self, cfg: dict):
        self.items = cfg.get("items") or {}
        self.progress_s = float(cfg.get("progress_s") or 2.0)
        self.results: dict[str, dict] = {}
        self.iid = None
        self.spec: dict = {}
        self.sink: Sink | None = None
        self.cur: dict = {}
        self.discard = False  # the current item failed: its remaining frames are read and dropped
        self.last = 0.0
        self.skipped = 0

    # -- the loop ------------------------------------------------------------------------------
    def run(self, fh) -> int:
        rd = Reader(fh)
        try:
            while True:
                hdr = rd.header()
                t = hdr.get("t")
                if t == "end":
                    break
                if t == "data":
                    self.on_data(rd, int(hdr["n"]))
                elif t in ("item", "done", "error"):
                    getattr(self, f"on_{t}")(hdr)
                elif not self.discard and t in ("file", "eof", "dir", "link", "skip"):
                    try:
                        getattr(self, f"on_{t}")(hdr)
                    except (OSError, ValueError) as e:
                        self.drop_sink(keep=False)
                        self.fail(self.iid, f"{hdr.get('rel') or t}: {type(e).__name__}: {e}")
                        self.discard = True
        except Truncated:
            self.drop_sink(keep=True)  # a file item keeps its partial: the next copy resumes it
            self.fail(self.iid, "the stream ended early (the source or the connection went away)")
            emit({"event": "summary", "ok": False, "truncated": True})
            return 2
        except (OSError, ValueError) as e:
            self.drop_sink(keep=True)
            self.fail(self.iid, f"{type(e).__name__}: {e}")
            emit({"event": "summary", "ok": False, "error": f"{type(e).__name__}: {e}"})
            return 2
        for i in self.items:
            self.fail(i, "the source did not send it")
        ok = all(r.get("event") == "done" for r in self.results.values())
        emit({"event": "summary", "ok": ok, "skipped": self.skipped})
        return 0 if ok else 1

    def fail(self, iid, error: str) -> None:
        if iid is None or iid in self.results:
            return
        ev = {"event": "error", "id": iid, "error": error}
        spec = self.items.get(iid) or {}
        if spec.get("kind") == "file":
            ev["path"] = spec.get("dest")
        self.results[iid] = ev
        emit(ev)

    def drop_sink(self, keep: bool) -> None:
        """Stop writing the current file: a file item's partial is kept (`keep`), a tree's
        temp file is removed."""
        if self.sink is None:
            return
        if keep and self.spec.get("kind") == "file":
            self.sink.close()
        else:
            self.sink.abort()
        self.sink = None

    # -- frames --------------------------------------------------------------------------------
    def on_item(self, hdr: dict) -> None:
        self.iid = hdr.get("id")
        self.spec = self.items.get(self.iid) or {}
        self.cur = {"bytes": 0, "files": 0, "skipped": 0, "t0": time.monotonic()}
        self.discard = not self.spec
        if not self.spec:
            self.fail(self.iid, "not expected here")
        elif self.spec.get("kind") == "tree":
            try:
                os.makedirs(self.spec["dest"], exist_ok=True)
            except OSError as e:
                self.fail(self.iid, f"{self.spec['dest']}: {e.strerror or e}")
                self.discard = True

    def on_data(self, rd: Reader, n: int) -> None:
        if self.sink is None or self.discard:
            rd.payload_into(n, lambda b: None)
            return
        rd.payload_into(n, self.sink.write)
        self.cur["bytes"] += n
        now = time.monotonic()
        if now - self.last >= self.progress_s:  # also a sign of life for the control machine
            self.last = now
            if self.spec.get("kind") == "file":
                emit({"event": "progress", "id": self.iid, "path": self.spec["dest"],
                      "bytes": self.sink.offset + self.sink.n, "total": self.cur.get("size")})
            else:
                emit({"event": "progress", "id": self.iid, "path": self.spec["dest"],
                      "bytes": self.cur["bytes"], "total": None})

    def on_file(self, hdr: dict) -> None:
        offset = int(hdr.get("offset") or 0)
        if self.spec.get("kind") == "file":
            self.cur["size"], self.cur["offset"] = int(hdr["size"]), offset
            emit({"event": "start", "id": self.iid, "path": self.spec["dest"], "size": int(hdr["size"]),
                  "offset": offset})
            mode = self.spec.get("mode", int(hdr.get("mode", 0o644)) & 0o755)
            self.sink = Sink(self.spec["dest"], self.spec["partial"], offset, mode)
            return
        final = safe_join(self.spec["dest"], hdr["rel"])
        if self.spec.get("skip_existing") and os.path.lexists(final):
            return  # its data frames are dropped
        self.sink = Sink(final, final + ".llama-rig-partial", 0, int(hdr.get("mode", 0o644)) & 0o755)

    def on_eof(self, hdr: dict) -> None:
        if self.sink is None:
            return
        if hdr.get("changed"):
            self.drop_sink(keep=False)
            if self.spec.get("tolerant"):
                self.on_skip(hdr)
                return
            raise ValueError("the file changed on the source while it was read")
        sink, self.sink = self.sink, None
        sink.finish(hdr.get("sha256"))
        self.cur["files"] += 1

    def on_dir(self, hdr: dict) -> None:
        d = safe_join(self.spec["dest"], hdr["rel"])
        os.makedirs(d, exist_ok=True)
        os.chmod(d, (int(hdr.get("mode", 0o755)) & 0o755) | 0o700)

    def on_link(self, hdr: dict) -> None:
        final = safe_join(self.spec["dest"], hdr["rel"])
        if self.spec.get("skip_existing") and os.path.lexists(final):
            return
        tmp = final + ".llama-rig-partial"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(hdr["target"], tmp)
        os.replace(tmp, final)

    def on_skip(self, hdr: dict) -> None:
        self.skipped += 1
        self.cur["skipped"] += 1

    def on_error(self, hdr: dict) -> None:
        self.drop_sink(keep=True)  # what arrived of a file item is a prefix of it: kept
        if not self.discard:
            self.fail(self.iid, (f"{hdr['rel']}: " if hdr.get("rel") else "") + str(hdr.get("error")))
        self.discard = True

    def on_done(self, hdr: dict) -> None:
        if not self.discard and self.iid not in self.results:
            res = {"event": "done", "id": self.iid, "bytes": self.cur["bytes"], "files": self.cur["files"],
                   "skipped": self.cur["skipped"], "seconds": round(time.monotonic() - self.cur["t0"], 3)}
            if self.spec.get("kind") == "file":
                res.update({"path": self.spec["dest"], "size": self.cur.get("size"),
                            "resumed_from": self.cur.get("offset", 0)})
            self.results[self.iid] = res
            emit(res)
        self.discard = False
        self.iid = None


def recv(cfg: dict) -> int:
    rcv = Receiver(cfg)
    via = cfg.get("via")
    if not via:
        return rcv.run(sys.stdin.buffer)
    proc = subprocess.Popen(via, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rc = rcv.run(proc.stdout)
    finally:
        try:
            proc.stdout.close()
        except OSError:
            pass
        try:
            err = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
    if rc != 0 and err:
        emit({"event": "via_error", "error": err.decode(errors="replace").strip()[-500:]})
    return rc


# ---------------------------------------------------------------------------------------------
# probe (destination)


def probe(cfg: dict) -> int:
    sizes = {}
    for p in cfg.get("paths", []):
        try:
            st = os.lstat(p)
            sizes[p] = st.st_size if stat.S_ISREG(st.st_mode) else None
        except OSError:
            sizes[p] = None
    d = cfg.get("df") or "/"
    while d and not os.path.exists(d):
        d = os.path.dirname(d)
    st = os.statvfs(d or "/")
    emit({"sizes": sizes, "free": st.f_bavail * st.f_frsize, "df": d})
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    cmd = argv[0]
    if cmd == "serve":
        return serve(argv[1])
    # the binary stream follows this line on stdin (recv): read it from the byte buffer, never
    # through the text layer (which reads ahead)
    line = sys.stdin.buffer.readline().decode()
    cfg = json.loads(line) if line.strip() else {}
    if cmd == "send":
        return send(cfg, sys.stdout.buffer)
    if cmd == "recv":
        return recv(cfg)
    if cmd == "probe":
        return probe(cfg)
    sys.stderr.write(f"unknown command {cmd!r}\n")
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(3)
