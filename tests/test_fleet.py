"""`invoke status` (provision/fleet.py): the row, drift and metrics as data; the REAL llama-server's
/metrics (the cached CPU build, started with the flags the service step renders: --metrics on,
--no-slots, the API key from the env file's variable) parsed; the whole status pipeline on a
`connection: local` host (remote/rig_status.py in one round trip, the fake nvidia-smi on PATH, a
lock file) next to a host that cannot be reached. Two real rigs, one down, and drift after a
manual change on a rig: tests/test_model_update_rig.py."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from provision import fleet, inventory as inv
from provision.app import App
from provision.console import Environment
from provision.facts import metrics
from provision.steps import service
from tests.fixtures.llama_upstream import free_port

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).with_name("data")
FAKE_SMI = Path(__file__).parent / "rigs" / "fake_nvidia_smi.py"
KEY = "sk-fleet-test-0d1e2f"


# --------------------------------------------------------------------------------------------- pure


def test_metrics_parse_skips_comments_labels_and_nan():
    text = ("# HELP llamacpp:prompt_tokens_total Number of prompt tokens\n# TYPE x counter\n"
            "llamacpp:prompt_tokens_total 21\nllamacpp:predicted_tokens_seconds 3315.96\n"
            'llamacpp:x{slot="0"} 4 1700000000\nllamacpp:bad NaN\ngarbage line here\n')
    m = metrics.parse(text)
    assert m == {"prompt_tokens_total": 21.0, "predicted_tokens_seconds": 3315.96, 'x{slot="0"}': 4.0}
    assert metrics.summary(m)["predicted_tokens_seconds"] == 3315.96


def test_gpu_summary_uses_the_facts_parser():
    q = (DATA / "nvidia-smi-6x3090.csv").read_text()
    g = fleet.gpu_summary(q, "0, 40\n1, 55\n2, 41\n")
    assert g["count"] == 6 and g["power_limit_w"] == 2030.0 and g["temperature_c_max"] == 55.0
    assert g["memory_total_mib"] == 6 * 24576 and g["power_limits_w"] == [350.0, 350.0, 350.0, 280.0, 350.0, 350.0]
    assert g["temperatures_c"] == [40.0, 55.0, 41.0, None, None, None]
    assert fleet.gpu_summary("", "")["count"] == 0


def lock_doc(**over) -> dict:
    lk = {"format": 1, "llama_cpp": {"commit": "c" * 40, "build": "b1-ccccccc-12345678"},
          "model": {"commit": "a" * 40},
          "rendered": {"llama-server.service": "1" * 64, "llama-server.env": "2" * 64,
                       "llama-rig-gpu.service": None, "opencode.json": None},
          "power": {"limits_w": [350.0, 350.0]}, "hardware": {"gpu_count": 2}}
    for k, v in over.items():
        lk[k] = v
    return {"host": {"name": "rig"}, "lock": lk}


def seen(**over) -> dict:
    s = {"llama_cpp.commit": "c" * 40, "llama_cpp.build": "b1-ccccccc-12345678", "model.commit": "a" * 40,
         "rendered.llama-server.service": "1" * 64, "rendered.llama-server.env": "2" * 64,
         "rendered.llama-rig-gpu.service": None, "power.limits_w": [350.0, 350.0], "hardware.gpu_count": 2}
    s.update(over)
    return s


def test_drift_names_what_differs_in_a_word():
    assert fleet.drift(lock_doc(), seen()) == ("-", [])
    assert fleet.drift(None, seen()) == ("no lock", [])
    words, details = fleet.drift(lock_doc(), seen(**{"rendered.llama-server.service": "9" * 64,
                                                     "model.commit": "b" * 40, "power.limits_w": [300.0, 350.0]}))
    assert words == "model, power, unit"
    assert "model.commit: lock aaaaaaaaaaaa ≠ rig bbbbbbbbbbbb" in details
    assert "power.limits_w: lock [350.0, 350.0] ≠ rig [300.0, 350.0]" in details
    words, _ = fleet.drift(lock_doc(), seen(**{"llama_cpp.commit": "d" * 40, "rendered.opencode.json": "3" * 64}))
    assert words == "llama.cpp"  # a file the lock never hashed is not drift


def test_unreachable_is_a_row_and_exit_status():
    u = fleet.unreachable("rig2", "rig2 (root@10.0.0.9:22): connection refused")
    r = fleet.row(u)
    assert r[0] == "rig2" and r[1] == "UNREACHABLE" and len(r) == len(fleet.COLUMNS)
    assert fleet.notes([u]) == ["rig2: unreachable: rig2 (root@10.0.0.9:22): connection refused"]
    assert fleet.exit_status([u]) == 3
    assert fleet.exit_status([{"reachable": True, "serving": False}]) == 1
    assert fleet.exit_status([{"reachable": True, "serving": True}]) == 0


def test_a_host_with_nothing_provisioned_yet_is_a_row_not_a_failure():
    """Like the other status tasks (README: exit status), nothing there yet is exit 0 with what to
    run; a unit that is installed but not serving stays exit 1."""
    raw = {"systemd": {"ActiveState": "inactive", "SubState": "dead", "UnitFileState": ""},
           "http": {"health": [0, "", 0]}, "state": {}}
    fresh = fleet.observe("new", raw, None)
    assert fresh["provisioned"] is False and fresh["serving"] is False
    assert fleet.row(fresh)[1] == "nothing yet"
    assert fleet.notes([fresh]) == ["new: nothing provisioned yet — run `invoke provision --host new`"]
    assert fleet.exit_status([fresh]) == 0
    broken = fleet.observe("old", {**raw, "systemd": {**raw["systemd"], "UnitFileState": "enabled"}}, None)
    assert broken["provisioned"] is True and fleet.exit_status([fresh, broken]) == 1
    half = fleet.observe("half", {**raw, "state": {"llama": {"current": "b1"}}}, None)
    assert half["provisioned"] is True and fleet.exit_status([half]) == 1


def test_status_task_is_thin_and_registered():
    import tasks
    t = tasks.ns.tasks["status"]
    assert t.auto_shortflags is False and len(t.__doc__.strip().splitlines()) == 1
    assert {"watch", "json", "interval", "host", "all"} <= {a.name for a in t.get_arguments()}


# --------------------------------------------------------------------------------------------- real server


class RealServer:
    """The cached CPU llama-server with the argv the service step renders (+ -t 1)."""

    def __init__(self, bin_dir: Path, model: Path, tmp: Path, cfg: dict):
        self.port = cfg["server"]["port"]
        argv = service.server_argv(cfg, str(model), str(bin_dir / "llama-server")) + ["-t", "1"]
        # the unit reads the key from the rig's key file; here the server runs on this machine and
        # reads the control-side key file the inventory names (the same key)
        i = argv.index("--api-key-file")
        argv[i + 1] = cfg["server"]["api_key_file"]
        self.argv = argv
        self.log = tmp / "server.log"
        self.logf = open(self.log, "w")
        env = dict(os.environ)
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            if self.get("/health")[0] == 200:
                return
            time.sleep(0.2)
        raise AssertionError("llama-server not healthy:\n" + self.log.read_text()[-3000:])

    def get(self, path: str, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=h,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


@pytest.fixture(scope="module")
def local_box(llama_cpu_bin, tiny_qwen35moe_model, tmp_path_factory):
    """A `connection: local` host: prefix with a build, state with a model, a lock, a key file,
    the fake nvidia-smi (2 GPUs) on PATH, and the real llama-server serving on a free port."""
    tmp = tmp_path_factory.mktemp("fleet")
    prefix, state, models = tmp / "prefix", tmp / "state", tmp / "models"
    build = prefix / "llama.cpp/builds/b1-5af12ca-0000beef"
    (build / "bin").mkdir(parents=True)
    (build / "llama-rig-build.json").write_text(json.dumps({"commit": "5af12cab726454cfa5203caaf4473a0255ae7fe1",
                                                            "build_number": 1}))
    (prefix / "llama.cpp/current").symlink_to("builds/b1-5af12ca-0000beef")
    rdir = models / "org__Tiny-GGUF"
    sha = "d" * 40
    (rdir / "commits" / sha).mkdir(parents=True)
    (rdir / "current").symlink_to(f"commits/{sha}")
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"owed": [], "model": {
        "repo": "org/Tiny-GGUF", "commit": sha, "local_dir": str(rdir), "layout": "commits"}}))
    (tmp / "key").write_text(KEY + "\n")
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_SMI} "$@"\n')
    (bindir / "nvidia-smi").chmod(0o755)
    (tmp / "gpus.json").write_text(json.dumps({"gpus": [{"temperature": 47}, {"temperature": 52}], "power_draw": 120.5}))
    port = free_port()
    dead = free_port()
    data = {"hosts": {
        "loc": {"connection": {"type": "local"}, "gpus": {"count": 2},
                "paths": {"prefix": str(prefix), "state_dir": str(state)},
                "model": {"repo": "org/Tiny-GGUF", "dir": str(models)},
                "server": {"port": port, "host": "127.0.0.1", "ctx_size": 2048, "alias": "tiny",
                           "api_key_file": str(tmp / "key")},
                "opencode": {"enabled": False}},
        "gone": {"connection": {"address": "127.0.0.1", "port": dead, "connect_timeout": 3}}}}
    path = tmp / "hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = inv.load(path).hosts["loc"].cfg
    old = {k: os.environ.get(k) for k in ("PATH", "FAKE_NVIDIA_SMI_CONFIG", "FAKE_NVIDIA_SMI_STATE")}
    os.environ.update({"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI_CONFIG": str(tmp / "gpus.json"),
                       "FAKE_NVIDIA_SMI_STATE": str(tmp / "smi-state.json")})
    srv = RealServer(llama_cpu_bin, tiny_qwen35moe_model[0], tmp, cfg)
    try:
        yield {"tmp": tmp, "path": path, "srv": srv, "sha": sha, "cfg": cfg}
    finally:
        srv.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_real_llama_server_metrics_behind_the_key_and_no_slots(local_box):
    srv = local_box["srv"]
    assert "--metrics" in srv.argv and "--no-slots" in srv.argv
    code, body = srv.get("/metrics")
    assert code == 401  # the same key as the API
    code, body = srv.get("/v1/chat/completions", KEY, {"model": "tiny", "max_tokens": 4,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200, body
    code, body = srv.get("/metrics", KEY)
    assert code == 200
    m = metrics.parse(body)
    for k in ("prompt_tokens_total", "tokens_predicted_total", "prompt_tokens_seconds",
              "predicted_tokens_seconds", "requests_processing", "requests_deferred", "n_decode_total"):
        assert k in m, k
    assert m["tokens_predicted_total"] >= 1 and m["prompt_tokens_total"] >= 1 and m["requests_processing"] == 0
    code, body = srv.get("/slots", KEY)
    assert code == 501 and "slots" in body  # /slots off: it would show the prompts


def _status(path: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    app = App(str(path), env=Environment(out, out, False))
    from provision import fleet as f
    rc = app.guarded(lambda: f.run(app, *args[:1] or (None,), all_hosts=not args,
                                   as_json="--json" in args))
    return int(rc), out.getvalue()


def test_status_of_a_local_host_and_an_unreachable_one(local_box):
    path, srv = local_box["path"], local_box["srv"]
    srv.get("/v1/chat/completions", KEY, {"model": "tiny", "max_tokens": 4,
                                          "messages": [{"role": "user", "content": "hello"}]})
    out = io.StringIO()
    app = App(str(path), env=Environment(out, out, False))
    t0 = time.monotonic()
    rc = int(app.guarded(lambda: fleet.run(app, None, True, as_json=True)))
    rows = {s["host"]: s for s in json.loads(out.getvalue())}
    assert time.monotonic() - t0 < 20
    assert rc == 3  # a host was unreachable; the table is still there
    gone = rows["gone"]
    # the SSH connect message (issue 13's one line: who did not answer, and why)
    assert gone["reachable"] is False and gone["error"].startswith("no SSH server answered on 127.0.0.1:")
    assert "connection refused" in gone["error"]
    loc = rows["loc"]
    assert loc["reachable"] and loc["health"] == 200 and loc["metrics_http"] == 200
    assert loc["metrics"]["tokens_predicted_total"] >= 4
    assert loc["build"] == {"name": "b1-5af12ca-0000beef", "commit": "5af12cab726454cfa5203caaf4473a0255ae7fe1",
                            "number": 1, "build_info": "b1-5af12ca"}
    assert loc["model"]["commit"] == local_box["sha"]
    g = loc["gpus"]
    assert g["count"] == 2 and g["temperatures_c"] == [47.0, 52.0] and g["power_draw_w"] == 241.0
    assert loc["drift"] == "no lock"
    assert KEY not in out.getvalue()

    # a lock with another model commit and other power limits: drift, in a word
    (local_box["tmp"] / "locks").mkdir(exist_ok=True)
    doc = lock_doc(model={"commit": "e" * 40}, llama_cpp={"commit": "5af12cab726454cfa5203caaf4473a0255ae7fe1",
                                                           "build": "b1-5af12ca-0000beef"},
                   rendered={}, power={"limits_w": [350.0, 350.0]})
    (local_box["tmp"] / "locks/loc.lock.yaml").write_text(yaml.safe_dump(doc))
    out = io.StringIO()
    app = App(str(path), env=Environment(out, out, False))
    rc = int(app.guarded(lambda: fleet.run(app, "loc", False)))
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[1].split() == fleet.COLUMNS[:7] + ["gpus", "power", "W", "temp", "vram", "GiB", "req", "gen",
                                                      "t/s", "tokens"]
    loc_row = [ln for ln in lines if ln.startswith("loc ")][0]
    assert "model" in loc_row and "b1-5af12ca-0000beef" in loc_row and "dddddd" in loc_row
    assert "drift: model.commit: lock eeeeeeeeeeee ≠ rig dddddddddddd" in text
    assert KEY not in text


def test_status_reads_each_host_in_one_round_trip(local_box):
    from provision.target import LocalTarget

    class Counting(LocalTarget):
        n = 0

        def _exec(self, command, **kw):
            Counting.n += 1
            return super()._exec(command, **kw)
    out = io.StringIO()
    app = App(str(local_box["path"]), env=Environment(out, out, False), target_factory=Counting)
    rc = int(app.guarded(lambda: fleet.run(app, "loc", False)))
    assert Counting.n == 1, Counting.n
    assert rc in (0, 1)  # (no systemd on this machine: the row says so)


def test_watch_redraws_until_ctrl_c_and_exits_within_2s(local_box):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "invoke", "status", "--host", "loc", "--watch", "--interval", "1",
                          "--inventory", str(local_box["path"])], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(6)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 2.5, out
    assert p.returncode == 0, out
    assert out.count("host  service") >= 2, out  # redrawn
    assert "b1-5af12ca-0000beef" in out and KEY not in out


def test_watch_on_a_terminal_is_a_live_rich_table(local_box, monkeypatch):
    out = io.StringIO()
    app = App(str(local_box["path"]), env=Environment(out, out, True))
    naps = []

    def nap(s):
        naps.append(s)
        if len(naps) >= 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(fleet, "pause", nap)
    rc = int(app.guarded(lambda: fleet.run(app, "loc", False, watch=True, interval=7)))
    assert rc == 0 and naps == [7, 7]
    text = out.getvalue()
    assert text.startswith("\x1b[?25l") and text.rstrip().endswith("\x1b[?25h")  # a Live display, closed
    assert text.count("status (") >= 3 and "loc" in text  # first draw + two redraws (80 columns: cells wrap)


def test_an_unreadable_key_file_is_a_note_not_an_unreachable_host(local_box, tmp_path):
    data = yaml.safe_load(local_box["path"].read_text())
    data["hosts"]["loc"]["server"]["api_key_file"] = str(tmp_path / "no-such-key")
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    out = io.StringIO()
    app = App(str(path), env=Environment(out, out, False))
    rc = int(app.guarded(lambda: fleet.run(app, "loc", False, as_json=True)))
    [st] = json.loads(out.getvalue())
    assert rc != 3 and st["reachable"] and st["health"] == 200 and st["metrics_http"] == 401 and st["metrics"] == {}
    assert st["notes"] == [f"server.api_key_file: cannot read {tmp_path / 'no-such-key'}: No such file or directory"
                           " (/metrics and /props not read)"]


def test_bad_interval_is_one_line_exit_2_before_any_host(tmp_path):
    r = subprocess.run([sys.executable, "-m", "invoke", "status", "--watch", "--interval", "0",
                        "--inventory", str(ROOT / "hosts.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "command line: --interval: must be a number between 0.5 and 86400, got 0"
    # a fraction is a valid interval (invoke would have read an int-default flag as an integer)
    from provision import options
    assert options.number("--interval", "0.5", *options.INTERVAL) == 0.5
