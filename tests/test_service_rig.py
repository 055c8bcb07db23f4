"""The service step on a Tier B rig (systemd as PID 1): llama-server really started by systemd as
the dedicated user, readiness gate, restarts only when something changed (exactly one), "restart
owed" surviving a failed run, the handler path, the API key (made on the rig by default, an
explicit one, `none`), the hardened unit (`systemd-analyze verify`, `systemd-analyze security`
exposure <= 4.0), and the service.* tasks. The server binary is tests/fake_llama_server.py installed
as the `current` build (the real CPU llama-server, with its key, runs in tests/test_e2e.py); the
model path is stubbed in-process."""
from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from provision.steps import gpu as gpu_step
from provision.steps import model as model_step
from provision.steps import service as svc

pytestmark = pytest.mark.rig

FAKE = Path(__file__).with_name("fake_llama_server.py")
PREFIX = "/opt/llama-rig"
MODEL = "/var/lib/llama-rig/models/tiny/tiny-00001-of-00002.gguf"
KEY = "sk-test-7f3a9c2e51d04b8b"


def install_fake(r) -> None:
    """The stand-in server as two `current` builds, and a stand-in model (also for
    benchmarks/service_hardening.py)."""
    src = FAKE.read_text()
    for b in ("fake-1", "fake-2"):
        r.sh(f"mkdir -p {PREFIX}/llama.cpp/builds/{b}/bin && cat > {PREFIX}/llama.cpp/builds/{b}/bin/llama-server "
             f"<<'EOF'\n{src}\nEOF\nchmod 0755 {PREFIX}/llama.cpp/builds/{b}/bin/llama-server")
    r.sh(f"ln -sfn builds/fake-1 {PREFIX}/llama.cpp/current && mkdir -p /var/lib/llama-rig/models/tiny "
         f"&& head -c 4096 /dev/urandom > {MODEL} && cp {MODEL} {MODEL.replace('00001', '00002')} "
         "&& chmod -R a+rX /var/lib/llama-rig/models && mkdir -p /etc/fake-llama")


def http(rig, path: str, key: str | None = None, port: int = 8080) -> int:
    """HTTP status of GET (or, for the chat path, POST) from this machine to the rig's server."""
    body = None
    if path == "/v1/chat/completions":
        body = json.dumps({"model": "tiny", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{rig.address}:{port}{path}", data=body,
                                                           headers=h), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def exposure(rig, unit: str = "llama-server.service") -> tuple[float, str]:
    """`systemd-analyze security UNIT` on the rig: (overall exposure, the full output)."""
    r = rig.sh(f"systemd-analyze security --no-pager {unit}", check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), r.stdout


@pytest.fixture(scope="module")
def srig(rig_factory):
    r = rig_factory()
    install_fake(r)
    try:
        yield r
    finally:
        rig_factory.stop(r)


@pytest.fixture(autouse=True)
def _model(monkeypatch):
    monkeypatch.setattr(model_step, "shard1_path", lambda ctx: MODEL)


class Env:
    def __init__(self, rig, tmp: Path, **server):
        self.rig, self.tmp = rig, tmp
        self.server = {"port": 8080, "ctx_size": 4096, "alias": "tiny", "start_timeout": 60,
                       "tensor_split": [0.9, 1, 1, 1, 1, 1], **server}

    def path(self, **server) -> str:
        self.server.update(server)
        p = self.tmp / "hosts.yaml"
        p.write_text(yaml.safe_dump({"hosts": {"rig": self.rig.inventory_entry(
            gpus={"count": 6, "power_limit": 300}, server=self.server)}}))
        return str(p)

    def app(self, *over, **server) -> tuple[App, io.StringIO]:
        out = io.StringIO()
        return App(self.path(**server), overrides=list(over),
                   env=Environment(stdout=out, stderr=out, isatty=False)), out

    def provision(self, *over, only="gpu,service", check=False, diff=False, **server) -> tuple[int, str]:
        app, out = self.app(*over, **server)
        rc = int(app.provision("rig", only=only, check=check, diff=diff))
        return rc, out.getvalue()

    def task(self, fn, title: str) -> tuple[int, str]:
        app, out = self.app()
        return int(app.each_host("rig", fn, title=title)), out.getvalue()

    def starts(self) -> int:
        """How many times the server process was started (the fake prints its argv first)."""
        r = self.rig.sh("journalctl -u llama-server.service -o cat --no-pager | grep -c '^fake llama-server argv:' || true")
        return int(r.stdout.strip() or 0)

    def show(self) -> dict:
        r = self.rig.sh("systemctl show llama-server.service -p MainPID -p NRestarts -p ActiveState -p User")
        return dict(line.split("=", 1) for line in r.stdout.splitlines())

    def state(self) -> dict:
        return json.loads(self.rig.sh("cat /var/lib/llama-rig/state.json").stdout)


def test_service_lifecycle(srig, tmp_path):
    env = Env(srig, tmp_path)

    # --check on a fresh box: the plan, nothing done
    rc, out = env.provision(check=True)
    assert rc == 0, out
    assert "service: would change: create system user llama" in out
    assert "service: would change: start llama-server.service (" in out
    assert srig.sh("test -e /etc/systemd/system/llama-server.service", check=False).returncode == 1

    # first run: user, files, enable, start through systemd, readiness gate, health + completion
    rc, out = env.provision()
    assert rc == 0, out
    assert "VRAM preflight: skipped — /opt/llama-rig/llama.cpp/current/bin/llama-fit-params not found" in out
    m = re.search(r"llama-server.service started and ready in ([0-9.]+)s", out)
    assert m and float(m.group(1)) >= 1.4, out  # the fake loads for 1.5 s: the gate waited for it
    assert re.search(r"/health 200 in \d+ ms; chat completion in \d+ ms: 'ready'", out)
    sh = env.show()
    assert sh["ActiveState"] == "active" and sh["User"] == "llama"
    assert srig.sh(f"ps -o user= -p {sh['MainPID']}").stdout.strip() == "llama"
    pw = srig.sh("getent passwd llama").stdout.strip().split(":")
    assert pw[5] == "/var/lib/llama-rig/home" and pw[6] == "/usr/sbin/nologin"
    assert srig.sh("stat -c '%U %a' /etc/llama-rig/llama-server.env").stdout.split() == ["root", "600"]
    # the API key (server.api_key: auto): made once on the rig, readable by root and the service only
    assert "service: change: generate the API key on the rig: /etc/llama-rig/api-key (root:llama 0640)" in out
    key = srig.sh("cat /etc/llama-rig/api-key").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key), key
    assert srig.sh("stat -c '%U %G %a' /etc/llama-rig/api-key").stdout.split() == ["root", "llama", "640"]
    assert key not in out
    for where in ("cat /etc/systemd/system/llama-server.service /etc/llama-rig/llama-server.env",
                  "ps -eo args", f"cat /proc/{env.show()['MainPID']}/environ | tr '\\0' '\\n'",
                  "journalctl --no-pager -o cat"):
        assert key not in srig.sh(where).stdout, where
    for path in ("/v1/models", "/v1/chat/completions", "/props"):
        assert http(srig, path) == 401, path
        assert http(srig, path, "wrong-key") == 401, path
        assert http(srig, path, key) == 200, path
    assert http(srig, "/health") == 200  # the readiness gate needs no key
    assert srig.sh("systemctl is-enabled llama-server.service").stdout.strip() == "enabled"
    argv = json.loads(srig.sh("journalctl -u llama-server -o cat | grep -m1 '^fake llama-server argv:'")
                      .stdout.split(":", 1)[1])
    assert argv == ["-m", MODEL, "--host", "0.0.0.0", "--port", "8080", "-ngl", "999", "-c", "4096",
                    "-ctk", "q8_0", "-ctv", "q8_0", "--parallel", "1", "--split-mode", "layer",
                    "-ts", "0.9,1,1,1,1,1", "--no-warmup", "--temp", "0.6", "--top-p", "0.95",
                    "--top-k", "20", "--min-p", "0.0", "--jinja", "--alias", "tiny", "--metrics", "--no-slots",
                    "--api-key-file", "/etc/llama-rig/api-key"]
    for unit in ("llama-server.service", "llama-rig-gpu.service"):
        v = srig.sh(f"systemd-analyze verify /etc/systemd/system/{unit}", check=False)
        assert v.returncode == 0 and v.stderr.strip() == "", (unit, v.stderr)
    # the hardened unit: "OK" or better, and it serves (above) from inside its sandbox
    level, text = exposure(srig)
    assert level <= 4.0, text
    assert sorted(srig.sh("systemctl show -p ProtectSystem -p ProtectHome -p PrivateTmp -p DevicePolicy "
                          "llama-server.service").stdout.split()) == [
        "DevicePolicy=closed", "PrivateTmp=yes", "ProtectHome=yes", "ProtectSystem=strict"]
    pid = env.show()["MainPID"]
    r = srig.sh(f"nsenter -t {pid} -m sh -c 'touch /etc/x; touch /var/lib/llama-rig/home/.w && echo home-ok'",
                check=False)
    assert "Read-only file system" in r.stderr and "home-ok" in r.stdout, (r.stdout, r.stderr)
    assert env.starts() == 1
    assert "llama-server.restart" not in env.state()["owed"]

    # second run: nothing
    rc, out = env.provision()
    assert rc == 0 and "service: ok (no change)" in out and "gpu: ok (no change)" in out, out
    assert env.starts() == 1 and env.show()["MainPID"] == sh["MainPID"]

    # one flag changed -> exactly one restart (daemon-reload first); again -> none
    rc, out = env.provision(diff=True, ctx_size=8192)
    assert rc == 0, out
    assert "+ExecStart=/opt/llama-rig/llama.cpp/current/bin/llama-server -m" in out and "-c 8192" in out
    assert "restart llama-server.service (unit changed)" in out
    assert "handler: running" not in out
    assert env.starts() == 2
    rc, out = env.provision()
    assert rc == 0 and "service: ok (no change)" in out, out
    assert env.starts() == 2

    # a failed run keeps the restart owed: the completion fails after the restart
    srig.sh("touch /etc/fake-llama/chat-fails")
    rc, out = env.provision(ctx_size=16384)
    assert rc == 1, out
    assert "chat completion failed (500" in out and "journal:" in out
    assert env.state()["owed"] == ["llama-server.restart"]
    srig.sh("rm -f /etc/fake-llama/chat-fails")
    n = env.starts()
    rc, out = env.provision()  # same inventory: files are right, only the owed restart is left
    assert rc == 0, out
    assert "restart llama-server.service (restart owed (binary, model or config changed earlier))" in out
    assert env.starts() == n + 1 and env.state()["owed"] == []
    rc, out = env.provision()
    assert "service: ok (no change)" in out and env.starts() == n + 1

    # the binary changed (`current` moved by the llama step, which notifies the handler); a run
    # without the service step keeps it owed, the next run with it restarts exactly once
    srig.sh(f"ln -sfn builds/fake-2 {PREFIX}/llama.cpp/current")
    srig.sh("python3 -c \"import json; p='/var/lib/llama-rig/state.json'; d=json.load(open(p)); "
            "d['owed']=['llama-server.restart']; json.dump(d, open(p, 'w'))\"")
    rc, out = env.provision(only="gpu")
    assert rc == 0 and "handler: llama-server.restart stays owed" in out, out
    assert env.starts() == n + 1 and env.state()["owed"] == ["llama-server.restart"]
    rc, out = env.provision()
    assert rc == 0, out
    assert "restart owed" in out and "binary changed (fake-1 -> fake-2)" in out
    assert "handler: running" not in out
    assert env.starts() == n + 2 and env.state()["owed"] == []
    assert env.state()["service"]["binary"].endswith("/builds/fake-2/bin/llama-server")
    rc, out = env.provision()
    assert "service: ok (no change)" in out and env.starts() == n + 2
    # ... and without the notification the service step still sees the moved binary
    srig.sh(f"ln -sfn builds/fake-1 {PREFIX}/llama.cpp/current")
    rc, out = env.provision()
    assert rc == 0 and "binary changed (fake-2 -> fake-1)" in out, out
    assert env.starts() == n + 3

    # an explicit key (server.api_key_file on this machine): installed in the same file (secret
    # never shown), one restart, enforced; the generated one stops working
    keyfile = tmp_path / "llama.key"
    keyfile.write_text(KEY + "\n")
    n = env.starts()
    rc, out = env.provision(diff=True, api_key_file=str(keyfile))
    assert rc == 0, out
    assert KEY not in out and "(secret content not shown)" in out
    assert "API key file /etc/llama-rig/api-key (server.api_key_file, root:llama 0640)" in out
    assert "(API key file changed)" in out and env.starts() == n + 1
    assert srig.sh("cat /etc/llama-rig/api-key").stdout == KEY + "\n"
    assert srig.sh("stat -c '%U %G %a' /etc/llama-rig/api-key").stdout.split() == ["root", "llama", "640"]
    assert http(srig, "/v1/models", key) == 401 and http(srig, "/v1/models", KEY) == 200
    rc, out = env.provision()
    assert rc == 0 and "service: ok (no change)" in out, out

    # none: the flag goes, the server is open, and every provision says so (0.0.0.0)
    env.server.pop("api_key_file")
    rc, out = env.provision(api_key="none")
    assert rc == 0, out
    warning = ("server.api_key is none and llama-server listens on 0.0.0.0:8080: anyone who can reach "
               "that port can use the GPUs")
    assert warning in out and "--api-key-file" not in srig.sh("cat /etc/systemd/system/llama-server.service").stdout
    assert http(srig, "/v1/models") == 200
    rc, out = env.provision()
    assert rc == 0 and "service: ok (no change)" in out and warning in out, out
    rc, out = env.provision(host="127.0.0.1")  # loopback only: no warning
    assert rc == 0 and warning not in out and "server.api_key is none" not in out, out
    # back to auto: the key on the rig is kept (here: the explicit one), the flag is back
    rc, out = env.provision(api_key="auto", host="0.0.0.0")
    assert rc == 0 and "generate the API key" not in out, out
    assert http(srig, "/v1/models") == 401 and http(srig, "/v1/models", KEY) == 200

    # tasks: status, logs, restart, argv
    rc, out = env.task(svc.status, "service.status")
    assert rc == 0, out
    assert "active (running), enabled" in out and re.search(r"build_info +b0-fake", out) and re.search(r"/v1/models +tiny", out)
    assert KEY not in out
    rc, out = env.task(lambda ctx: svc.logs(ctx, 5), "service.logs")
    assert rc == 0 and "llama-server" in out
    before = env.starts()
    rc, out = env.task(svc.restart, "service.restart")
    assert rc == 0 and "started and ready in" in out and env.starts() == before + 1
    rc, out = env.task(svc.print_argv, "service.argv")
    assert rc == 0
    assert out.strip() == (f"{PREFIX}/llama.cpp/current/bin/llama-server -m {MODEL} --host 0.0.0.0 "
                           "--port 8080 -ngl 999 -c 16384 -ctk q8_0 -ctv q8_0 --parallel 1 --split-mode "
                           "layer -ts 0.9,1,1,1,1,1 --no-warmup --temp 0.6 --top-p 0.95 --top-k 20 "
                           "--min-p 0.0 --jinja --alias tiny --metrics --no-slots "
                           "--api-key-file /etc/llama-rig/api-key")

    # a server that cannot start: StepError with the journal tail, restart stays owed
    srig.sh("touch /etc/fake-llama/exit-now")
    rc, out = env.provision(ctx_size=4096)
    assert rc == 1
    assert "systemctl restart llama-server.service failed" in out and "told to fail" in out, out
    assert env.state()["owed"] == ["llama-server.restart"]
    srig.sh("rm -f /etc/fake-llama/exit-now")
    rc, out = env.provision()
    assert rc == 0 and env.state()["owed"] == [], out

    # gpu "reboot" with the server up: the boot unit is ordered before llama-server
    order = srig.sh("systemctl show llama-server.service -p After -p Wants").stdout
    assert "llama-rig-gpu.service" in order
    assert "llama-server.service" in srig.sh(f"systemctl show {gpu_step.UNIT_NAME} -p Before").stdout


FAKE_FIT = r"""#!/usr/bin/env python3
# stand-in llama-fit-params: the real output format (log on stderr, one line per device on stdout);
# 60 layers of 1700 MiB (+ 50 MiB KV) placed whole by the cumulative -ts, like llama.cpp
import os, sys
a = sys.argv[1:]
with open("/root/fit-params-args", "a") as f:
    f.write(os.environ.get("CUDA_DEVICE_ORDER", "") + " " + " ".join(a) + "\n")
ts = [float(x) for x in a[a.index("-ts") + 1].split(",")] if "-ts" in a else [1.0] * 6
cum = [sum(ts[:i + 1]) / sum(ts) for i in range(6)]
layers = [0] * 6
for il in range(60):
    layers[next(i for i, c in enumerate(cum) if il / 60 < c)] += 1
print("llama_fit_params: printing estimated memory in MiB to stdout (device, model, context, compute) ...",
      file=sys.stderr)
for i, n in enumerate(layers):
    print(f"CUDA{i} {n * 1700} {n * 50} 1200")
print("Host 9 0 290")
"""


def test_vram_preflight_refuses_and_proposes_ts(srig, tmp_path):
    for b in ("fake-1", "fake-2"):
        srig.sh(f"cat > {PREFIX}/llama.cpp/builds/{b}/bin/llama-fit-params <<'EOF'\n{FAKE_FIT}EOF\n"
                f"chmod 0755 {PREFIX}/llama.cpp/builds/{b}/bin/llama-fit-params")
    env = Env(srig, tmp_path)
    rc, out = env.provision()  # settle whatever the previous test left
    assert rc == 0, out
    # GPU 0 has 6000 MiB taken by something else: 18576 free < 17000 + 500 + 1200 + 1536 margin
    srig.sh("mkdir -p /etc/fake-nvidia-smi && echo '[{\"memory_used\": 6000}, {}, {}, {}, {}, {}]' "
            "> /etc/fake-nvidia-smi/gpus.json")
    n = env.starts()
    srig.sh("rm -f /root/fit-params-args")
    rc, out = env.provision(ctx_size=8192)
    assert rc == 1, out
    assert ("VRAM preflight: the plan does not fit — GPU 0 (NVIDIA GeForce RTX 3090): needs 18700 MiB "
            "(model 17000 + context 500 + compute 1200) + 1536 MiB margin but only 18576 MiB are free") in out, out
    assert "try server.tensor_split: [0.73, 1, 1, 1, 1, 1] (llama-fit-params: fits)" in out
    assert "(llama-server was not restarted)" in out
    assert re.search(r"CUDA0 +17000 +500 +1200 +18700 +18576 +DOES NOT FIT", out), out
    assert env.starts() == n  # the old server keeps serving
    # the plan as configured, then the proposal checked with the same tool before it is offered
    assert srig.sh("cat /root/fit-params-args").stdout.splitlines() == [
        f"PCI_BUS_ID -m {MODEL} -c 8192 -ctk q8_0 -ctv q8_0 -ngl 999 -sm layer -ts 0.9,1,1,1,1,1 -fitp on",
        f"PCI_BUS_ID -m {MODEL} -c 8192 -ctk q8_0 -ctv q8_0 -ngl 999 -sm layer -ts 0.73,1,1,1,1,1 -fitp on"]
    assert env.state()["owed"] == ["llama-server.restart"]  # the new unit is owed a restart
    # the other process is gone: the plan fits, the owed restart happens once
    srig.sh("rm -f /etc/fake-nvidia-smi/gpus.json")
    rc, out = env.provision(ctx_size=8192)
    assert rc == 0, out
    assert re.search(r"CUDA0 +17000 +500 +1200 +18700 +24575 +ok", out), out
    assert env.starts() == n + 1 and env.state()["owed"] == []
