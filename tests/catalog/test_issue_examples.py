"""Issue 13's examples, one test each: none of them reproduces."""
from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.app import App
from provision.console import Environment
from provision.errors import ExitStatus, InventoryError, UnsafeValue
from provision.facts.gpu import GpuFacts
from provision.steps import service, system
from tests.catalog import record
from tests.catalog.test_inventory_catalog import HF

PART = "issue examples"
REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "hosts.yaml"


def invoke(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "invoke", "-r", str(REPO), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def cfg_of(**sections) -> dict:
    return inv.from_data({"hosts": {"r": {"connection": {"type": "local"}, **sections}}}).hosts["r"].cfg


def refused(sections: dict, where: str) -> str:
    with pytest.raises(InventoryError) as ei:
        cfg_of(**sections)
    msg = str(ei.value)
    assert msg.startswith(f"hosts.yaml: host 'r': {where}: ") and "\n" not in msg, msg
    return msg


# -- "--check ran a command": git gets a value that starts with -- --------------------------------

def test_set_repo_upload_pack_creates_nothing(tmp_path):
    r = invoke("provision", "--host", "local", "--check", "--only", "llama", "--inventory", str(SHIPPED),
               "--set", "llama_cpp.repo=--upload-pack=touch pwned;", cwd=tmp_path)
    assert r.returncode == 2, r
    assert r.stderr.splitlines() == [
        "command line: llama_cpp.repo: must be a git URL (https://, http://, git://, ssh://, file://, "
        "user@host:path or /abs/path), not an option (it starts with '-'): '--upload-pack=touch pwned;'"]
    assert r.stdout == "" and list(tmp_path.iterdir()) == []
    record(PART, "issue: --set llama_cpp.repo=--upload-pack", "refused")


# -- apt: unquoted toolkit, -o package, proxy with a quote ----------------------------------------

def test_apt_values():
    assert "got 'cuda-toolkit-12-8; touch x'" in refused({"system": {"cuda_toolkit": "cuda-toolkit-12-8; touch x"}},
                                                          "system.cuda_toolkit")
    refused({"system": {"extra_packages": ["-oAPT::Get::AllowUnauthenticated=1"]}}, "system.extra_packages")
    refused({"system": {"apt_proxy": 'http://10.0.0.1:3142";\nAcquire::http::Proxy::x "DIRECT'}}, "system.apt_proxy")
    refused({"system": {"apt_proxy": 'http://10.0.0.1:3142"; Acquire::x "y'}}, "system.apt_proxy")
    # the second fence, had a value been put in after validation: `--` and one word per package;
    # the proxy line is written only from a value that passes the proxy-URL check
    c = cfg_of(llama_cpp={"cuda": False})
    c["system"]["extra_packages"] = ["-oAPT::Get::AllowUnauthenticated=1", "x; touch y"]
    [run] = system.plan(c, HF, GpuFacts(False, "none"))
    words = shlex.split(run.commands[1])
    dd = words.index("--")
    assert words[dd + 1:][-2:] == ["-oAPT::Get::AllowUnauthenticated=1", "x; touch y"]
    assert not any(w.startswith("-") for w in words[dd + 1:-2])
    c["system"]["apt_proxy"] = 'http://x:1";\nAcquire::x "y'
    with pytest.raises(UnsafeValue):
        system.plan(c, HF, GpuFacts(False, "none"))
    record(PART, "issue: apt toolkit/-o package/proxy quote", "refused")


# -- unit lines from a newline ----------------------------------------------------------------------

@pytest.mark.parametrize("section,key,value", [
    ("paths", "state_dir", "/var/lib/x\nUser=root"), ("model", "dir", "/m\nExecStartPre=/bin/touch /x"),
    ("server", "alias", "a\nUser=root"), ("server", "extra_args", ["--x", "y\nExecStartPre=/bin/sh"])])
def test_newline_never_reaches_the_unit(section, key, value):
    refused({section: {key: value}}, f"{section}.{key}")
    # second fence: the template refuses a control character wherever it comes from
    c = cfg_of()
    c[section][key] = value
    with pytest.raises(UnsafeValue) as ei:  # (model.dir reaches the unit as the model's path)
        service.render_unit(c, f"{c['model']['dir']}/org__name/model.gguf")
    assert "\n" not in str(ei.value) and "refusing to write" in str(ei.value)
    with pytest.raises(UnsafeValue):
        service.render_unit(cfg_of(), "/models/x.gguf\nUser=root")  # a model path from the rig's state
    record(PART, f"issue: newline in {section}.{key}", "refused")


# -- YAML -----------------------------------------------------------------------------------------

def test_yaml_examples(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("x-d: &d {port: 2222, user: admin}\nhosts:\n  rig:\n    connection:\n      <<: *d\n"
                 "      address: 10.0.0.5\n      port: 22\n")
    assert inv.load(p).hosts["rig"]["connection"]["port"] == 22  # merge key + override: accepted
    p.write_text("hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: "
                 + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(InventoryError) as ei:
        inv.load(p)
    assert str(ei.value) == "hosts.yaml: line 4, column 74: YAML syntax error: nested more than 64 levels deep"
    p.write_text("hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {port: '" + "9x" * 5_000_000 + "'}\n")
    with pytest.raises(InventoryError) as ei:
        inv.load(p)
    assert str(ei.value) == "hosts.yaml: 9.5 MiB is too large for an inventory (at most 1 MiB)"
    with pytest.raises(InventoryError) as ei:  # a 10 MB value on the command line: cut
        inv.load(SHIPPED, inv.parse_overrides(["server.port=" + "9x" * 5_000_000]))
    assert str(ei.value) == ("command line: server.port: must be an integer between 1 and 65535, got a string '"
                             + "9x" * 30 + "…'")
    assert "model.repo: must be a Hugging Face model id" in refused({"model": {"repo": "not a repo id!!"}}, "model.repo")
    record(PART, "issue: yaml merge/depth/size/repo id", "refused")


# -- task options: before any host, exit 2 ----------------------------------------------------------

@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    yield s
    s.close()


def _nobody_connected(sock) -> bool:
    try:
        c, _ = sock.accept()
    except BlockingIOError:
        return True
    c.close()
    return False


def test_task_option_examples_exit_2_before_contact(tmp_path, listener):
    key = tmp_path / "key"
    key.write_text("x\n")
    p = tmp_path / "inv.yaml"
    p.write_text(json.dumps({"hosts": {"rig": {"connection": {
        "address": "127.0.0.1", "port": listener.getsockname()[1], "key": str(key), "connect_timeout": 2}}}}))
    examples = [["provision", "--parallel", "abc"], ["bench", "--depths", "foo"], ["tune", "--pairs", "foo"],
                ["gpu.power", "--watts", "abc"], ["service.logs", "-n", "abc"], ["provision", "--parallel", "0"],
                ["bench", "--reps", "0"], ["bench", "--service", "bogus"], ["gpu.power", "--watts", "5000"],
                ["provision", "--bogus-flag"], ["provision", "--set", "connection.key=/nonexist"]]
    for ex in examples:
        r = invoke(ex[0], "--host", "rig", "--inventory", str(p), *ex[1:], cwd=tmp_path)
        assert r.returncode == 2, (ex, r)
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, (ex, r.stderr)
        assert _nobody_connected(listener), ex
        record(PART, "issue: " + " ".join(ex), "refused")


# -- messages ------------------------------------------------------------------------------------

def _silent_server():
    """Accepts TCP and says nothing (a rig whose sshd hangs, a firewall that holds connections)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    held = []

    def serve():
        while True:
            try:
                held.append(s.accept()[0])
            except OSError:
                return
    threading.Thread(target=serve, daemon=True).start()
    return s, held


def test_unreachable_rig_reads_as_a_person_would_say_it(tmp_path):
    s, held = _silent_server()
    port = s.getsockname()[1]
    p = tmp_path / "inv.yaml"
    p.write_text(json.dumps({"hosts": {"rig": {"connection": {"address": "127.0.0.1", "port": port,
                                                              "connect_timeout": 2}}}}))
    try:
        t0 = time.monotonic()
        r = invoke("facts", "--host", "rig", "--inventory", str(p), cwd=tmp_path)
    finally:
        s.close()
        for c in held:
            c.close()
    assert r.returncode == 3
    assert r.stderr.splitlines() == [f"[rig] UNREACHABLE: no SSH server answered on 127.0.0.1:{port} within "
                                     "2 s (is the rig up, is the port right?)"]
    assert time.monotonic() - t0 < 30
    record(PART, "issue: unreachable message", "refused")


def _local_inventory(tmp_path) -> Path:
    p = tmp_path / "inv.yaml"
    p.write_text(json.dumps({"hosts": {"box": {"connection": {"type": "local"}, "server": {"port": 1},
                                               "paths": {"prefix": str(tmp_path / "opt"),
                                                         "state_dir": str(tmp_path / "state")}}}}))
    return p


def test_status_tasks_on_an_empty_host_say_what_to_run(tmp_path):
    p = _local_inventory(tmp_path)
    r = invoke("llama.status", "--host", "box", "--inventory", str(p), cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [
        f"[box] llama: nothing built on box yet (no llama.cpp clone or build under {tmp_path}/opt/llama.cpp)"
        " — run `invoke provision --host box` (or `invoke llama.build --host box`)"]
    r = invoke("lock.show", "box", "--inventory", str(p), cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "" and "null" not in r.stdout
    assert r.stdout.splitlines() == [
        f"# box: nothing provisioned yet (no llama.cpp build or model recorded in {tmp_path}/state/state.json)"
        " — run `invoke provision --host box` first"]
    if not os.path.exists(service.UNIT_PATH):  # this machine has no llama-server unit
        r = invoke("service.status", "--host", "box", "--inventory", str(p), cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout.splitlines() == ["[box] service: llama-server.service is not installed on box yet — "
                                         "run `invoke provision --host box`"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["inv.yaml"]  # status tasks made nothing
    record(PART, "issue: status tasks on an empty host", "harmless")


def test_service_status_installed_but_no_systemd_or_down(tmp_path, monkeypatch):
    """The unit is there; systemd does not answer (this machine) or the server is down: one line,
    exit 1, no '?' rows, no raw URLError."""
    unit = tmp_path / "llama-server.service"
    unit.write_text("[Unit]\n")
    monkeypatch.setattr(service, "UNIT_PATH", str(unit))
    out = io.StringIO()
    app = App(inventory_path=str(_local_inventory(tmp_path)), env=Environment(out, out, False))
    rc = app.each_host("box", service.status, title="service.status")
    text = out.getvalue()
    assert rc == ExitStatus.FAILED
    assert "URLError" not in text and "?" not in text and "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("[box] service.status: FAILED: ")
    assert ("systemd does not answer on box" in last
            or "llama-server.service is not serving (inactive, no answer: nothing listens on 127.0.0.1:1)" in last), last
    record(PART, "issue: service.status without systemd", "refused")


def test_service_argv_with_model_needs_no_rig(tmp_path, listener):
    p = tmp_path / "inv.yaml"
    p.write_text(json.dumps({"hosts": {"rig": {"connection": {"address": "127.0.0.1",
                                                              "port": listener.getsockname()[1]},
                                               "server": {"alias": "a b"}}}}))
    r = invoke("service.argv", "--host", "rig", "--model", "/m/x y.gguf", "--inventory", str(p), cwd=tmp_path)
    assert r.returncode == 0, r
    words = shlex.split(r.stdout)
    assert words[:3] == ["/opt/llama-rig/llama.cpp/current/bin/llama-server", "-m", "/m/x y.gguf"]
    assert words[words.index("--alias") + 1] == "a b"
    assert _nobody_connected(listener)
    record(PART, "issue: service.argv --model offline", "harmless")


def test_missing_key_file_is_bad_input_for_every_way_of_selecting(tmp_path):
    i = inv.from_data({"hosts": {"rig": {"connection": {"address": "10.0.0.5", "key": str(tmp_path / "nope")}},
                                 "box": {"connection": {"type": "local"}}},
                       "groups": {"g": {"hosts": ["rig"]}}})
    for how in (lambda: i.select("rig"), lambda: i.select("g"), lambda: i.select("box,rig"),
                lambda: i.select(None, all_hosts=True)):
        with pytest.raises(InventoryError) as ei:
            how()
        assert str(ei.value) == f"hosts.yaml: host 'rig': connection.key: no such file: {tmp_path / 'nope'}"
        assert ei.value.status == ExitStatus.BAD_INPUT
    assert [h.name for h in i.select("box")] == ["box"]  # a local host needs no key
    record(PART, "issue: missing connection.key, any selection", "refused")
