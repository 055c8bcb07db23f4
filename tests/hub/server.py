"""A local stand-in for the Hugging Face Hub, good enough for the real ``huggingface_hub`` client.

Stdlib only.  Two listeners:

* the *hub* (``.endpoint``): ``/api/models/...`` JSON endpoints (info, tree, paths-info, refs,
  commits) and ``/{org}/{name}/resolve/{rev}/{path}``;
* the *CDN* (``.cdn_endpoint``, a second port = another origin): serves LFS bytes with Range support.
  ``/resolve`` for an LFS file answers ``302`` there, like the real Hub does, so the client drops
  its ``Authorization`` header before fetching bytes (exactly like with the real CDN).

LFS rule (consistent everywhere): a file is LFS iff its size is >= 1 byte and its name ends with one
of ``HubRepo.lfs_suffixes`` (default ``(".gguf",)``).  LFS files carry ``lfs: {sha256|oid, size,
pointerSize}`` in listings and ``X-Linked-Etag: "<sha256>"`` on ``/resolve``; other files are served
inline by ``/resolve`` with ``ETag: "<git blob sha1>"``.  No xet header is ever sent.

Usable in-process (``StandInHub(...).start()``) or standalone::

    python3 server.py --config repos.json --host 127.0.0.1 --port 0 --cdn-port 0 [--ready-file F]

In standalone mode the test process drives it through ``/_test/*`` control endpoints
(see ``_Control`` below and ``RemoteHub`` in ``fixtures.py``).
"""
from __future__ import annotations

import abc
import argparse
import base64
import datetime as _dt
import fnmatch
import hashlib
import hmac
import json
import os
import random
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

CHUNK = 1 << 20  # 1 MiB: never hold a big blob in RAM
EPOCH = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)

# --------------------------------------------------------------------------------------------- blobs


class Blob(abc.ABC):
    """File content.  Subclasses stream ``[start, end)`` in chunks; sha256 is computed once."""

    size: int
    _sha256: str | None = None

    @abc.abstractmethod
    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """Yield the bytes [start, end) in chunks."""

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            for c in self.iter_range(0, self.size):
                h.update(c)
            self._sha256 = h.hexdigest()
        return self._sha256

    def git_oid(self) -> str:
        h = hashlib.sha1(b"blob %d\0" % self.size)
        for c in self.iter_range(0, self.size):
            h.update(c)
        return h.hexdigest()

    def read_all(self) -> bytes:
        return b"".join(self.iter_range(0, self.size))


class BytesBlob(Blob):
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def iter_range(self, start, end):
        for i in range(start, end, CHUNK):
            yield self.data[i : min(end, i + CHUNK)]


class FileBlob(Blob):
    """Served from disk in chunks; the file must not change after commit."""

    def __init__(self, path: str | os.PathLike, sha256: str | None = None):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self._sha256 = sha256

    def iter_range(self, start, end):
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                c = f.read(min(CHUNK, left))
                if not c:
                    raise OSError(f"{self.path} shrank while serving")
                left -= len(c)
                yield c


class GeneratedBlob(Blob):
    """Deterministic pseudo-random bytes of any size, generated on the fly (no disk, no RAM).

    Block i (1 MiB) = a per-seed random 1 MiB base block, rotated by a block-dependent amount and
    stamped with i in its first 8 bytes: every block differs, and generation runs at memcpy speed
    (GB/s) so multi-GB benchmark files are cheap to serve.
    """

    BLOCK = 1 << 20

    def __init__(self, size: int, seed: str | int = 0, sha256: str | None = None):
        self.size = int(size)
        self.seed = str(seed)
        self._sha256 = sha256
        self._base = random.Random(f"standin:{self.seed}").randbytes(self.BLOCK)

    def _block(self, i: int) -> bytes:
        n = min(self.BLOCK, self.size - i * self.BLOCK)
        off = (i * 7919 + 1) % self.BLOCK
        b = self._base
        blk = i.to_bytes(8, "little") + b[off + 8 :] + b[:off] if off + 8 <= self.BLOCK else i.to_bytes(8, "little") + b[8:]
        return blk[:n]

    def iter_range(self, start, end):
        pos = start
        while pos < end:
            i, off = divmod(pos, self.BLOCK)
            b = self._block(i)[off : off + (end - pos)]
            pos += len(b)
            yield b


def make_blob(v: Any) -> Blob:
    if isinstance(v, Blob):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return BytesBlob(bytes(v))
    if isinstance(v, str):
        return BytesBlob(v.encode())
    if isinstance(v, os.PathLike):
        return FileBlob(v)
    if isinstance(v, dict):  # JSON spec (config file / control endpoint)
        if "b64" in v:
            return BytesBlob(base64.b64decode(v["b64"]))
        if "text" in v:
            return BytesBlob(v["text"].encode())
        if "path" in v:
            return FileBlob(v["path"], sha256=v.get("sha256"))
        if "random" in v:
            r = v["random"]
            return GeneratedBlob(r["size"], r.get("seed", 0), sha256=r.get("sha256"))
    raise TypeError(f"cannot make a blob out of {type(v).__name__}")


def blob_spec(v: Any) -> Any:
    """Inverse of make_blob for the JSON control protocol (None = delete)."""
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"b64": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, str):
        return {"text": v}
    if isinstance(v, os.PathLike):
        return {"path": str(Path(v).resolve())}
    if isinstance(v, GeneratedBlob):
        return {"random": {"size": v.size, "seed": v.seed}}
    if isinstance(v, FileBlob):
        return {"path": str(v.path.resolve())}
    if isinstance(v, BytesBlob):
        return {"b64": base64.b64encode(v.data).decode()}
    if isinstance(v, dict):
        return v
    raise TypeError(type(v).__name__)


# --------------------------------------------------------------------------------------------- repos


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    date: str
    files: dict[str, Blob]


class HubRepo:
    def __init__(self, repo_id: str, lfs_suffixes: tuple[str, ...] = (".gguf",)):
        self.repo_id = repo_id
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.revisions: dict[str, str] = {}  # branch -> commit sha
        self.commits: dict[str, Commit] = {}
        self.gated_token: str | None = None
        self.gated_files_only = False
        self.created = EPOCH.isoformat().replace("+00:00", ".000Z")

    # -- content helpers
    def is_lfs(self, path: str, blob: Blob) -> bool:
        return blob.size >= 1 and path.endswith(self.lfs_suffixes)

    def resolve(self, rev: str) -> str | None:
        if rev in self.revisions:
            return self.revisions[rev]
        if len(rev) == 40 and rev in self.commits:
            return rev
        return None

    def commit(self, files: dict[str, Any], branch: str = "main", message: str | None = None,
               delete: list[str] | tuple[str, ...] = ()) -> str:
        parent = self.revisions.get(branch)
        new: dict[str, Blob] = dict(self.commits[parent].files) if parent else {}
        for p, v in files.items():
            p = p.strip("/")
            if v is None:
                new.pop(p, None)
            else:
                new[p] = make_blob(v)
        for p in delete:
            new.pop(p.strip("/"), None)
        h = hashlib.sha1()
        h.update(f"{self.repo_id}\0{branch}\0{parent}\0{len(self.commits)}\0".encode())
        for p in sorted(new):
            b = new[p]
            h.update(f"{p}\0{b.size}\0{b.sha256}\n".encode())  # sha256 computed once, cached on the blob
        sha = h.hexdigest()
        date = (EPOCH + _dt.timedelta(minutes=len(self.commits))).isoformat().replace("+00:00", ".000Z")
        self.commits[sha] = Commit(sha, parent, message or f"commit {len(self.commits)}", date, new)
        self.revisions[branch] = sha
        return sha

    # -- listings
    def dirs(self, files: dict[str, Blob]) -> set[str]:
        out = set()
        for p in files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    def file_entry(self, c: Commit, path: str, expand: bool = False) -> dict:
        b = c.files[path]
        e: dict[str, Any] = {"type": "file", "size": b.size, "path": path}
        if self.is_lfs(path, b):
            ptr = self.pointer(b)
            e["oid"] = hashlib.sha1(b"blob %d\0" % len(ptr) + ptr).hexdigest()
            e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": len(ptr)}
        else:
            e["oid"] = _cached_oid(b)
        if expand:
            e["lastCommit"] = {"id": c.sha, "title": c.message, "date": c.date}
            e["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                       "pickleImportScan": None}
        return e

    def dir_entry(self, c: Commit, d: str, expand: bool = False) -> dict:
        h = hashlib.sha1(f"tree\0{c.sha}\0{d}".encode()).hexdigest()
        e: dict[str, Any] = {"type": "directory", "oid": h, "size": 0, "path": d}
        if expand:
            e["lastCommit"] = {"id": c.sha, "title": c.message, "date": c.date}
        return e

    @staticmethod
    def pointer(b: Blob) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{b.sha256}\nsize {b.size}\n".encode()


def _cached_oid(b: Blob) -> str:
    oid = getattr(b, "_git_oid", None)
    if oid is None:
        oid = b._git_oid = b.git_oid()
    return oid


# --------------------------------------------------------------------------------------------- faults

FAULT_KINDS = ("corrupt", "drop_after", "stall", "ignore_range", "status")


@dataclass
class Fault:
    glob: str
    kind: str
    params: dict
    remaining: int | None  # None = forever
    id: int = 0
    hits: int = 0


class Faults:
    """Fault knobs matched (fnmatch) against the repo-relative file path, e.g. ``"UD-Q6_K_XL/*-00003-*"``,
    and also against ``"org/name/path"``.  Byte faults apply to byte-serving GETs (the CDN, or
    ``/resolve`` for non-LFS files); ``status`` applies to ``/resolve`` (HEAD/GET) and CDN requests.

    kinds / params:
      corrupt       offset=<abs byte offset, default size//2>  flips that byte; size & metadata unchanged
      drop_after    bytes=N                                    close the connection after N body bytes
      stall         seconds=S, after=N (default 0)             sleep S s after N body bytes, then go on
      ignore_range                                             answer 200 + whole file even if Range sent
      status        code=503, where="cdn"|"resolve"|"any"       answer that HTTP status instead
    count=K: the fault applies to the next K matching requests only, then heals.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._next = 1

    def set(self, path_glob: str, kind: str, count: int | None = None, **params) -> int:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {FAULT_KINDS}")
        with self._lock:
            f = Fault(path_glob, kind, params, count, self._next)
            self._next += 1
            self._faults.append(f)
            return f.id

    def clear(self, fault_id: int | None = None) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if fault_id is not None and f.id != fault_id]

    def list(self) -> list[dict]:
        with self._lock:
            return [asdict(f) for f in self._faults]

    def take(self, repo_id: str, path: str, where: str) -> list[Fault]:
        """Consume the faults that apply to one request (decrementing counts)."""
        out = []
        with self._lock:
            for f in list(self._faults):
                if not (fnmatch.fnmatchcase(path, f.glob) or fnmatch.fnmatchcase(f"{repo_id}/{path}", f.glob)):
                    continue
                if f.kind == "status":
                    w = f.params.get("where", "cdn")
                    if w != "any" and w != where:
                        continue
                elif where != "bytes":
                    continue
                out.append(f)
                f.hits += 1
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self._faults.remove(f)
        return out


# --------------------------------------------------------------------------------------------- log


@dataclass
class RequestRecord:
    server: str  # "hub" | "cdn" | "control"
    method: str
    path: str  # URL path, unquoted, no query string
    query: str
    status: int
    bytes_sent: int  # body bytes actually written
    auth: bool  # an Authorization header was present (its value is never stored)
    range: str | None
    repo_id: str | None = None
    file: str | None = None  # repo-relative file path for /resolve and CDN requests
    faults: list[str] = field(default_factory=list)
    error: str | None = None
    t: float = 0.0
    done: bool = False  # the handler has finished with this request


class _RequestLog(list):
    def clear_log(self):
        self.clear()

    def downloads(self, glob: str = "*") -> list[RequestRecord]:
        """Byte-serving GETs (CDN, or inline /resolve) whose file matches glob."""
        return [r for r in self if r.method == "GET" and r.file and r.bytes_sent > 0
                and (r.server == "cdn" or "/resolve/" in r.path) and fnmatch.fnmatchcase(r.file, glob)]


# --------------------------------------------------------------------------------------------- errors


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _iso(ts: str) -> str:
    return ts


# --------------------------------------------------------------------------------------------- the hub


class StandInHub:
    """The server.  ``start()`` runs both listeners in daemon threads."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0, public_host: str | None = None,
                 api_delay: float = 0.0):
        self.host = host
        # host written into CDN redirect URLs; a wildcard bind needs a reachable name
        self.public_host = public_host or ("127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host)
        self.repos: dict[str, HubRepo] = {}
        self.faults = Faults()
        self.requests: _RequestLog = _RequestLog()
        self._log_lock = threading.Lock()
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self.api_delay = api_delay
        self._port, self._cdn_port = port, cdn_port
        self._httpd: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # ---- lifecycle
    def start(self) -> "StandInHub":
        self._httpd = _Server((self.host, self._port), _HubHandler, self, "hub")
        self._cdn = _Server((self.host, self._cdn_port), _HubHandler, self, "cdn")
        for s in (self._httpd, self._cdn):
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for s in (self._httpd, self._cdn):
            if s is not None:
                s.shutdown()
                s.server_close()
        self._httpd = self._cdn = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def cdn_port(self) -> int:
        return self._cdn.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://{_fmt_host(self.public_host)}:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://{_fmt_host(self.public_host)}:{self.cdn_port}"

    # ---- repo API
    def add_repo(self, repo_id: str, lfs_suffixes: tuple[str, ...] = (".gguf",)) -> HubRepo:
        if repo_id.count("/") != 1:
            raise ValueError("repo_id must be 'org/name'")
        with self._lock:
            return self.repos.setdefault(repo_id, HubRepo(repo_id, lfs_suffixes))

    def commit(self, repo_id: str, files: dict[str, Any], branch: str = "main", message: str | None = None,
               delete: list[str] | tuple[str, ...] = ()) -> str:
        """New commit on ``branch`` (created if needed, from the current main... or empty), inheriting the
        previous files.  ``files`` values: bytes, str, Path, Blob, or None (= delete)."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.add_repo(repo_id)
            if branch not in repo.revisions and "main" in repo.revisions and branch != "main":
                repo.revisions[branch] = repo.revisions["main"]
            return repo.commit(files, branch=branch, message=message, delete=delete)

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        with self._lock:
            repo = self.repos[repo_id]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(revision)
            repo.revisions[branch] = sha
            return sha

    def gated(self, repo_id: str, token: str | None, files_only: bool = False) -> None:
        """Require ``Authorization: Bearer <token>`` (None = ungate).  Without a header: 401, wrong token:
        403, both ``X-Error-Code: GatedRepo``.  ``files_only``: API metadata stays public (like the real Hub),
        only ``/resolve`` is gated."""
        with self._lock:
            r = self.repos.get(repo_id) or self.add_repo(repo_id)
            r.gated_token = token
            r.gated_files_only = files_only

    def sha(self, repo_id: str, rev: str = "main") -> str:
        return self.repos[repo_id].resolve(rev)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, Blob]:
        r = self.repos[repo_id]
        return dict(r.commits[r.resolve(rev)].files)

    def file_sha256(self, repo_id: str, path: str, rev: str = "main") -> str:
        return self.files(repo_id, rev)[path].sha256

    def clear_requests(self) -> None:
        with self._log_lock:
            self.requests.clear()

    def load_config(self, cfg: dict) -> None:
        for r in cfg.get("repos", []):
            self.add_repo(r["repo_id"], tuple(r.get("lfs_suffixes", (".gguf",))))
            for c in r.get("commits", []):
                self.commit(r["repo_id"], {p: (None if v is None else make_blob(v)) for p, v in c["files"].items()},
                            branch=c.get("branch", "main"), message=c.get("message"))
            if r.get("gated_token"):
                self.gated(r["repo_id"], r["gated_token"], files_only=r.get("gated_files_only", False))
        for f in cfg.get("faults", []):
            f = dict(f)
            self.faults.set(f.pop("glob"), f.pop("kind"), **f)

    # ---- internals
    def _log(self, rec: RequestRecord) -> None:
        with self._log_lock:
            self.requests.append(rec)

    def _sign(self, path: str) -> str:
        return hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()[:32]

    def _repo_for(self, repo_id: str, auth_header: str | None, files: bool) -> HubRepo:
        r = self.repos.get(repo_id)
        if r is None:
            raise HubError(401 if auth_header is None else 404, "RepoNotFound", "Repository not found")
        if r.gated_token is not None and (files or not r.gated_files_only):
            if auth_header is None:
                raise HubError(401, "GatedRepo", "Access to this model is restricted. You must be authenticated.")
            if not hmac.compare_digest(auth_header.encode(), f"Bearer {r.gated_token}".encode()):
                raise HubError(403, "GatedRepo", "Access to this model is restricted and you are not in the list.")
        return r

    def _rev(self, r: HubRepo, rev: str) -> Commit:
        sha = r.resolve(rev)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return r.commits[sha]


def _fmt_host(h: str) -> str:
    return f"[{h}]" if ":" in h else h


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, handler, hub: StandInHub, role: str):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.hub, self.role = hub, role
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):  # client hung up etc.: stay quiet
        pass


class _Drop(Exception):
    pass


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StandInHub/1.0"

    def log_message(self, *a):  # silence stderr
        pass

    # ---- plumbing
    @property
    def hub(self) -> StandInHub:
        return self.server.hub

    def _begin(self):
        parts = urlsplit(self.path)
        self.raw_path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.query_str = parts.query
        self.rec = RequestRecord(self.server.role, self.command, unquote(parts.path), parts.query, 0, 0,
                                 self.headers.get("Authorization") is not None, self.headers.get("Range"),
                                 t=time.time())
        # logged at once and updated in place: a stalled/in-flight request is visible immediately
        # (status 0 until the headers go out); control-channel calls are not logged
        if not parts.path.startswith("/_test"):
            self.hub._log(self.rec)

    def _finish(self):
        self.rec.done = True

    def _send(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"",
              ctype: str = "application/json; charset=utf-8"):
        self.send_response(status)
        h = {"Content-Type": ctype, "Content-Length": str(len(body))}
        h.update(headers or {})
        for k, v in h.items():
            self.send_header(k, v)
        self.end_headers()
        self.rec.status = status
        if body and self.command != "HEAD":
            self.wfile.write(body)
            self.rec.bytes_sent += len(body)

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None):
        self._send(status, headers, json.dumps(obj).encode())

    def _error(self, e: HubError):
        h = {"X-Error-Message": e.message}
        if e.code:
            h["X-Error-Code"] = e.code
        if e.commit:
            h["X-Repo-Commit"] = e.commit
        self.rec.error = e.code
        self._json({"error": e.message}, e.status, h)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self):
        self._begin()
        try:
            if self.server.role == "cdn":
                self._cdn()
            else:
                self._route()
        except HubError as e:
            self._error(e)
        except (_Drop, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # bug in the stand-in: make it loud in the log and to the client
            self.rec.error = f"{type(e).__name__}: {e}"
            try:
                self._json({"error": self.rec.error}, 500)
            except OSError:
                self.close_connection = True
        finally:
            self._finish()

    do_GET = do_HEAD = do_POST = do_DELETE = _dispatch

    # ---- routing
    def _route(self):
        segs = [unquote(s) for s in self.raw_path.split("/")[1:]]
        m = self.command
        if segs[:1] == ["_test"]:
            self.rec.server = "control"
            return _Control(self).handle(segs[1:])
        if self.hub.api_delay:
            time.sleep(self.hub.api_delay)
        auth = self.headers.get("Authorization")
        if segs[:2] == ["api", "agent-harnesses"] and m == "GET":
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if len(segs) >= 4 and segs[0] == "api" and segs[1] == "models":
            repo_id = f"{segs[2]}/{segs[3]}"
            self.rec.repo_id = repo_id
            rest = segs[4:]
            with self.hub._lock:
                repo = self.hub._repo_for(repo_id, auth, files=False)
                if not rest and m == "GET":
                    return self._model_info(repo, "main")
                if rest[:1] == ["revision"] and len(rest) == 2 and m == "GET":
                    return self._model_info(repo, rest[1])
                if rest[:1] == ["tree"] and len(rest) >= 2 and m == "GET":
                    return self._tree(repo, rest[1], "/".join(rest[2:]))
                if rest[:1] == ["paths-info"] and len(rest) == 2 and m == "POST":
                    return self._paths_info(repo, rest[1])
                if rest[:1] == ["commits"] and len(rest) == 2 and m == "GET":
                    return self._commits(repo, rest[1])
                if rest[:1] == ["refs"] and m == "GET":
                    return self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                                    for b, s in repo.revisions.items()], "tags": [], "converts": []})
            raise HubError(404, None, "Not Found")
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), auth)
        raise HubError(404, None, "Not Found")

    def _model_info(self, repo: HubRepo, rev: str):
        c = self.hub._rev(repo, rev)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        sib = []
        for p in sorted(c.files):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                e = repo.file_entry(c, p)
                s["size"] = e["size"]
                s["blobId"] = e["oid"]
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["lfs"]["size"],
                                "pointerSize": e["lfs"]["pointerSize"]}
            sib.append(s)
        self._json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": c.sha,
            "lastModified": c.date, "createdAt": repo.created, "private": False,
            "gated": "manual" if repo.gated_token else False, "disabled": False, "downloads": 0, "likes": 0,
            "library_name": "gguf", "tags": ["gguf"], "siblings": sib,
            "usedStorage": sum(b.size for b in c.files.values()),
        })

    def _commits(self, repo: HubRepo, rev: str):
        """`GET /api/models/{repo}/commits/{rev}`: the history from rev back, newest first (one page)."""
        c: Commit | None = self.hub._rev(repo, rev)
        out = []
        while c is not None:
            out.append({"id": c.sha, "title": c.message, "message": "", "date": c.date,
                        "authors": [{"user": "stand-in"}]})
            c = repo.commits.get(c.parent) if c.parent else None
        self._json(out)

    def _entries(self, repo: HubRepo, c: Commit, base: str, recursive: bool, expand: bool) -> list[dict]:
        dirs = repo.dirs(c.files)
        base = base.strip("/")
        if base and base not in dirs:
            if base in c.files:  # tree of a file path: the hub answers with that single entry? keep it simple
                return [repo.file_entry(c, base, expand)]
            raise HubError(404, "EntryNotFound", f"{base} does not exist on {c.sha}", c.sha)
        pre = base + "/" if base else ""
        out = []
        for d in sorted(dirs):
            if d.startswith(pre) and (recursive or "/" not in d[len(pre):]):
                out.append(repo.dir_entry(c, d, expand))
        for p in sorted(c.files):
            if p.startswith(pre) and (recursive or "/" not in p[len(pre):]):
                out.append(repo.file_entry(c, p, expand))
        out.sort(key=lambda e: e["path"])
        return out

    def _tree(self, repo: HubRepo, rev: str, path: str):
        c = self.hub._rev(repo, rev)
        q = lambda k: self.query.get(k, ["false"])[0].lower() in ("1", "true")
        entries = self._entries(repo, c, path, q("recursive"), q("expand"))
        page = 50 if q("expand") else 1000
        cursor = int(self.query.get("cursor", ["0"])[0] or 0)
        chunk = entries[cursor: cursor + page]
        headers = {}
        if cursor + page < len(entries):
            qs = {k: v[0] for k, v in self.query.items()}
            qs["cursor"] = str(cursor + page)
            nxt = self.hub.endpoint + self.raw_path + "?" + "&".join(f"{k}={quote(v)}" for k, v in qs.items())
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(chunk, headers=headers)

    def _paths_info(self, repo: HubRepo, rev: str):
        c = self.hub._rev(repo, rev)
        body = self._body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            d = json.loads(body or b"{}")
            paths, expand = d.get("paths", []), bool(d.get("expand"))
        else:
            f = parse_qs(body.decode(), keep_blank_values=True)
            paths = f.get("paths", [])
            expand = f.get("expand", ["false"])[0].lower() in ("1", "true")
        dirs = repo.dirs(c.files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in c.files:
                out.append(repo.file_entry(c, p, expand))
            elif p in dirs:
                out.append(repo.dir_entry(c, p, expand))
        self._json(out)

    def _resolve(self, repo_id: str, rev: str, path: str, auth: str | None):
        self.rec.repo_id, self.rec.file = repo_id, path
        with self.hub._lock:
            repo = self.hub._repo_for(repo_id, auth, files=True)
            c = self.hub._rev(repo, rev)
            if path not in c.files:
                raise HubError(404, "EntryNotFound", f"{path} does not exist on {c.sha}", c.sha)
            blob = c.files[path]
            lfs = repo.is_lfs(path, blob)
            entry = repo.file_entry(c, path)
        for f in self.hub.faults.take(repo_id, path, "resolve"):
            self.rec.faults.append(f.kind)
            raise HubError(int(f.params.get("code", 503)), None, "injected fault")
        base = {"X-Repo-Commit": c.sha, "Accept-Ranges": "bytes", "Vary": "Origin, Accept-Encoding"}
        if lfs:
            cdn_path = f"/{repo_id}/{c.sha}/{quote(path)}"
            loc = f"{self.hub.cdn_endpoint}{cdn_path}?sig={self.hub._sign(unquote(cdn_path))}"
            h = dict(base)
            h.update({"Location": loc, "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size),
                      "ETag": f'"{entry["oid"]}"', "Content-Length": "0"})
            self.send_response(302)
            for k, v in h.items():
                self.send_header(k, v)
            self.end_headers()
            self.rec.status = 302
            return
        self._serve_blob(repo_id, path, blob, dict(base, ETag=f'"{entry["oid"]}"'))

    def _cdn(self):
        if self.command not in ("GET", "HEAD"):
            raise HubError(405, None, "Method Not Allowed")
        segs = [unquote(s) for s in self.raw_path.split("/")[1:]]
        if len(segs) < 4:
            raise HubError(404, None, "Not Found")
        repo_id, sha, path = f"{segs[0]}/{segs[1]}", segs[2], "/".join(segs[3:])
        self.rec.repo_id, self.rec.file = repo_id, path
        sig = self.query.get("sig", [""])[0]
        if not hmac.compare_digest(sig, self.hub._sign(unquote(self.raw_path))):
            raise HubError(403, None, "Bad signature")
        with self.hub._lock:
            repo = self.hub.repos.get(repo_id)
            c = repo.commits.get(sha) if repo else None
            if c is None or path not in c.files:
                raise HubError(404, None, "NoSuchKey")
            blob = c.files[path]
        for f in self.hub.faults.take(repo_id, path, "cdn"):
            self.rec.faults.append(f.kind)
            raise HubError(int(f.params.get("code", 503)), None, "injected fault")
        self._serve_blob(repo_id, path, blob, {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes",
                                               "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
                                               "Cache-Control": "public, max-age=604800, immutable"})

    # ---- bytes
    def _serve_blob(self, repo_id: str, path: str, blob: Blob, headers: dict[str, str]):
        faults = self.hub.faults.take(repo_id, path, "bytes") if self.command == "GET" else []
        kinds = {f.kind: f for f in faults}
        self.rec.faults.extend(f.kind for f in faults)
        size = blob.size
        start, end = 0, size  # [start, end)
        status = 200
        rng = self.headers.get("Range")
        if rng and "ignore_range" not in kinds:
            r = _parse_range(rng, size)
            if r is None:
                raise HubError(416, None, "Range Not Satisfiable")
            start, end = r
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(status)
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(end - start)})
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.rec.status = status
        if self.command == "HEAD":
            return
        if isinstance(blob, FileBlob) and not faults and end > start:
            with open(blob.path, "rb") as f:  # zero-copy fast path for big on-disk files
                self.wfile.flush()
                sent = 0
                while sent < end - start:
                    n = self.connection.sendfile(f, start + sent, end - start - sent)
                    if not n:
                        raise _Drop()
                    sent += n
                    self.rec.bytes_sent = sent
            return
        corrupt = kinds.get("corrupt")
        c_off = int(corrupt.params.get("offset", size // 2)) if corrupt else -1
        drop = kinds.get("drop_after")
        drop_n = int(drop.params.get("bytes", drop.params.get("n", 0))) if drop else -1
        stall = kinds.get("stall")
        stall_after = int(stall.params.get("after", 0)) if stall else -1
        stalled = False
        pos = start
        sent = 0
        if stall and stall_after == 0:
            time.sleep(float(stall.params.get("seconds", 5)))
            stalled = True
        for chunk in blob.iter_range(start, end):
            if corrupt and pos <= c_off < pos + len(chunk):
                b = bytearray(chunk)
                b[c_off - pos] ^= 0xFF
                chunk = bytes(b)
            pieces = [chunk]
            if stall and not stalled and sent < stall_after < sent + len(chunk):
                k = stall_after - sent
                pieces = [chunk[:k], chunk[k:]]
            for piece in pieces:
                if drop and sent + len(piece) >= drop_n:
                    k = drop_n - sent
                    if k > 0:
                        self.wfile.write(piece[:k])
                        sent += k
                    self.rec.bytes_sent = sent
                    self.rec.error = "dropped"
                    self.wfile.flush()
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    raise _Drop()
                self.wfile.write(piece)
                sent += len(piece)
                self.rec.bytes_sent = sent
                if stall and not stalled and sent >= stall_after:
                    self.wfile.flush()
                    time.sleep(float(stall.params.get("seconds", 5)))
                    stalled = True
            pos += len(chunk)


def _parse_range(h: str, size: int) -> tuple[int, int] | None:
    """Single byte range only (what the client sends).  Returns [start, end) or None if unsatisfiable."""
    h = h.strip()
    if not h.startswith("bytes=") or "," in h:
        return None
    a, _, b = h[6:].partition("-")
    try:
        if a == "":
            n = int(b)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        start = int(a)
        end = int(b) + 1 if b else size
    except ValueError:
        return None
    end = min(end, size)
    if start >= size or start >= end:
        return None
    return start, end


class _Control:
    """``/_test/*`` endpoints (JSON), so a test process can drive a standalone server:

    GET  /_test/state                          endpoint, cdn_endpoint, repos {id: {branches, gated}}
    POST /_test/repos      {"repo_id"}
    POST /_test/commit     {"repo_id","branch","message","files": {path: spec|null}} -> {"sha"}
         spec = {"b64"}|{"text"}|{"path"[,"sha256"]}|{"random":{"size","seed"}}
    POST /_test/branch     {"repo_id","branch","revision"}
    POST /_test/gated      {"repo_id","token"|null,"files_only"}
    GET  /_test/files?repo_id=&rev=            {path: {size, sha256, lfs}}
    POST /_test/faults     {"glob","kind","count",...params} -> {"id"};  {"clear": true[, "id"]}
    GET  /_test/faults
    DELETE /_test/faults
    GET  /_test/requests                       list of RequestRecord dicts
    DELETE /_test/requests
    """

    def __init__(self, h: _HubHandler):
        self.h = h

    def handle(self, segs: list[str]):
        h, hub, m = self.h, self.h.hub, self.h.command
        what = segs[0] if segs else ""
        body = json.loads(h._body() or b"{}") if m == "POST" else {}
        if what == "state":
            return h._json({"endpoint": hub.endpoint, "cdn_endpoint": hub.cdn_endpoint,
                            "repos": {k: {"branches": r.revisions, "gated": r.gated_token is not None}
                                      for k, r in hub.repos.items()}})
        if what == "repos" and m == "POST":
            hub.add_repo(body["repo_id"], tuple(body.get("lfs_suffixes", (".gguf",))))
            return h._json({"ok": True})
        if what == "commit" and m == "POST":
            files = {p: (None if v is None else make_blob(v)) for p, v in body["files"].items()}
            sha = hub.commit(body["repo_id"], files, branch=body.get("branch", "main"), message=body.get("message"),
                             delete=body.get("delete", ()))
            return h._json({"sha": sha})
        if what == "branch" and m == "POST":
            return h._json({"sha": hub.create_branch(body["repo_id"], body["branch"], body.get("revision", "main"))})
        if what == "gated" and m == "POST":
            hub.gated(body["repo_id"], body.get("token"), files_only=bool(body.get("files_only")))
            return h._json({"ok": True})
        if what == "files" and m == "GET":
            repo_id = h.query["repo_id"][0]
            rev = h.query.get("rev", ["main"])[0]
            repo = hub.repos[repo_id]
            return h._json({p: {"size": b.size, "sha256": b.sha256, "lfs": repo.is_lfs(p, b)}
                            for p, b in hub.files(repo_id, rev).items()} | {"__sha__": repo.resolve(rev)})
        if what == "faults":
            if m == "GET":
                return h._json(hub.faults.list())
            if m == "DELETE" or body.get("clear"):
                hub.faults.clear(body.get("id"))
                return h._json({"ok": True})
            b = dict(body)
            fid = hub.faults.set(b.pop("glob"), b.pop("kind"), count=b.pop("count", None), **b)
            return h._json({"id": fid})
        if what == "requests":
            if m == "DELETE":
                hub.clear_requests()
                return h._json({"ok": True})
            with hub._log_lock:
                recs = [asdict(r) for r in hub.requests if r.server != "control"]
            return h._json(recs)
        raise HubError(404, None, "unknown control endpoint")


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="repos.json (see StandInHub.load_config)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cdn-port", type=int, default=0)
    ap.add_argument("--public-host", default=None, help="host written into CDN redirect URLs (default --host)")
    ap.add_argument("--ready-file", help="write {endpoint, cdn_endpoint, pid} JSON here once listening")
    a = ap.parse_args(argv)
    hub = StandInHub(a.host, a.port, a.cdn_port, public_host=a.public_host)
    if a.config:
        hub.load_config(json.loads(Path(a.config).read_text()))
    hub.start()
    info = {"endpoint": hub.endpoint, "cdn_endpoint": hub.cdn_endpoint, "pid": os.getpid()}
    if a.ready_file:
        tmp = a.ready_file + ".tmp"
        Path(tmp).write_text(json.dumps(info))
        os.replace(tmp, a.ready_file)
    print(json.dumps(info), flush=True)
    stop = threading.Event()
    import signal

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    stop.wait()
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
