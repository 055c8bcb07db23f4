"""A real systemd reads llama-rig's unit back exactly: the llama-server unit rendered with hostile
(but valid) values -- shell syntax, systemd specifiers (%n), variables ($HOME), quotes, backslashes,
a lone `;` (systemd's command separator), empty words -- is installed in a Tier B rig, started with
its ExecStart= binary swapped for a script that records its argv, and systemd must have passed
exactly the argv llama-rig meant; Description= must read back as written; no canary appears."""
from __future__ import annotations

import base64

import pytest

from provision import inventory as inv
from provision.steps import service
from tests.catalog import record

PART = "real systemd"
pytestmark = pytest.mark.rig

DUMP = "/usr/local/bin/llama-rig-argv-dump"
CANARY = "/run/llama-rig-CANARY"
ALIAS = f"x; touch {CANARY} $(id) %n %% $HOME ${{PATH}} \"dq\" 'sq' \\ \\; ; `id`"
EXTRA = [";", "\\;", "$HOME", "${PATH}", "%n", "%%", "a b", '"', "'", "\\", "", f"--x=$(touch {CANARY})",
         f"`touch {CANARY}`", "&&", "|", ">", "#not-a-comment", "=", "\\n"]
MODEL = "/models/a b/%n/$HOME/x;y'z\"q\\.gguf"


def _put(rig, path: str, text: str, mode: str = "0644") -> None:
    b64 = base64.b64encode(text.encode()).decode()
    rig.sh(f"mkdir -p \"$(dirname {path})\" && echo {b64} | base64 -d > {path} && chmod {mode} {path}")


def test_systemd_passes_exactly_our_argv(rig_factory):
    rig = rig_factory()
    cfg = inv.from_data({"hosts": {"r": {"connection": {"type": "local"},
                                         "server": {"alias": ALIAS, "extra_args": EXTRA},
                                         "paths": {"prefix": "/opt/llama rig/%h/$USER"}}}}).hosts["r"].cfg
    unit = service.render_unit(cfg, MODEL, binary=DUMP)
    want = service.server_argv(cfg, MODEL, DUMP)
    # the hardened unit (ProtectSystem=strict) may write only its ReadWritePaths: the argv goes there
    rig.sh("mkdir -p /var/lib/llama-rig/home")
    _put(rig, DUMP, "#!/bin/sh\nprintf '%s\\0' \"$0\" \"$@\" > /var/lib/llama-rig/home/argv.bin\n", "0755")
    _put(rig, "/etc/systemd/system/catalog-argv.service", unit)
    # the test swaps what needs a provisioned rig (user, env file, readiness helper) for plain values
    _put(rig, "/etc/systemd/system/catalog-argv.service.d/test.conf",
         "[Service]\nType=oneshot\nUser=root\nGroup=root\nWorkingDirectory=/\nEnvironmentFile=\n"
         "ExecStartPost=\nRestart=no\n")
    rig.sh("systemctl daemon-reload && systemctl start catalog-argv.service", timeout=60)
    got = rig.sh("cat /var/lib/llama-rig/home/argv.bin").stdout.split("\0")[:-1]
    assert got == want, (got, want)
    desc = rig.sh("systemctl show -p Description --value catalog-argv.service").stdout.rstrip("\n")
    assert desc == f"llama.cpp server ({ALIAS}) - llama-rig"
    assert rig.sh(f"test -e {CANARY}", check=False).returncode == 1
    assert len(unit.split("\n")) == len(service.render_unit(
        inv.from_data({"hosts": {"r": {"connection": {"type": "local"}}}}).hosts["r"].cfg, "/m.gguf").split("\n"))
    record(PART, "systemd alias", "harmless")
    for w in EXTRA:
        record(PART, f"systemd extra_arg {w!r}", "harmless")
