"""THE JOURNEY: from a bare box to a serving rig in one `invoke provision --host rig`.

One Tier B rig, nothing on it but the base image (Debian 12 minbase + sshd/systemd), the fake
nvidia-smi showing 6 × RTX 3090 (compute capability 8.6, driver answering), no route anywhere but
the host side, where the stand-ins are: NVIDIA's CUDA apt repo (built from NVIDIA's PyPI wheels,
tests/rigs/nvidia_repo.py), the llama.cpp git remote (git daemon), the Hugging Face hub
(tests/hub), a pip wheelhouse, the apt proxy. The inventory is what a user writes, with those
addresses:

  --check on the bare box   the plan for every step, a read-only probe of each dependency, no
                            traceback, nothing changed
  provision                 apt packages -> cuda-keyring fetched into a private temp dir, its key
                            checked against the pinned fingerprint -> cuda-toolkit-13-0 into
                            /usr/local/cuda-13.0 (nvcc NOT on PATH) -> llama.cpp configured with
                            GGML_CUDA=ON by the real nvcc (CUDACXX/CUDAToolkit_ROOT from the facts,
                            over a plain SSH session) and real CUDA objects compiled for arch 86
                            -> the model pulled and verified -> the gpu limits -> llama-server
                            serving -> the opencode provider written
  the real opencode         gets a reply from that server
  provision again           0 changes

CUDA in CI (2 cores): a full CUDA build of llama.cpp is ~190 CUDA objects (~5000 core-seconds).
The journey sets the llama step's explicit test seam (provision/llama_cuda_subset.py,
in-process only) to compile CUDA_SUBSET below — four real ggml-cuda objects (~20 s of nvcc) — and
the served llama-server is a CPU build of the same commit (from the shared test ccache). Each
object's fatbinary is checked for an sm_86 cubin. The full CUDA build runs on the lent GPU box
(benchmarks/cuda_path_proof.py).

Recorded: each step's wall time and remote commands (count and command lines), in the test
output and, with LLAMA_RIG_JOURNEY_RECORD=FILE, as JSON (benchmarks/journey/).
"""
from __future__ import annotations

import base64
import contextvars
import io
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import yaml

from provision import engine, llama_cuda_subset
from provision.app import App
from provision.console import Environment
from provision.target import connect
from tests import opencode_cli
from tests.fixtures.rig_ccache import seed_ccache
from tests.fixtures.tiny_gguf import write_tiny_qwen35moe
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import StandInHub

pytestmark = pytest.mark.rig

HOST = "rig"
REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"
ALIAS = "Qwen3.5-122B-A10B-UD-Q6_K_XL"
PORT = 8000
# small, quick ggml-cuda sources (~4-8 s of nvcc each on one core); all include common.cuh, so
# they pull in the CUDA runtime, the crt headers and ggml's CUDA common code
CUDA_SUBSET = ("arange.cu", "clamp.cu", "scale.cu", "softmax.cu")
STEP = contextvars.ContextVar("step", default="(engine)")


class Recorder:
    """Every remote command of a run, by step (test-side observation: wraps the sessions)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, float, str]] = []

    def target_factory(self, host):
        t = connect(host)
        orig = t._exec

        def _exec(command, **kw):
            t0 = time.monotonic()
            try:
                return orig(command, **kw)
            finally:
                self.commands.append((STEP.get(), round(time.monotonic() - t0, 3), command))
        t._exec = _exec
        return t


@pytest.fixture
def step_names(monkeypatch):
    orig = engine._run_step

    def run_step(ctx, step):
        tok = STEP.set(step.name)
        try:
            return orig(ctx, step)
        finally:
            STEP.reset(tok)
    monkeypatch.setattr(engine, "_run_step", run_step)


@pytest.fixture
def cuda_subset(monkeypatch):
    """The llama step's TEST SEAM (see provision/llama_cuda_subset.py)."""
    monkeypatch.setattr(llama_cuda_subset, "CI_CUDA_SUBSET", llama_cuda_subset.CudaSubset(CUDA_SUBSET))


@pytest.fixture
def journey(rig_factory, nvidia_repo, llama_upstream, llama_upstream_daemon, wheelhouse_dir,
            tmp_path, cuda_subset, step_names):
    rig = rig_factory()  # the base image + fake nvidia-smi: 6 x RTX 3090
    hub = StandInHub(rig.host_side).start()
    wheels = WheelServer(wheelhouse_dir, rig.host_side)
    daemon = llama_upstream_daemon(rig.host_side)
    try:
        shards = write_tiny_qwen35moe(tmp_path / "gguf", "tiny-qwen35moe", n_shards=4)
        make_gguf_like_shards(hub, REPO, shard_bytes={i + 1: p for i, p in enumerate(shards)},
                              size=[p.stat().st_size for p in shards])
        entry = rig.inventory_entry(
            gpus={"count": 6, "power_limit": 300},
            system={"cuda_repo": nvidia_repo.base_url, "cuda_repo_key": nvidia_repo.fingerprint,
                    "cuda_toolkit": nvidia_repo.toolkit},
            llama_cpp={"repo": daemon.url("llama.cpp"), "ref": "master", "cuda": True,
                       "native": False, "prebuilt_ui": False,
                       "targets": ["llama-server", "llama-fit-params"]},
            model={"repo": REPO, "include": "UD-Q6_K_XL/*", "endpoint": hub.endpoint,
                   "pip_find_links": wheels.url, "free_space_margin_gb": 0,
                   "token_env": "LLAMA_RIG_TEST_HF_TOKEN"},
            server={"port": PORT, "ctx_size": 40960, "alias": ALIAS, "start_timeout": 300},
            opencode={"user": "root", "output_limit": 512},
        )
        path = tmp_path / "hosts.yaml"
        path.write_text(yaml.safe_dump({"hosts": {HOST: entry}}, sort_keys=False))
        # the CPU objects' compiler cache of earlier rigs (tests/fixtures/rig_ccache.py): the
        # builds stay real, only faster. The CUDA objects are never in it: compiled every time.
        seeded = seed_ccache(rig)
        yield {"rig": rig, "path": path, "tmp": tmp_path, "repo": nvidia_repo, "seeded": seeded}
    finally:
        wheels.stop()
        hub.stop()


def provision(path: Path, rec: Recorder, check: bool = False) -> tuple[int, str, float, App]:
    out = io.StringIO()
    app = App(str(path), env=Environment(out, out, False), target_factory=rec.target_factory)
    t0 = time.monotonic()
    rc = int(app.provision(HOST, check=check))
    return rc, out.getvalue(), time.monotonic() - t0, app


def step_table(app: App, rec: Recorder) -> list[dict]:
    (rep,) = app.last_reports
    rows = []
    for r in rep.results:
        name = r.step.split(" (")[0]
        cmds = [c for s, _, c in rec.commands if s == name]
        rows.append({"step": r.step, "status": r.status, "seconds": round(r.seconds, 2),
                     "remote_commands": r.commands, "changes": r.changes})
        assert r.commands == len(cmds), (r.step, r.commands, len(cmds))
    rows.append({"step": "(run lock, state, handlers, lock file)", "status": "-",
                 "seconds": round(rep.seconds - sum(x["seconds"] for x in rows), 2),
                 "remote_commands": rep.commands - sum(x["remote_commands"] for x in rows)})
    return rows


def fatbin_archs(obj: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of every image in an object's .nv_fatbin section (kind: ptx | cubin)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        o, b = Path(d) / "x.o", Path(d) / "fatbin"
        o.write_bytes(obj)
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", str(o), str(b)],
                       check=True, capture_output=True)
        data = b.read_bytes()
    out, off = [], 0
    while off + 16 <= len(data):
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, off)
        assert magic == 0xBA55ED50, hex(magic)
        p, end = off + hsize, off + hsize + fsize
        while p < end:
            kind, _, ehs, size = struct.unpack_from("<HHIQ", data, p)
            arch = struct.unpack_from("<I", data, p + 28)[0]
            out.append(({1: "ptx", 2: "cubin"}.get(kind, str(kind)), arch))
            p += ehs + size
        off = end
    return out


def test_bare_box_to_serving_rig(journey):
    rig, path, tmp = journey["rig"], journey["path"], journey["tmp"]
    record: dict = {"rig": "Tier B nspawn, Debian 12 base image, fake nvidia-smi 6 x RTX 3090",
                    "cuda_subset": list(CUDA_SUBSET), "ccache_seeded": journey["seeded"],
                    "stand_in_repo": journey["repo"].info}

    # 0. the bare box
    assert rig.sh("command -v cmake git gcc nvcc", check=False).stdout.strip() == ""
    assert rig.sh("ls /usr/local/cuda", check=False).returncode != 0

    # 1. --check: a plan for every step, a probe of every dependency, no traceback, no change
    rec = Recorder()
    rc, out, secs, app = provision(path, rec, check=True)
    record["check"] = {"seconds": round(secs, 1), "exit": rc, "steps": step_table(app, rec)}
    assert "Traceback" not in out
    assert rc == 0, out
    for line in ("system: would change: install packages: build-essential",
                 f"system: would change: add the NVIDIA CUDA apt repo {journey['repo'].repo_url}",
                 "system: would change: install cuda-toolkit-13-0 (nvcc missing)",
                 "llama: would change: clone and build llama.cpp master (no git on the box yet",
                 "model: would change: download 4 files"):
        assert line in out, out
    assert rig.sh("dpkg -s cmake", check=False).returncode != 0  # nothing installed

    # 2. the run
    rec = Recorder()
    rc, out, secs, app = provision(path, rec)
    record["first_run"] = {"seconds": round(secs, 1), "exit": rc, "steps": step_table(app, rec),
                           "commands": [[s, t, c[:240]] for s, t, c in rec.commands]}
    print("\n" + out)
    assert rc == 0, out
    assert "Traceback" not in out
    # keyring checked, toolkit installed where NVIDIA puts it, not on PATH
    assert f"cuda-archive-keyring.gpg: key {journey['repo'].fingerprint} (pinned) — ok" in out
    assert "system: CUDA toolkit 13.0 at /usr/local/cuda (nvcc /usr/local/cuda/bin/nvcc)" in out
    assert rig.sh("command -v nvcc", check=False).returncode != 0
    # llama.cpp: configured with CUDA by the real nvcc through the hand-off, objects for sm_86
    info = json.loads(rig.sh("cat /opt/llama-rig/llama.cpp/current/llama-rig-build.json").stdout)
    assert "-DGGML_CUDA=ON" in info["cmake_args"] and "-DCMAKE_CUDA_ARCHITECTURES=86" in info["cmake_args"]
    assert info["archs"] == ["86"] and info["nvcc"] == "13.0"
    sub = info["ci_cuda_subset"]
    log = rig.sh(f"cat {info['log']}").stdout
    assert "-- The CUDA compiler identification is NVIDIA 13.0.88" in log
    assert "-- Found CUDAToolkit: /usr/local/cuda" in log
    assert "Using CMAKE_CUDA_ARCHITECTURES=86" in log
    # the compile commands (cmake --build --verbose): the real nvcc CMake found through CUDACXX
    for src in CUDA_SUBSET:
        (cmd,) = [ln for ln in log.splitlines()
                  if ln.rstrip().endswith(f"-o ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/{src}.o")]
        assert "/usr/local/cuda/bin/nvcc " in cmd and "arch=compute_86,code=[compute_86,sm_86]" in cmd, cmd
    objs = {}
    for o in sub["objects"]:
        raw = base64.b64decode(rig.sh(f"base64 -w0 {o}").stdout)
        objs[o.rsplit("/", 1)[-1]] = fatbin_archs(raw)
        assert ("cubin", 86) in objs[o.rsplit("/", 1)[-1]], (o, objs)
    record["cuda_objects"] = {k: [f"{kind} sm_{a}" for kind, a in v] for k, v in objs.items()}
    record["cuda_subset_seconds"] = {"configure": sub["configure_seconds"], "compile": sub["compile_seconds"]}
    # the model, the limits, the service
    assert "model: downloaded 4 file(s)" in out
    assert rig.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout.split() == ["300.00"] * 6
    assert rig.sh("systemctl is-active llama-server.service").stdout.strip() == "active"
    m = re.search(r"/health 200 in (\d+) ms; chat completion in (\d+) ms", out)
    assert m, out

    # 3. the real opencode with the config the opencode step wrote on the rig
    local = tmp / "opencode.json"
    local.write_text(rig.sh("cat /root/.config/opencode/opencode.json").stdout)
    # the API key (server.api_key auto, made on the rig) is in the JSON by reference only:
    # {file:<name>} next to the config, 0600 -- copy it beside the local config as well
    ref = re.search(r'"\{file:([^}]+)\}"', local.read_text())
    assert ref, local.read_text()
    key = tmp / ref.group(1)
    key.write_text(rig.sh(f"cat /root/.config/opencode/{ref.group(1)}").stdout)
    key.chmod(0o600)
    t0 = time.monotonic()
    r = opencode_cli.run(["run", "--title", "journey", "--format", "json", "-m", f"llama-cpp/{ALIAS}",
                          "Reply: pong"], local, tmp / "oc-home", timeout=600)
    record["opencode_run_s"] = round(time.monotonic() - t0, 1)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert any(e.get("type") == "text" for e in events) and not any(e.get("type") == "error" for e in events)
    assert int(rig.sh("journalctl -u llama-server -o cat | grep -c 'processing task' || true").stdout or 0) >= 1

    # 4. again: 0 changes
    rec = Recorder()
    rc, out, secs, app = provision(path, rec)
    record["second_run"] = {"seconds": round(secs, 1), "exit": rc, "steps": step_table(app, rec),
                            "commands": [[s, t, c[:240]] for s, t, c in rec.commands]}
    assert rc == 0, out
    assert re.search(rf"^{HOST}\s+ok\s+\d+\s+0\s+0\s", out, re.M), out

    print("\nJOURNEY: step, status, seconds, remote commands")
    for run in ("check", "first_run", "second_run"):
        print(f"  {run}: {record[run]['seconds']}s")
        for s in record[run]["steps"]:
            print(f"    {s['step']:<40} {s['status']:<8} {s['seconds']:>8.2f}s {s['remote_commands']:>4}")
    print("JOURNEY RECORD: " + json.dumps({k: v for k, v in record.items() if k not in ("first_run", "second_run")}
                                           | {r: {k: v for k, v in record[r].items() if k != "commands"}
                                              for r in ("first_run", "second_run")}))
    dest = os.environ.get("LLAMA_RIG_JOURNEY_RECORD")
    if dest:
        Path(dest).write_text(json.dumps(record, indent=1) + "\n")
