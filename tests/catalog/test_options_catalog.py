"""Task options are checked before any host is contacted: numbers, ranges, enums, lists, files.
Each bad value is one line `command line: --flag: ...` and exit status 2; invoke's own parse errors
are exit 2 as well. The unit part calls the tasks themselves (with an inventory that does not exist:
had the option not been checked first, the message would be about the inventory); the CLI part
runs the real `invoke` against an inventory whose host is a listening socket nobody may touch."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

import tasks
from provision import values
from tests.catalog import record

PART = "task options"
REPO = Path(__file__).resolve().parents[2]
NO_INVENTORY = "/nonexistent/hosts.yaml"

BAD = [  # (task, option, value, message after "command line: ")
    ("provision", "parallel", "abc", "--parallel: must be an integer between 1 and 64, got 'abc'"),
    ("provision", "parallel", "0", "--parallel: must be an integer between 1 and 64, got 0"),
    ("provision", "parallel", "-1", "--parallel: must be an integer between 1 and 64, got -1"),
    ("provision", "parallel", "65", "--parallel: must be an integer between 1 and 64, got 65"),
    ("provision", "parallel", "1.5", "--parallel: must be an integer between 1 and 64, got '1.5'"),
    ("provision", "parallel", "", "--parallel: must be an integer between 1 and 64, got ''"),
    ("provision", "parallel", "9" * 5000, "--parallel: must be an integer between 1 and 64, got '" + "9" * 60 + "…'"),
    ("provision", "parallel", "4; touch x", "--parallel: must be an integer between 1 and 64, got '4; touch x'"),
    ("gpu_power", "watts", "abc", "--watts: must be a number between 10 and 2000, got 'abc'"),
    ("gpu_power", "watts", "5000", "--watts: must be a number between 10 and 2000, got 5000"),
    ("gpu_power", "watts", "5", "--watts: must be a number between 10 and 2000, got 5"),
    ("gpu_power", "watts", "nan", "--watts: must be a number between 10 and 2000, got 'nan'"),
    ("gpu_power", "watts", "inf", "--watts: must be a number between 10 and 2000, got 'inf'"),
    ("gpu_power", "watts", "-300", "--watts: must be a number between 10 and 2000, got -300"),
    ("gpu_power", "watts", "300W", "--watts: must be a number between 10 and 2000, got '300W'"),
    ("service_logs", "n", "abc", "-n: must be an integer between 1 and 100000, got 'abc'"),
    ("service_logs", "n", "0", "-n: must be an integer between 1 and 100000, got 0"),
    ("service_logs", "n", "100001", "-n: must be an integer between 1 and 100000, got 100001"),
    ("service_logs", "n", "5;reboot", "-n: must be an integer between 1 and 100000, got '5;reboot'"),
    ("status", "interval", "abc", "--interval: must be a number between 0.5 and 86400, got 'abc'"),
    ("status", "interval", "0.1", "--interval: must be a number between 0.5 and 86400, got 0.1"),
    ("status", "interval", "nan", "--interval: must be a number between 0.5 and 86400, got 'nan'"),
    ("model_update", "revision", "--upload-pack=touch x", "--revision: must be a git branch, tag or 40-hex "
     "commit, not an option (it starts with '-'): '--upload-pack=touch x'"),
    ("model_update", "revision", "main..x", "--revision: must be a git branch, tag or 40-hex commit "
     "(git check-ref-format: no '..'), got 'main..x'"),
    ("service_argv", "model", "relative.gguf", "--model: must be an absolute path, got 'relative.gguf'"),
    ("service_argv", "model", "/m/x\nExecStartPre=/bin/sh", "--model: must be one line of text without "
     "control characters, got a newline in '/m/x\\nExecStartPre=/bin/sh'"),
]


@pytest.mark.parametrize("task,option,value,message", BAD,
                         ids=[f"{t}--{o}={v[:20]!r}" for t, o, v, _ in BAD])
def test_bad_option_is_one_line_exit_2_before_any_host(request, task, option, value, message):
    fn = getattr(tasks, task)
    with pytest.raises(Exit) as ei:
        fn(Context(), host="rig", inventory=NO_INVENTORY, **{option: value})
    assert ei.value.code == 2
    assert ei.value.message == "command line: " + message
    assert values.bad_char(ei.value.message) is None
    record(PART, request.node.callspec.id, "refused")


def test_good_options_reach_the_inventory_step():
    """Good values pass the options check: the next thing that speaks is the inventory (exit 2,
    file not found) -- so the check above really ran first."""
    for fn, kw in ((tasks.provision, {"parallel": "8"}), (tasks.gpu_power, {"watts": "350"}),
                   (tasks.service_logs, {"n": "20"}), (tasks.service_argv, {"model": "/m/a.gguf"}),
                   (tasks.status, {"interval": "0.5"}), (tasks.model_update, {"revision": "main"})):
        with pytest.raises(Exit) as ei:
            fn(Context(), host="rig", inventory=NO_INVENTORY, **kw)
        assert ei.value.code == 2, fn.name
        assert ei.value.message is None  # the inventory error was printed by the app, not here


# -- through the real CLI ------------------------------------------------------------------------


@pytest.fixture
def watched(tmp_path):
    """An inventory whose only host is a listening socket: nobody may connect to it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    key = tmp_path / "id"
    key.write_text("not used\n")
    inv_path = tmp_path / "inv.yaml"
    inv_path.write_text(json.dumps({"hosts": {"rig": {"connection": {
        "address": "127.0.0.1", "port": s.getsockname()[1], "connect_timeout": 2, "key": str(key)}}}}))
    yield inv_path, s
    s.close()


def _nobody_connected(sock) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


CLI = [  # (argv after `invoke`, first line of stderr (prefix match with '*'))
    (["provision", "--host", "rig", "--parallel", "abc"],
     "command line: --parallel: must be an integer between 1 and 64, got 'abc'"),
    (["bench", "--host", "rig", "--reps", "abc"], "command line: --reps: must be an integer, got 'abc'"),
    (["tune", "--host", "rig", "--reps", "x"], "command line: --reps: must be an integer, got 'x'"),
    (["gpu.power", "--host", "rig", "--watts", "5000"],
     "command line: --watts: must be a number between 10 and 2000, got 5000"),
    (["provision", "--host", "rig", "--hots", "x"], "No idea what '--hots' is!"),
    (["service.logs", "--host", "rig", "-n"], "Flag <Argument: n> needed value and was not given one!"),
    (["provision", "--host", "rig", "--check", "--set", "connection.key=/nonexist"],
     "inv.yaml: host 'rig': connection.key: no such file: /nonexist"),
    (["provision", "--host", "rig", "--check", "--set", "llama_cpp.repo=--upload-pack=touch pwned;"],
     "command line: llama_cpp.repo: must be a git URL (https://, http://, git://, ssh://, file://, "
     "user@host:path or /abs/path), not an option (it starts with '-'): '--upload-pack=touch pwned;'"),
]


@pytest.mark.parametrize("argv,line", CLI, ids=[" ".join(a[:1] + a[3:5]) for a, _ in CLI])
def test_cli_bad_input_exit_2_nobody_contacted(watched, tmp_path, argv, line):
    inv_path, sock = watched
    cmd = [sys.executable, "-m", "invoke", "-r", str(REPO), *argv[:3], "--inventory", str(inv_path), *argv[3:]]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert r.stderr.splitlines() == [line], r.stderr
    assert r.stdout == ""
    assert _nobody_connected(sock)
    assert not (tmp_path / "pwned").exists()
    record(PART, "cli " + " ".join(argv), "refused")


def test_help_names_the_valid_values():
    """`invoke --help TASK` lists the fixed sets: step names, --service modes, ranges, sections."""
    from provision.inventory import STEP_SECTIONS
    from provision.steps import step_names

    def helptext(name):
        r = subprocess.run([sys.executable, "-m", "invoke", "-r", str(REPO), "--help", name],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return " ".join(r.stdout.split())

    prov = helptext("provision")
    assert all(s in prov for s in step_names()) and "1 to 64" in prov
    assert all(s in prov for s in STEP_SECTIONS)
    for t in ("bench", "tune"):
        assert "auto (stop llama-server only if its VRAM is needed), stop, or keep" in helptext(t)
    assert "10 to 2000 W" in helptext("gpu.power")
    assert "1 to 100000" in helptext("service.logs")
    assert "the rig is not contacted" in helptext("service.argv")
