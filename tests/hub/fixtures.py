"""pytest fixtures and helpers around the stand-in Hub (``tests/hub/server.py``).

Fixtures:
  ``hub_factory``  -> ``make(host="127.0.0.1", mode="thread"|"process", public_host=None, config=None)``;
                      every hub made is stopped at teardown.
  ``hub``          -> ``hub_factory()`` (in-process, 127.0.0.1).

Both modes expose the same surface: ``endpoint``, ``cdn_endpoint``, ``add_repo``, ``commit``,
``create_branch``, ``gated``, ``sha``, ``file_info``, ``faults.set/.clear/.list``, ``requests``
(list of ``RequestRecord``), ``clear_requests``, ``stop``.

Helpers: ``make_gguf_like_shards``, ``hf_env``, ``run_hf``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.hub.server import (
    Blob,
    BytesBlob,
    GeneratedBlob,
    RequestRecord,
    StandInHub,
    _RequestLog,
    blob_spec,
)

SERVER_PY = Path(__file__).with_name("server.py")

__all__ = [
    "StandInHub", "RemoteHub", "ShardSet", "make_gguf_like_shards", "hf_env", "run_hf",
    "hub_factory", "hub", "GeneratedBlob", "BytesBlob",
]


# --------------------------------------------------------------------------------------------- in-process extras


def _file_info(self: StandInHub, repo_id: str, rev: str = "main") -> dict[str, dict]:
    repo = self.repos[repo_id]
    return {p: {"size": b.size, "sha256": b.sha256, "lfs": repo.is_lfs(p, b)} for p, b in self.files(repo_id, rev).items()}


StandInHub.file_info = _file_info  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------- subprocess mode


class _RemoteFaults:
    def __init__(self, hub: "RemoteHub"):
        self._hub = hub

    def set(self, path_glob: str, kind: str, count: int | None = None, **params) -> int:
        return self._hub._call("POST", "/_test/faults", {"glob": path_glob, "kind": kind, "count": count, **params})["id"]

    def clear(self, fault_id: int | None = None) -> None:
        self._hub._call("POST", "/_test/faults", {"clear": True, "id": fault_id})

    def list(self) -> list[dict]:
        return self._hub._call("GET", "/_test/faults")


class RemoteHub:
    """Drives ``server.py`` running as a separate process (started here, or attach to one by endpoint)."""

    def __init__(self, endpoint: str, cdn_endpoint: str | None = None, proc: subprocess.Popen | None = None):
        self.endpoint = endpoint
        self.cdn_endpoint = cdn_endpoint
        self.proc = proc
        self.faults = _RemoteFaults(self)

    @classmethod
    def spawn(cls, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0, public_host: str | None = None,
              config: dict | str | Path | None = None, workdir: str | Path | None = None,
              timeout: float = 20.0) -> "RemoteHub":
        import tempfile

        wd = Path(workdir or tempfile.mkdtemp(prefix="standin-hub-"))
        ready = wd / f"ready-{os.getpid()}-{time.monotonic_ns()}.json"
        cmd = [sys.executable, str(SERVER_PY), "--host", host, "--port", str(port), "--cdn-port", str(cdn_port),
               "--ready-file", str(ready)]
        if public_host:
            cmd += ["--public-host", public_host]
        if config is not None:
            if isinstance(config, dict):
                cp = wd / "repos.json"
                cp.write_text(json.dumps(config))
                config = cp
            cmd += ["--config", str(config)]
        log = open(wd / "server.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"stand-in hub exited rc={proc.returncode}: {(wd / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError("stand-in hub did not become ready")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        return cls(info["endpoint"], info["cdn_endpoint"], proc)

    def _call(self, method: str, path: str, body: Any = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None

    # same surface as StandInHub
    def add_repo(self, repo_id: str, lfs_suffixes: tuple[str, ...] = (".gguf",)):
        self._call("POST", "/_test/repos", {"repo_id": repo_id, "lfs_suffixes": list(lfs_suffixes)})

    def commit(self, repo_id: str, files: dict[str, Any], branch: str = "main", message: str | None = None,
               delete: list[str] | tuple[str, ...] = ()) -> str:
        spec = {p: blob_spec(v) for p, v in files.items()}
        return self._call("POST", "/_test/commit", {"repo_id": repo_id, "files": spec, "branch": branch,
                                                    "message": message, "delete": list(delete)})["sha"]

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        return self._call("POST", "/_test/branch", {"repo_id": repo_id, "branch": branch, "revision": revision})["sha"]

    def gated(self, repo_id: str, token: str | None, files_only: bool = False) -> None:
        self._call("POST", "/_test/gated", {"repo_id": repo_id, "token": token, "files_only": files_only})

    def file_info(self, repo_id: str, rev: str = "main") -> dict[str, dict]:
        from urllib.parse import quote

        d = self._call("GET", f"/_test/files?repo_id={quote(repo_id)}&rev={quote(rev)}")
        d.pop("__sha__", None)
        return d

    def sha(self, repo_id: str, rev: str = "main") -> str:
        from urllib.parse import quote

        return self._call("GET", f"/_test/files?repo_id={quote(repo_id)}&rev={quote(rev)}")["__sha__"]

    def file_sha256(self, repo_id: str, path: str, rev: str = "main") -> str:
        return self.file_info(repo_id, rev)[path]["sha256"]

    @property
    def requests(self) -> _RequestLog:
        """A snapshot of the server's log (same type as ``StandInHub.requests``: has ``.downloads(glob)``)."""
        return _RequestLog(RequestRecord(**r) for r in self._call("GET", "/_test/requests"))

    def clear_requests(self) -> None:
        self._call("DELETE", "/_test/requests")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --------------------------------------------------------------------------------------------- repo shape helper


@dataclass
class ShardSet:
    repo_id: str
    sha: str  # commit that holds them
    folder: str
    shards: list[str]  # repo paths of the N shards, in order
    sha256: dict[str, str]  # repo path -> sha256, for every file committed (shards + decoys)
    sizes: dict[str, int]
    decoys: list[str] = field(default_factory=list)


def make_gguf_like_shards(hub, repo_id: str = "unsloth/Qwen3.5-122B-A10B-GGUF", folder: str = "UD-Q6_K_XL",
                          prefix: str = "Qwen3.5-122B-A10B-UD-Q6_K_XL", n: int = 4,
                          size: int | list[int] = 3 * 1024 * 1024 + 7, *, shard_bytes: dict[int, Any] | None = None,
                          seed: str | int = 0, decoys: bool = True, branch: str = "main",
                          message: str | None = None) -> ShardSet:
    """Commit ``{folder}/{prefix}-0000i-of-0000N.gguf`` (i = 1..n) plus, if ``decoys``, another quant
    (``Q8_0/…-Q8_0-0000{1,2}-of-00002.gguf``), ``mmproj-BF16.gguf``, ``README.md`` and ``.gitattributes``
    at the top level — the shape of ``unsloth/Qwen3.5-122B-A10B-GGUF``.

    Content is deterministic pseudo-random (generated on the fly, any size, no RAM/disk) unless
    ``shard_bytes={1: b"GGUF..." | Path | Blob}`` overrides a shard (1-based).  ``size`` may be a list.
    Works with an in-process ``StandInHub`` or a ``RemoteHub``.  Returns a ``ShardSet``.
    """
    sizes = list(size) if isinstance(size, (list, tuple)) else [int(size)] * n
    assert len(sizes) == n
    shard_bytes = shard_bytes or {}
    files: dict[str, Any] = {}
    shards = []
    for i in range(1, n + 1):
        p = f"{folder}/{prefix}-{i:05d}-of-{n:05d}.gguf" if folder else f"{prefix}-{i:05d}-of-{n:05d}.gguf"
        shards.append(p)
        v = shard_bytes.get(i)
        files[p] = v if v is not None else GeneratedBlob(sizes[i - 1], f"{seed}:{p}")
    decoy_paths = []
    if decoys:
        base = prefix.replace(f"-{folder}", "") if folder and prefix.endswith(folder) else prefix
        for i in (1, 2):
            decoy_paths.append(f"Q8_0/{base}-Q8_0-{i:05d}-of-00002.gguf")
        decoy_paths.append("mmproj-BF16.gguf")
        for j, p in enumerate(decoy_paths):
            files[p] = GeneratedBlob(64 * 1024 + j, f"{seed}:{p}")
        files["README.md"] = f"---\nlicense: apache-2.0\n---\n# {repo_id}\nstand-in\n"
        files[".gitattributes"] = "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    if isinstance(hub, StandInHub):
        hub.add_repo(repo_id)
    else:
        hub.add_repo(repo_id)
    sha = hub.commit(repo_id, files, branch=branch, message=message or f"upload {folder}")
    info = hub.file_info(repo_id, sha)
    return ShardSet(repo_id, sha, folder, shards, {p: d["sha256"] for p, d in info.items()},
                    {p: d["size"] for p, d in info.items()}, decoy_paths)


# --------------------------------------------------------------------------------------------- client helpers


def hf_env(endpoint: str, home: str | Path, token: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess running the real huggingface_hub client against the stand-in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({
        "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "*", "no_proxy": "*",
    })
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    if token is not None:
        env["HF_TOKEN"] = token
    env.update({k: str(v) for k, v in extra.items()})
    return env


_RUNNER = r'''
import json, sys, traceback
_out = {}
try:
    exec(compile(sys.stdin.read(), "<hf-snippet>", "exec"), {"OUT": _out})
    _out.setdefault("ok", True)
except BaseException as e:
    _out.update(ok=False, error_type=type(e).__name__,
                error_mro=[c.__name__ for c in type(e).__mro__], error=str(e)[:2000],
                traceback=traceback.format_exc()[-4000:])
sys.stdout.write("\n@@RESULT@@" + json.dumps(_out, default=str) + "\n")
'''


def run_hf(code: str, env: dict[str, str], timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter (the client reads env at import).  The snippet fills the
    dict ``OUT``; returns it plus ``ok`` / ``error_type`` / ``error_mro`` / ``error`` and ``stderr``."""
    p = subprocess.run([sys.executable, "-c", _RUNNER], input=textwrap.dedent(code), env=env,
                       capture_output=True, text=True, timeout=timeout)
    marker = p.stdout.rfind("@@RESULT@@")
    if marker < 0:
        raise RuntimeError(f"client subprocess died rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout[marker + len("@@RESULT@@"):])
    out["stderr"] = p.stderr
    return out


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def hub_factory(tmp_path_factory):
    made: list = []

    def make(host: str = "127.0.0.1", mode: str = "thread", public_host: str | None = None,
             config: dict | str | Path | None = None, port: int = 0, cdn_port: int = 0):
        if mode == "thread":
            h = StandInHub(host, port, cdn_port, public_host=public_host)
            if config is not None:
                h.load_config(config if isinstance(config, dict) else json.loads(Path(config).read_text()))
            h.start()
        elif mode == "process":
            h = RemoteHub.spawn(host, port, cdn_port, public_host=public_host, config=config,
                                workdir=tmp_path_factory.mktemp("hub"))
        else:
            raise ValueError(mode)
        made.append(h)
        return h

    yield make
    for h in reversed(made):
        try:
            h.stop()
        except Exception:
            pass


@pytest.fixture
def hub(hub_factory):
    return hub_factory()
