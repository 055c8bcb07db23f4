"""Target over real SSH (Tier A sshd on 127.0.0.1, as root and as a sudo user) and LocalTarget."""
from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.errors import CommandError, ConnectError
from provision.target import LocalTarget, SSHTarget, connect

pytestmark = pytest.mark.sshd


def host_for(rig, **conn):
    entry = rig.inventory_entry(connection=conn) if conn else rig.inventory_entry()
    return inv.from_data({"hosts": {"r": entry}}).hosts["r"]


@pytest.fixture
def root_t(sshd):
    t = connect(host_for(sshd.root_rig))
    yield t
    t.close()


@pytest.fixture
def sudo_t(sshd):
    t = connect(host_for(sshd.sudo_rig))
    yield t
    t.close()


def test_run_as_root(root_t, sshd):
    assert isinstance(root_t, SSHTarget)
    r = root_t.run("echo hello; echo oops >&2; exit 3", check=False)
    assert (r.exited, r.stdout, r.stderr, r.ok) == (3, "hello\n", "oops\n", False)
    assert root_t.is_root() and not root_t.needs_sudo
    assert root_t.run("id -un").stdout == "root\n"
    assert root_t.sudo("id -u && id -u").stdout == "0\n0\n"  # sudo is a no-op as root


def test_sudo_user_compound_cwd_env(sudo_t, sshd):
    uid = pwd.getpwnam(sshd.sudo_rig.user).pw_uid
    assert sudo_t.run("id -u").stdout == f"{uid}\n"
    assert not sudo_t.is_root() and sudo_t.needs_sudo
    # the WHOLE compound command runs as root (Fabric's c.sudo("a && b") would not)
    assert sudo_t.sudo("id -u && id -u").stdout == "0\n0\n"
    assert sudo_t.sudo("id -u; id -u | cat").stdout == "0\n0\n"
    # sudo + cwd (Fabric's cd() + sudo fails with "sudo: cd: command not found")
    d = sshd.root / "work dir"
    d.mkdir()
    assert sudo_t.run("pwd && id -u", sudo=True, cwd=str(d)).stdout == f"{d}\n0\n"
    assert sudo_t.run("echo \"$A:$B\"", sudo=True, env={"A": "x y", "B": "$HOME"}).stdout == "x y:$HOME\n"
    # run as another user
    assert root_t_user(sudo_t) == "nobody\n"


def root_t_user(t):
    return t.run("id -un", user="nobody").stdout


def test_stdin_streaming_timeout_and_errors(sudo_t):
    assert sudo_t.run("cat", stdin="secret\nline2\n").stdout == "secret\nline2\n"
    lines = []
    sudo_t.run("for i in 1 2 3; do echo line$i; done", on_stdout=lines.append)
    assert lines == ["line1", "line2", "line3"]
    t0 = time.monotonic()
    r = sudo_t.run("sleep 10", check=False, timeout=1)
    assert r.exited == 124 and time.monotonic() - t0 < 8
    with pytest.raises(CommandError) as ei:
        sudo_t.run("echo first >&2; echo 'no such thing' >&2; exit 7")
    assert str(ei.value) == ("r: command failed (exit 7): echo first >&2; echo 'no such thing' >&2; "
                             "exit 7: no such thing")
    # a sudo that fails (command not found) is a CommandError too, not a hang
    with pytest.raises(CommandError):
        sudo_t.sudo("definitely-not-a-command-xyz")


def test_write_file_atomic_mode_owner_as_sudo_user(sudo_t, sshd):
    path = sshd.root / "etc" / "llama" / "server.env"
    sudo_t.write_file(str(path), "A=1\nTOKEN=abc\n", mode=0o640, owner="root")
    st = path.stat()
    assert path.read_text() == "A=1\nTOKEN=abc\n"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o640)
    # the login user cannot read it back without sudo, but can with it
    with pytest.raises(CommandError):
        sudo_t.read_file(str(path))
    assert sudo_t.read_file(str(path), sudo=True) == "A=1\nTOKEN=abc\n"
    # replace: same inode? no -- a new file renamed over the old one (atomic)
    ino = st.st_ino
    sudo_t.write_file(str(path), "A=2\n", mode=0o600, owner=sshd.sudo_rig.user)
    st2 = path.stat()
    assert path.read_text() == "A=2\n" and st2.st_ino != ino
    assert (st2.st_uid, stat.S_IMODE(st2.st_mode)) == (pwd.getpwnam(sshd.sudo_rig.user).pw_uid, 0o600)
    # nothing left behind: no staged file next to it, no upload in /tmp
    assert sorted(p.name for p in path.parent.iterdir()) == ["server.env"]
    assert not list(Path("/tmp").glob(f"llama-rig-{os.getpid()}-*"))  # this process's uploads
    # binary content round-trips
    blob = os.urandom(3 * 1024 * 1024 + 17)  # several upload chunks
    sudo_t.write_file(str(path.with_name("blob")), blob, mode=0o644)
    assert path.with_name("blob").read_bytes() == blob


def test_read_exists_sha256(sudo_t, root_t, sshd):
    f = sshd.root / "data.txt"
    f.write_text("x" * 1000 + "\n")
    for t in (sudo_t, root_t):
        assert t.read_file(str(sshd.root / "missing")) is None
        assert t.read_file(str(sshd.root / "missing"), sudo=True) is None
        assert t.read_file(str(f)) == "x" * 1000 + "\n"
        assert t.exists(str(f)) and not t.exists(str(sshd.root / "missing"))
        assert t.sha256(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
        assert t.sha256(str(sshd.root / "missing")) is None
    secret = sshd.root / "root-only"
    secret.write_text("s\n")
    secret.chmod(0o600)
    assert not sudo_t.exists(str(sshd.root / "rootdir" / "x"))
    assert sudo_t.sha256(str(secret)) is None and sudo_t.sha256(str(secret), sudo=True) == hashlib.sha256(b"s\n").hexdigest()


# ----------------------------------------------------------------------------- host keys

def test_strict_policy_rejects_unknown_key(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    h = host_for(sshd.root_rig, known_hosts=str(empty), host_key_policy="strict")
    with pytest.raises(ConnectError) as ei:
        connect(h)
    msg = str(ei.value)
    assert msg == (f"the host key of 127.0.0.1:{sshd.port} is unknown: not in {empty} "
                   "(add it, or set connection.host_key_policy: accept-new)")
    assert empty.read_text() == ""  # nothing recorded
    # a missing known_hosts file is the same (not a crash)
    h = host_for(sshd.root_rig, known_hosts=str(tmp_path / "nope"), host_key_policy="strict")
    with pytest.raises(ConnectError) as ei:
        connect(h)
    assert "is unknown: not in" in str(ei.value) and not (tmp_path / "nope").exists()


def test_accept_new_records_key_then_rejects_a_changed_one(sshd, tmp_path):
    kh = tmp_path / "sub" / "known_hosts"
    h = host_for(sshd.root_rig, known_hosts=str(kh), host_key_policy="accept-new")
    t = connect(h)
    assert t.run("echo ok").stdout == "ok\n"
    t.close()
    server_pub = (sshd.dir / "host_key.pub").read_text().split()[:2]
    assert kh.read_text() == f"[127.0.0.1]:{sshd.port} {server_pub[0]} {server_pub[1]}\n"
    # second contact: known, nothing appended; strict works now too
    t = connect(h)
    t.close()
    t = connect(host_for(sshd.root_rig, known_hosts=str(kh), host_key_policy="strict"))
    t.close()
    assert len(kh.read_text().splitlines()) == 1
    # the server's key changes (or a man in the middle): rejected, even with accept-new
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
                   check=True)
    other = (tmp_path / "other.pub").read_text().split()[:2]
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    for policy in ("accept-new", "strict"):
        with pytest.raises(ConnectError) as ei:
            connect(host_for(sshd.root_rig, known_hosts=str(kh), host_key_policy=policy))
        assert str(ei.value) == (
            f"the host key of 127.0.0.1:{sshd.port} changed: it does not match {kh} — refusing to "
            "connect (possible man-in-the-middle; if the rig was reinstalled, remove the old key: "
            f"ssh-keygen -f {kh} -R '[127.0.0.1]:{sshd.port}')")
    assert kh.read_text() == f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n"


def test_wrong_client_key_is_one_line(sshd, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    with pytest.raises(ConnectError) as ei:
        connect(host_for(sshd.root_rig, key=str(tmp_path / "k")))
    assert str(ei.value) == (f"root@127.0.0.1:{sshd.port} refused the login with key {tmp_path / 'k'} "
                             "(is the public key in root's ~/.ssh/authorized_keys?)")


def test_connection_refused_closed_port(sshd):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    h = host_for(sshd.root_rig, port=port, connect_timeout=3)
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as ei:
        connect(h)
    assert time.monotonic() - t0 < 3 + 1
    assert str(ei.value) == (f"no SSH server answered on 127.0.0.1:{port}: connection refused "
                             "(is the rig up, is the port right?)")


# ----------------------------------------------------------------------------- LocalTarget

def test_local_target_basics(tmp_path):
    t = LocalTarget(inv.from_data({"hosts": {"me": {"connection": {"type": "local"}}}}).hosts["me"])
    assert t.run("echo hi; exit 2", check=False).exited == 2
    assert t.sudo("id -u && id -u").stdout == f"{os.geteuid()}\n{os.geteuid()}\n"
    assert t.run("pwd", sudo=True, cwd=str(tmp_path)).stdout == f"{tmp_path}\n"
    assert t.run("cat", stdin="abc").stdout == "abc"
    f = tmp_path / "a" / "b.conf"
    t.write_file(str(f), "content\n", mode=0o640, owner="root")
    assert f.read_text() == "content\n" and stat.S_IMODE(f.stat().st_mode) == 0o640
    assert f.stat().st_uid == 0
    assert t.read_file(str(tmp_path / "missing")) is None
    assert t.read_file(str(f)) == "content\n"
    assert t.exists(str(f)) and not t.exists(str(tmp_path / "missing"))
    assert t.sha256(str(f)) == hashlib.sha256(b"content\n").hexdigest()
    assert sorted(p.name for p in f.parent.iterdir()) == ["b.conf"]
    r = t.run("sleep 5", check=False, timeout=0.5)
    assert r.exited == 124
    # a compound command: its children die with it, the call returns at the timeout
    t0 = time.monotonic()
    r = t.run("echo started; sleep 5; echo never", check=False, timeout=0.5)
    assert (r.exited, r.stdout) == (124, "started\n") and time.monotonic() - t0 < 3
    assert r.stderr.endswith("timed out after 0.5s\n")
    with pytest.raises(CommandError):
        t.run("exit 9")


def test_not_an_ssh_server_is_one_line_no_traceback(capfd):
    """A port that accepts and hangs up (a firewall, not sshd): one line, nothing on stderr."""
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    h = inv.from_data({"hosts": {"r": {"connection": {"address": "127.0.0.1", "port": port,
                                                      "connect_timeout": 3}}}}).hosts["r"]
    try:
        with pytest.raises(ConnectError) as ei:
            connect(h)
    finally:
        srv.close()
    assert str(ei.value) == (f"no SSH server answered on 127.0.0.1:{port}: something there closed the "
                             "connection without speaking SSH (is the port right?)")
    time.sleep(0.2)  # the transport thread logs as it dies
    assert capfd.readouterr().err == ""


def test_missing_or_bad_key_file_says_so(sshd, tmp_path):
    with pytest.raises(ConnectError) as ei:
        connect(host_for(sshd.root_rig, key=str(tmp_path / "nope")))
    assert str(ei.value) == f"connection.key: no such file: {tmp_path / 'nope'}"
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    with pytest.raises(ConnectError) as ei:
        connect(host_for(sshd.root_rig, key=str(bad)))
    assert str(ei.value) == f"connection.key: cannot use {bad}: not a valid OPENSSH private key file"


def test_generic_upload_through_stdin(tmp_path):
    """A Target that only knows how to run commands still installs files (base64 over stdin)."""
    host = inv.from_data({"hosts": {"me": {"connection": {"type": "local"}}}}).hosts["me"]

    class ExecOnly(LocalTarget):
        _upload = LocalTarget.__mro__[1]._upload  # the base class's generic upload

    t = ExecOnly(host)
    data = bytes(range(256)) * 3 + b"\n\x00end"
    dest = tmp_path / "sub" / "blob.bin"
    t.write_file(str(dest), data, mode=0o640)
    assert dest.read_bytes() == data
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert not list(Path("/tmp").glob(f"llama-rig-{os.getpid()}-*"))  # the private temp file is gone


# ----------------------------------------------------------------------------- sudo password set

def test_a_password_for_a_sudo_that_does_not_ask_never_reaches_the_command(sshd, monkeypatch):
    """The bug of issue 14: with sudo_password_env set and a NOPASSWD sudo (or root), the password
    used to be written to stdin anyway and became the first line a helper read as JSON."""
    from provision.model.store import parse_probe, probe_command, probe_input
    monkeypatch.setenv("LLAMA_RIG_TEST_PW", "pw-that-must-not-show")
    payload = '{"a": 1}\nline 2\n'
    for rig in (sshd.sudo_rig, sshd.root_rig):
        h = host_for(rig, sudo_password_env="LLAMA_RIG_TEST_PW")
        t = connect(h)
        try:
            assert t.sudo("cat", stdin=payload).stdout == payload
            assert t.sudo("id -u && id -u").stdout == "0\n0\n"
            view = parse_probe(t.sudo(probe_command(), stdin=probe_input(h.cfg, None, None)).stdout)
            assert view.current is None
            assert t.run("cat", user="nobody", stdin=payload).stdout == payload
            with t.pipe("cat", sudo=True, timeout=10) as p:
                p.write(b"bytes\n")
                p.close_stdin()
                assert p.readline() == b"bytes\n" and p.readline() == b""
        finally:
            t.close()


def test_the_ssh_socket_has_nagle_off_and_acks_at_once(root_t):
    """provision/sshconf.nodelay_transport: the rig's TCP socket has TCP_NODELAY (and, on Linux,
    re-arms TCP_QUICKACK after each read) -- without them each command waited ~40 ms for a
    delayed ACK (benchmarks/noop/). A ProxyCommand or a jump host's channel passes through as is."""
    from provision import sshconf

    root_t.run("true")
    sock = root_t.conn.client.get_transport().sock
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    if hasattr(socket, "TCP_QUICKACK"):
        assert isinstance(sock, sshconf._QuickAckSocket)
    assert root_t.run("echo still fine").stdout == "still fine\n"
    assert sshconf.auth_kwargs(sshconf.resolve(root_t.host))["transport_factory"] is sshconf.nodelay_transport

    class NotASocket:  # a ProxyCommand, a paramiko Channel through a jump host
        def settimeout(self, t):
            pass
    odd = NotASocket()
    assert sshconf.nodelay_transport(odd).sock is odd
