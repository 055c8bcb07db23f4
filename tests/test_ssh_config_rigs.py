"""~/.ssh/config (connection.ssh_config / $LLAMA_RIG_SSH_CONFIG): Host aliases, User, Port,
IdentityFile, ProxyJump and ProxyCommand, the inventory winning where it sets a value; IPv6
addresses with and without brackets (and `[addr]:port`).

Without rigs: what an ssh_config resolves to, and its mistakes as one line (exit 2).
Tier A (sshd on 127.0.0.1 / ::1): aliases, IPv6, ProxyCommand.
Tier B: a bastion rig and a rig whose sshd listens only on a private link to the bastion --
`invoke facts` and a provision step go through the ProxyJump of the ssh_config."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision import sshconf
from provision.errors import ConnectError, InventoryError
from provision.target import SSHTarget, connect
from tests.rigs import tcp_open
from tests.rigs.access import private_link, ssh_only_on, unlink_private
from tests.rigs.sshd import start_sshd

REPO = Path(__file__).resolve().parents[1]


def load(hosts: dict, overrides=None) -> inv.Inventory:
    return inv.from_data({"hosts": hosts}, "hosts.yaml", overrides=overrides)


def conf(tmp_path, text: str) -> str:
    p = tmp_path / "ssh_config"
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------ no rigs

def test_alias_gives_hostname_user_port_identityfile(tmp_path):
    key = tmp_path / "k"
    key.write_text("x")
    cfg = conf(tmp_path, f"Host gpu1 gpu-*\n  HostName 10.1.2.3\n  User rigadmin\n  Port 2222\n"
                         f"  IdentityFile {key}\n  IdentitiesOnly yes\n  ConnectTimeout 7\n"
                         "Host *\n  User nobody-else\n")
    i = load({"gpu1": {"connection": {"address": "gpu1", "ssh_config": cfg}}})
    ep = sshconf.resolve(i.hosts["gpu1"])
    assert (ep.alias, ep.hostname, ep.port, ep.user, ep.keys, ep.identities_only, ep.timeout) == \
        ("gpu1", "10.1.2.3", 2222, "rigadmin", [str(key)], True, 7.0)
    assert ep.jump == [] and ep.proxy_command is None
    # select() checks the file and writes the user and port the host really gets
    h = i.select("gpu1")[0]
    assert (h.cfg["connection"]["user"], h.cfg["connection"]["port"]) == ("rigadmin", 2222)
    # no Host block for the name: the inventory's values and defaults
    ep = sshconf.resolve(load({"r": {"connection": {"address": "10.0.0.9", "ssh_config": cfg}}}).hosts["r"])
    assert (ep.hostname, ep.port, ep.user, ep.keys) == ("10.0.0.9", 22, "nobody-else", [])


def test_the_inventory_wins_where_it_sets_a_value(tmp_path):
    cfg = conf(tmp_path, "Host gpu1\n  HostName 10.1.2.3\n  User rigadmin\n  Port 2222\n"
                         "  IdentityFile /nonexistent/k\n  ConnectTimeout 7\n")
    key = tmp_path / "mine"
    key.write_text("x")
    h = load({"gpu1": {"connection": {"address": "gpu1", "ssh_config": cfg, "user": "root",
                                      "port": 22, "key": str(key), "connect_timeout": 3}}}).hosts["gpu1"]
    ep = sshconf.resolve(h)
    assert (ep.hostname, ep.port, ep.user, ep.keys, ep.key_source, ep.timeout) == \
        ("10.1.2.3", 22, "root", [str(key)], "connection.key", 3.0)
    # a value set in `defaults:` or on the command line is set too
    i = inv.from_data({"defaults": {"connection": {"port": 2200}},
                       "hosts": {"gpu1": {"connection": {"address": "gpu1", "ssh_config": cfg}}}},
                      overrides={"connection": {"user": "admin"}})
    ep = sshconf.resolve(i.hosts["gpu1"])
    assert (ep.port, ep.user) == (2200, "admin")


def test_proxyjump_hops_in_dial_order(tmp_path):
    cfg = conf(tmp_path, "Host hidden\n  HostName 10.9.0.2\n  ProxyJump ops@edge:2201,inner\n"
                         "Host inner\n  HostName 10.8.0.1\n  User jumper\n  IdentityFile ~/inner_key\n"
                         "Host edge\n  HostName edge.example.com\n  ProxyJump outer\n"
                         "Host outer\n  HostName [2001:db8::7]\n"
                         "Host *\n  ProxyJump outer\n")
    ep = sshconf.resolve(load({"h": {"connection": {"address": "hidden", "ssh_config": cfg,
                                                    "key": "/k"}}}).hosts["h"])
    assert [(j.alias, j.hostname, j.port, j.user) for j in ep.jump] == [
        ("outer", "2001:db8::7", 22, os.environ.get("USER") or __import__("getpass").getuser()),
        ("edge", "edge.example.com", 2201, "ops"),
        ("inner", "10.8.0.1", 22, "jumper")]
    assert ep.jump[2].keys == [os.path.expanduser("~/inner_key")]
    assert ep.jump[1].keys == ["/k"] and ep.jump[1].key_source == "connection.key"
    assert ep.jump[0].shown == "[2001:db8::7]:22"
    # `ProxyJump none` turns a `Host *` jump off
    cfg2 = conf(tmp_path, "Host direct\n  ProxyJump none\nHost *\n  ProxyJump outer\n")
    ep = sshconf.resolve(load({"h": {"connection": {"address": "direct", "ssh_config": cfg2}}}).hosts["h"])
    assert ep.jump == []


@pytest.mark.parametrize("text,msg", [
    ("Host gpu1\n  Port abc\n", "{cfg}: Host 'gpu1': Port: must be a port number, got 'abc'"),
    ("Host gpu1\n  Port 70000\n", "{cfg}: Host 'gpu1': Port: must be a port number, got '70000'"),
    ("Host gpu1\n  HostName -oProxyCommand=x\n",
     "{cfg}: Host 'gpu1': HostName: must be a host name or an IP address, got '-oProxyCommand=x'"),
    ("Host gpu1\n  User 'a;b'\n", "{cfg}: Host 'gpu1': User: must be a user name, got "),
    ("Host gpu1\n  ProxyJump a\nHost a\n  ProxyJump b\nHost b\n  ProxyJump gpu1\n",
     "{cfg}: ProxyJump: 'gpu1' loops back (or more than 8 hops)"),
    ("Host gpu1\n  ProxyJump user@@x\n", "{cfg}: ProxyJump: not [user@]host[:port]: 'user@@x'"),
    ("Host gpu1\n  ConnectTimeout soon\n", "{cfg}: Host 'gpu1': ConnectTimeout: must be 1 to 300 seconds, got 'soon'"),
])
def test_ssh_config_mistakes_are_one_line_before_any_contact(tmp_path, text, msg):
    cfg = conf(tmp_path, text)
    i = load({"gpu1": {"connection": {"address": "gpu1", "ssh_config": cfg}}})
    with pytest.raises(InventoryError) as ei:
        i.select("gpu1")
    assert str(ei.value).startswith(msg.format(cfg=cfg)), str(ei.value)
    assert ei.value.status == 2


def test_which_file(tmp_path, monkeypatch):
    monkeypatch.delenv(sshconf.ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/config: nothing is read, no error
    h = load({"r": {"connection": {"address": "gpu1"}}}).hosts["r"]
    assert sshconf.config_path(h.cfg["connection"]) is None
    assert sshconf.resolve(h).hostname == "gpu1"
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host gpu1\n  HostName 10.0.0.1\n")
    assert sshconf.resolve(h).hostname == "10.0.0.1"
    other = conf(tmp_path, "Host gpu1\n  HostName 10.0.0.2\n")
    monkeypatch.setenv(sshconf.ENV, other)
    assert sshconf.resolve(h).hostname == "10.0.0.2"
    h2 = load({"r": {"connection": {"address": "gpu1", "ssh_config": "none"}}}).hosts["r"]
    assert sshconf.resolve(h2).hostname == "gpu1"
    # a file named (inventory or environment) that is not there is a mistake
    monkeypatch.setenv(sshconf.ENV, str(tmp_path / "nope"))
    with pytest.raises(InventoryError, match=r"host 'r': connection.ssh_config: no such file: .*nope"):
        load({"r": {"connection": {"address": "gpu1"}}}).select("r")


def test_ipv6_and_host_port_addresses_in_the_inventory():
    def con(addr, **kw):
        return load({"r": {"connection": {"address": addr, **kw}}}).hosts["r"].cfg["connection"]
    assert (con("::1")["address"], con("::1")["port"]) == ("::1", 22)
    assert (con("[::1]")["address"], con("[::1]")["port"]) == ("::1", 22)
    assert (con("[fe80::1%eth0]:2222")["address"], con("[fe80::1%eth0]:2222")["port"]) == ("fe80::1%eth0", 2222)
    assert (con("rig.lan:2200")["address"], con("rig.lan:2200")["port"]) == ("rig.lan", 2200)
    assert con("[::1]:2222", port=2222)["port"] == 2222
    with pytest.raises(InventoryError) as ei:
        con("[::1]:2222", port=22)
    assert str(ei.value) == ("hosts.yaml: host 'r': connection.port: 22 but connection.address "
                             "'[::1]:2222' says port 2222")
    for bad in ("[rig.lan]", "[::1]:0", "a:b:c"):
        with pytest.raises(InventoryError, match="connection.address: must be"):
            con(bad)


# ------------------------------------------------------------------------------ Tier A

@pytest.fixture
def sshd6(rig_keys, _rig_sudo_user):
    key, pub = rig_keys
    server = start_sshd(key, pub, sudo_user=_rig_sudo_user, listen="::1")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.sshd
def test_ipv6_with_and_without_brackets_connects(sshd6, tmp_path):
    rig = sshd6.root_rig
    assert rig.address == "::1"
    for entry in (rig.inventory_entry(),
                  rig.inventory_entry(connection={"address": "[::1]"}),
                  {"connection": {**rig.inventory_entry()["connection"], "address": f"[::1]:{sshd6.port}"}}):
        if "[::1]:" in entry["connection"]["address"]:
            del entry["connection"]["port"]
        t = connect(load({"v6": entry}).hosts["v6"])
        try:
            assert t.run("echo ok").stdout == "ok\n"
        finally:
            t.close()
    # accept-new files the key under [::1]:PORT, as OpenSSH does
    kh = tmp_path / "kh"
    t = connect(load({"v6": rig.inventory_entry(connection={"address": "[::1]", "known_hosts": str(kh),
                                                            "host_key_policy": "accept-new"})}).hosts["v6"])
    t.close()
    assert kh.read_text().startswith(f"[::1]:{sshd6.port} ssh-ed25519 ")
    # nothing listens: one line with the bracketed address
    with pytest.raises(ConnectError) as ei:
        connect(load({"v6": rig.inventory_entry(connection={"address": "::1", "port": 1})}).hosts["v6"])
    assert str(ei.value) == "no SSH server answered on [::1]:1: connection refused (is the rig up, is the port right?)"


@pytest.mark.sshd
def test_alias_user_port_identityfile_from_ssh_config(sshd, tmp_path):
    rig = sshd.sudo_rig
    cfg = conf(tmp_path, f"Host myrig\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {rig.user}\n"
                         f"  IdentityFile {rig.key_file}\n  IdentitiesOnly yes\n")
    base = {"address": "myrig", "ssh_config": cfg, "known_hosts": str(rig.known_hosts)}
    i = load({"a": {"connection": base}, "b": {"connection": {**base, "user": "root"}}})
    for name, user in (("a", rig.user), ("b", "root")):
        h = i.select(name)[0]
        t = connect(h)
        try:
            assert isinstance(t, SSHTarget) and (t.address, t.port, t.user) == ("127.0.0.1", sshd.port, user)
            assert t.run("id -un").stdout == f"{user}\n"
        finally:
            t.close()


RELAY = """\
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
def up():
    while True:
        d = sys.stdin.buffer.raw.read(65536)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
with open(sys.argv[3], "a") as log:
    log.write(f"relay {sys.argv[1]} {sys.argv[2]}\\n")
while True:
    d = s.recv(65536)
    if not d:
        break
    sys.stdout.buffer.write(d)
    sys.stdout.buffer.flush()
"""


@pytest.mark.sshd
def test_proxycommand(sshd, tmp_path):
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    log = tmp_path / "relay.log"
    rig = sshd.root_rig
    cfg = conf(tmp_path, f"Host viaproxy\n  HostName 127.0.0.1\n  Port {sshd.port}\n"
                         f"  ProxyCommand {sys.executable} {relay} %h %p {log}\n")
    h = load({"p": rig.inventory_entry(connection={"address": "viaproxy", "ssh_config": cfg,
                                                    "port": sshd.port})}).hosts["p"]
    t = connect(h)
    try:
        assert t.run("echo through").stdout == "through\n"
    finally:
        t.close()
    assert log.read_text() == f"relay 127.0.0.1 {sshd.port}\n"


@pytest.mark.sshd
def test_a_dead_jump_host_is_one_line(sshd, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    cfg = conf(tmp_path, f"Host r\n  HostName 10.0.0.9\n  ProxyJump bastion\n"
                         f"Host bastion\n  HostName 127.0.0.1\n  Port {dead}\n")
    h = load({"r": sshd.root_rig.inventory_entry(connection={"address": "r", "ssh_config": cfg,
                                                            "port": 22})}).hosts["r"]
    with pytest.raises(ConnectError) as ei:
        connect(h)
    assert str(ei.value) == (f"jump host bastion: no SSH server answered on 127.0.0.1:{dead}: connection "
                             "refused (is the jump host up, is the port right?)")


# ------------------------------------------------------------------------------ Tier B: a bastion

def invoke(*args, timeout=600):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    r.seconds = time.monotonic() - t0
    return r


HIDDEN_GPUS = [{}, {}]  # two GPUs: the bastion has six, so facts tell the boxes apart


@pytest.fixture(scope="module")
def behind(rig_factory):
    """(bastion rig, hidden rig, hidden's private address)."""
    bastion = rig_factory()
    hidden = rig_factory(gpus=HIDDEN_GPUS)
    try:
        _, addr = private_link(bastion, hidden)
        ssh_only_on(hidden, addr)
        yield bastion, hidden, addr
    finally:
        unlink_private(bastion, hidden)
        rig_factory.stop(hidden)
        rig_factory.stop(bastion)


def _known_hosts(tmp_path, bastion, hidden, addr, with_bastion=True) -> Path:
    lines = []
    if with_bastion:
        lines += bastion.known_hosts.read_text().splitlines()
    lines += [f"{addr} {' '.join(ln.split()[1:])}" for ln in hidden.known_hosts.read_text().splitlines()
              if ln.strip()]
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join(lines) + "\n")
    return kh


@pytest.mark.rig
def test_facts_and_a_provision_step_through_proxyjump(behind, tmp_path):
    bastion, hidden, addr = behind
    # the hidden rig's SSH is not reachable from here: not on its veth, and nothing routes to addr
    assert not tcp_open(hidden.address, 22, timeout=1)
    assert not tcp_open(addr, 22, timeout=1)
    with pytest.raises(ConnectError):
        connect(load({"d": hidden.inventory_entry(connection={"address": addr, "connect_timeout": 3})}).hosts["d"])
    cfg = conf(tmp_path, f"Host bastion\n  HostName {bastion.address}\n  User root\n"
                         f"  IdentityFile {bastion.key_file}\n"
                         f"Host gpubox\n  HostName {addr}\n  User root\n  ProxyJump bastion\n"
                         f"  IdentityFile {hidden.key_file}\n")
    kh = _known_hosts(tmp_path, bastion, hidden, addr)
    entry = {"connection": {"address": "gpubox", "ssh_config": cfg, "known_hosts": str(kh),
                            "connect_timeout": 5},
             "gpus": {"count": 2, "power_limit": 280}, "llama_cpp": {"cuda": False},
             "system": {"kernel_headers": False, "packages": ["procps"]}}
    f = tmp_path / "hosts.yaml"
    f.write_text(yaml.safe_dump({"hosts": {"gpubox": entry}}, sort_keys=False))
    r = invoke("facts", "--host", "gpubox", "--inventory", str(f), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    gpus = [ln for ln in r.stdout.splitlines() if ln.startswith("gpu ")]
    assert len(gpus) == 2, r.stdout  # the hidden box (the bastion has six)
    # a provision step that changes the box, through the jump host
    r = invoke("provision", "--host", "gpubox", "--only", "facts,system,gpu", "--inventory", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert hidden.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout.split() \
        == ["280.00", "280.00"]
    assert "280.00" not in bastion.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout
    # the connections really came from the bastion's end of the private link
    log = hidden.sh("journalctl --no-pager -o cat -u ssh", check=False).stdout
    froms = set(re.findall(r"Accepted publickey for root from (\S+) port", log))
    assert froms == {addr.rsplit(".", 1)[0] + ".1"}, log[-2000:]


@pytest.mark.rig
def test_the_jump_hosts_key_is_checked(behind, tmp_path):
    bastion, hidden, addr = behind
    cfg = conf(tmp_path, f"Host bastion\n  HostName {bastion.address}\n  User root\n"
                         f"Host gpubox\n  HostName {addr}\n  ProxyJump bastion\n")
    kh = _known_hosts(tmp_path, bastion, hidden, addr, with_bastion=False)
    h = load({"gpubox": {"connection": {"address": "gpubox", "ssh_config": cfg, "known_hosts": str(kh),
                                        "key": str(hidden.key_file), "connect_timeout": 5}}}).hosts["gpubox"]
    with pytest.raises(ConnectError) as ei:
        connect(h)
    assert str(ei.value) == (f"jump host bastion: the host key of {bastion.address}:22 is unknown: not in "
                             f"{kh} (add it, or set connection.host_key_policy: accept-new)")
    # with the bastion's key known it works, and the rig's key is checked at its private address
    kh2 = _known_hosts(tmp_path, bastion, hidden, addr)
    t = connect(load({"gpubox": {"connection": {"address": "gpubox", "ssh_config": cfg,
                                                "known_hosts": str(kh2), "key": str(hidden.key_file),
                                                "connect_timeout": 5}}}).hosts["gpubox"])
    try:
        assert t.run("hostname").stdout.strip() == hidden.name
    finally:
        t.close()
