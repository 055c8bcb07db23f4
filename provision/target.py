"""One type over SSH (Fabric) and local execution. Steps talk to a Target, never to Fabric.

It hides the Fabric traps: `sudo` of a compound command runs only its first part, `sudo` inside
`cd()` fails, `put` can neither sudo nor write atomically, and Fabric silently trusts unknown host
keys. Here every privileged command is `sudo -n sh -c '<whole command>'`, files are uploaded to a
private temp file and moved into place with `install` + `mv` (atomic), and host keys are checked
against a known_hosts file (strict, or accept-new which records a key on first contact).
"""
from __future__ import annotations

import abc
import hashlib
import logging
import os
import shlex
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from . import keeper
from .channel import Held, LineWriter as _LineWriter, LocalHeld as _LocalHeld, SSHHeld as _SSHHeld
from .channel import run_command, stop_local as _stop_local
from .errors import CommandError, ConnectError, SudoPasswordError
from .inventory import Host
from .secrets import redact, register

if TYPE_CHECKING:
    from .pipe import Pipe

LineCallback = Callable[[str], None]

# paramiko logs failed handshakes (with a traceback) from its transport thread; with no handler
# configured, Python's last-resort handler would spray that onto stderr next to our one-line
# ConnectError. A library's logger gets a NullHandler; callers may still configure logging.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass
class Result:
    command: str
    exited: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exited == 0


def quote(s: str | os.PathLike) -> str:
    return shlex.quote(str(s))


def join(argv: Iterable[str | os.PathLike]) -> str:
    return " ".join(quote(a) for a in argv)


class Target(abc.ABC):
    """Base: everything is built on `_exec(shell_command)`."""

    name: str
    user: str
    commands_run: int
    _run_id: str | None = None

    @property
    def run_id(self) -> str:
        """Tags every command of this session on the box (provision/keeper.py): the run lock's
        keeper stops them all when the run ends, dies or loses its link."""
        if self._run_id is None:
            self._run_id = keeper.new_run_id()
        return self._run_id

    def __init__(self, host: Host):
        self.host = host
        self.name = host.name
        self.commands_run = 0
        self._sudo_password: str | None = None
        con = host.cfg["connection"]
        self._sudo_env = con.get("sudo_password_env")
        if self._sudo_env:
            pw = os.environ.get(self._sudo_env)
            if pw:
                register(pw)
                self._sudo_password = pw
        # printed by the sudo wrapper when sudo refuses the password (see _sudo_line)
        self._sudo_refused = f"llama-rig-sudo-refused-{uuid.uuid4().hex[:16]}"

    # -- to implement ------------------------------------------------------
    @abc.abstractmethod
    def _exec(self, command: str, *, timeout: float | None, stdin: str | None,
              on_stdout: LineCallback | None, on_stderr: LineCallback | None) -> Result:
        """Run one shell line on the box."""

    @abc.abstractmethod
    def is_root(self) -> bool:
        """Whether commands run as root without sudo."""

    def _upload(self, local_path: str, remote_tmp: str) -> None:
        """Copy a local file to a new private (0600) file on the box. Generic way: base64 over
        the command's stdin (subclasses use sftp / a local copy)."""
        import base64
        with open(local_path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode()
        r = self._exec(f"umask 077 && base64 -d > {quote(remote_tmp)}", timeout=None, stdin=data,
                       on_stdout=None, on_stderr=None)
        if not r.ok:
            raise CommandError(self.name, f"upload to {remote_tmp}", r.exited, r.stdout, r.stderr)

    @abc.abstractmethod
    def _start(self, command: str, stdin: str | None, timeout: float) -> "Held":
        """Start one shell line that keeps running until released (see hold())."""

    def close(self) -> None:
        pass

    def lost(self) -> str:
        """One line if the link to the box was declared dead mid-run (keeper.LinkWatch), else ""."""
        return ""

    _stop_reason: str = ""

    def stop_all(self, reason: str) -> None:
        """From now on every command raises StepError(reason) (the run lock was lost)."""
        self._stop_reason = reason

    def _check_stop(self) -> None:
        keeper.check()
        if self._stop_reason and not self.lost():  # a dead link is the better line (UNREACHABLE)
            from .errors import StepError
            raise StepError(self._stop_reason)

    # -- running -----------------------------------------------------------
    @property
    def needs_sudo(self) -> bool:
        flag = self.host.cfg["connection"].get("sudo")
        if flag is None:
            return not self.is_root()
        return bool(flag) and not self.is_root()

    def wrap(self, command: str, sudo: bool = False, cwd: str | None = None,
             env: dict[str, str] | None = None, user: str | None = None) -> str:
        """Build the exact shell line: cd, env and sudo applied to the WHOLE command."""
        return self._wrap(command, sudo, cwd, env, user)[0]

    def _wrap(self, command: str, sudo: bool = False, cwd: str | None = None,
              env: dict[str, str] | None = None, user: str | None = None) -> tuple[str, bool]:
        """(shell line, whether the sudo password goes first on its stdin -- see _sudo_line)."""
        inner = command
        if env:
            inner = f"export {' '.join(f'{k}={quote(v)}' for k, v in env.items())}; {command}"
        if cwd:
            inner = f"cd {quote(cwd)} && {{ {inner}\n}}"
        if user:
            # run as another (unprivileged) user: always through sudo (root can too)
            if self._sudo_password is not None and not self.is_root():
                return self._sudo_line(inner, f"-H -u {quote(user)} "), True
            return f"sudo -n -H -u {quote(user)} sh -c {quote(inner)}", False
        if sudo and self.needs_sudo:
            if self._sudo_password is not None:
                return self._sudo_line(inner), True
            return f"sudo -n sh -c {quote(inner)}", False
        if cwd or env:
            return f"sh -c {quote(inner)}", False
        return inner, False

    def _sudo_line(self, inner: str, flags: str = "") -> str:
        """`inner` as root for a login user whose sudo asks for a password.

        The password is the first line of the command's stdin, ALWAYS (whether sudo asks or
        not); this shell reads that line itself (`read`, a builtin: never in argv) and hands it
        to `sudo -S -v` through a pipe of its own, which checks it and records sudo's timestamp
        for this shell (with no terminal sudo keys it to the parent process). The command then
        runs with `sudo -n` -- no password -- and gets the rest of stdin untouched: a helper
        reading JSON on stdin never sees the password, nor does a NOPASSWD sudo that never asks.
        A refused password prints the marker line and exits 1 before anything runs. The
        password is in no argv (`printf` is a builtin too), no environment and no file; sudo
        is never exec'd (`r=$?`) so both sudo calls share this shell as their parent."""
        script = ('IFS= read -r p; '
                  'printf "%s\\n" "$p" | sudo -S -p "" -v || { echo "$2" >&2; exit 1; }; p=; '
                  f'sudo -n {flags}sh -c "$1"; r=$?; exit "$r"')
        return f"sh -c {quote(script)} llama-rig-sudo {quote(inner)} {self._sudo_refused}"

    def _check_sudo_result(self, res: "Result") -> None:
        """A password-sudo command whose sudo refused (see _sudo_line): one SudoPasswordError line."""
        if self._sudo_refused in res.stderr:
            said = [ln.strip() for ln in res.stderr.split(self._sudo_refused)[0].splitlines()
                    if ln.strip() and ln.strip() != "Sorry, try again."]
            why = said[-1] if said else f"exit {res.exited}"
            raise SudoPasswordError(f"{self.name}: sudo refused the password from ${self._sudo_env} "
                                    f"({redact(why)[:200]})")
        if res.exited == 1 and res.stderr.strip() == "sudo: a password is required":
            # the password was accepted a moment ago, but sudo asks again (timestamp_timeout=0)
            raise SudoPasswordError(f"{self.name}: sudo accepted the password from ${self._sudo_env} "
                                    "but asks again for the next command (sudoers "
                                    "timestamp_timeout=0?); llama-rig needs sudo's timestamp to "
                                    "last a few seconds, or NOPASSWD")

    def run(self, command: str | list[str], *, sudo: bool = False, check: bool = True,
            cwd: str | None = None, env: dict[str, str] | None = None, user: str | None = None,
            timeout: float | None = None, stdin: str | None = None,
            on_stdout: LineCallback | None = None, on_stderr: LineCallback | None = None) -> Result:
        if isinstance(command, list):
            command = join(command)
        line, password_first = self._wrap(command, sudo=sudo, cwd=cwd, env=env, user=user)
        if password_first:
            stdin = self._sudo_password + "\n" + (stdin or "")
        self.commands_run += 1
        res = self._exec(line, timeout=timeout, stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr)
        res.command = command
        if password_first:
            self._check_sudo_result(res)
        if check and not res.ok:
            raise CommandError(self.name, redact(command), res.exited, redact(res.stdout),
                               redact(res.stderr))
        return res

    def sudo(self, command: str | list[str], **kw) -> Result:
        return self.run(command, sudo=True, **kw)

    def hold(self, command: str, *, sudo: bool = False, timeout: float = 30) -> "Held":
        """Start a command that runs for as long as this session lasts: its stdin stays open
        until release() (or until this process or its SSH session dies -- the command sees EOF).
        Returns once its first line of stdout is there (`Held.first_line`; "" if it exited
        without one or said nothing within `timeout`). Used for the run lock (provision.runlock)."""
        line, password_first = self._wrap(command, sudo=sudo)
        stdin = self._sudo_password + "\n" if password_first else None
        self.commands_run += 1
        return self._start(line, stdin, timeout)

    def pipe(self, command: str, *, sudo: bool = False, timeout: float | None = None) -> "Pipe":
        """Start a command whose stdin and stdout are byte streams (provision/pipe.py): for
        copies streamed between boxes (provision/transfer/). `timeout` bounds each read/write."""
        line, password_first = self._wrap(command, sudo=sudo)
        self.commands_run += 1
        p = self._pipe(line, timeout)
        if password_first:
            p.write((self._sudo_password + "\n").encode())
        return p

    def check_sudo(self) -> None:
        """With connection.sudo_password_env: try the password once, before any step runs (a
        wrong one is one SudoPasswordError line, and sudo counts one failed attempt, not one per
        command)."""
        if self._sudo_password is not None and self.needs_sudo:
            self.run("true", sudo=True, check=False)

    def _pipe(self, line: str, timeout: float | None) -> "Pipe":
        raise NotImplementedError(f"{type(self).__name__} cannot stream")

    # -- files -------------------------------------------------------------
    def exists(self, path: str, sudo: bool = False) -> bool:
        return self.run(f"test -e {quote(path)}", sudo=sudo, check=False).ok

    def read_file(self, path: str, sudo: bool = False) -> str | None:
        """Text of a file, or None if it does not exist."""
        r = self.run(f"if [ -e {quote(path)} ]; then cat {quote(path)}; else exit 44; fi",
                     sudo=sudo, check=False)
        if r.exited == 44:
            return None
        if not r.ok:
            raise CommandError(self.name, f"cat {path}", r.exited, r.stdout, r.stderr)
        return r.stdout

    def sha256(self, path: str, sudo: bool = False) -> str | None:
        r = self.run(f"sha256sum {quote(path)}", sudo=sudo, check=False)
        return r.stdout.split()[0] if r.ok and r.stdout.strip() else None

    def write_file(self, path: str, content: str | bytes, *, mode: int = 0o644,
                   owner: str = "root", group: str | None = None, sudo: bool = True,
                   make_parents: bool = True) -> None:
        """Atomically install `content` at `path` with mode and owner.

        The bytes travel to a private temp file (0600, never on a command line), then
        `install -m MODE -o OWNER -g GROUP tmp path.tmp && mv -f path.tmp path` (rename = atomic).
        """
        data = content.encode() if isinstance(content, str) else content
        fd, local = tempfile.mkstemp(prefix="llama-rig-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            remote_tmp = self._remote_tmp_path()
            self._upload(local, remote_tmp)
        finally:
            try:
                os.unlink(local)
            except FileNotFoundError:
                pass
        group = group or owner
        d = os.path.dirname(path)
        staged = f"{path}.llama-rig-new"
        cmd = (
            (f"mkdir -p {quote(d)} && " if make_parents and d else "")
            + f"install -m {mode:04o} -o {quote(owner)} -g {quote(group)} {quote(remote_tmp)} {quote(staged)}"
            + f" && mv -f {quote(staged)} {quote(path)}"
        )
        try:
            self.run(cmd, sudo=sudo)
        finally:
            self.run(f"rm -f {quote(remote_tmp)}", check=False)

    def _remote_tmp_path(self) -> str:
        # unguessable: nobody else on the box can pre-create this name in the shared /tmp and
        # read (or swap) what is uploaded before it is installed as root
        return f"/tmp/llama-rig-{os.getpid()}-{uuid.uuid4().hex}"


class LocalTarget(Target):
    """`connection: local` — commands run on this machine through bash."""

    def __init__(self, host: Host):
        super().__init__(host)
        import getpass
        self.user = getpass.getuser()

    def is_root(self) -> bool:
        return os.geteuid() == 0

    def _exec(self, command, *, timeout, stdin, on_stdout, on_stderr) -> Result:
        self._check_stop()
        proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", start_new_session=True,
                                env={**os.environ, keeper.RUN_ENV: self.run_id})
        out_w, err_w = _LineWriter(on_stdout), _LineWriter(on_stderr)
        chunks: dict[str, list[str]] = {"out": [], "err": []}

        def pump(stream, key, writer):
            for line in iter(stream.readline, ""):
                chunks[key].append(line)
                writer.write(line)
            stream.close()

        threads = [threading.Thread(target=pump, args=(proc.stdout, "out", out_w), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, "err", err_w), daemon=True)]
        for t in threads:
            t.start()
        if stdin:
            def feed():
                try:
                    proc.stdin.write(stdin)
                    proc.stdin.close()
                except (BrokenPipeError, ValueError, OSError):
                    pass
            threading.Thread(target=feed, daemon=True).start()
        t0 = time.monotonic()
        rc: int | None = None
        while rc is None:
            try:
                rc = proc.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # Ctrl-C in the main thread (a caller outside run_hosts)
                _stop_local(proc)
                raise
            if rc is not None:
                break
            if keeper.must_stop():
                _stop_local(proc)
                raise keeper.Interrupted()
            if timeout and time.monotonic() - t0 >= timeout:
                # the whole process group: a child of `a; b` would otherwise keep the pipes open
                # and the reader threads (and this call) waiting for it
                _stop_local(proc, term=False)
                for t in threads:
                    t.join(5)
                chunks["err"].append(f"\ntimed out after {timeout}s\n")
                return Result(command, 124, "".join(chunks["out"]), "".join(chunks["err"]))
        for t in threads:
            t.join()
        return Result(command, rc, "".join(chunks["out"]), "".join(chunks["err"]))

    def _start(self, command: str, stdin: str | None, timeout: float) -> Held:
        self._check_stop()
        return _LocalHeld(command, stdin, timeout)

    def _pipe(self, line: str, timeout: float | None):
        from .pipe import LocalPipe
        return LocalPipe(line, timeout)

    def _upload(self, local_path: str, remote_tmp: str) -> None:
        import shutil
        # created 0600 (and never an existing file or link) before any byte is written
        fd = os.open(remote_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as dst, open(local_path, "rb") as src:
            shutil.copyfileobj(src, dst)


class SSHTarget(Target):
    """`connection: ssh` — Fabric over one persistent SSH session, host keys verified.

    Where the host is comes from provision.sshconf: the inventory over ~/.ssh/config (Host
    aliases, User, Port, IdentityFile, ProxyJump, ProxyCommand). Jump hosts are dialled here with
    paramiko -- not by Fabric, whose gateway connections trust any host key -- each checked
    against the same known_hosts with the same policy as the rig."""

    def __init__(self, host: Host):
        super().__init__(host)
        import fabric
        from . import sshconf

        con = host.cfg["connection"]
        self.ep = sshconf.resolve(host)
        self.user = self.ep.user
        self.address = self.ep.hostname
        self.port = self.ep.port
        self.timeout = self.ep.timeout
        self.known_hosts = os.path.expanduser(con["known_hosts"])
        self._policy = con["host_key_policy"]
        self._hops: list = []  # paramiko clients of the jump hosts while connected
        self.conn = fabric.Connection(
            self.address, user=self.user, port=self.port, connect_timeout=self.timeout,
            config=fabric.Config(overrides={"load_ssh_configs": False, "run": {"hide": True, "warn": True}}),
            connect_kwargs=sshconf.auth_kwargs(self.ep),
        )
        sshconf.trust(self.conn.client, self.known_hosts, self._policy)
        self._root: bool | None = None

    def connect(self) -> None:
        """Open the SSH session (through the jump hosts, if any); every failure is one
        ConnectError line a person can act on."""
        key = self.host.cfg["connection"]["key"]
        key = os.path.expanduser(key) if key else None
        if key and not os.path.isfile(key):
            raise ConnectError(f"connection.key: no such file: {key}")
        from . import sshconf
        self._close_hops()
        t0 = time.monotonic()
        try:
            sock = sshconf.open_route(self.ep, self.known_hosts, self._policy, self._hops)
            if sock is not None:
                self.conn.connect_kwargs["sock"] = sock
            else:
                self.conn.connect_kwargs.pop("sock", None)
            self.conn.open()
        except ConnectError:
            self._close_hops()
            raise
        except Exception as e:
            self._close_hops()
            err = sshconf.connect_error(e, self.ep, t0, self.known_hosts)
            if err is None:
                raise
            raise err from None

    def _close_hops(self) -> None:
        for client in reversed(self._hops):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a dead jump host may fail any way
                pass
        self._hops = []

    def is_root(self) -> bool:
        if self._root is None:
            self._root = self.user == "root" or self.run("id -u", check=False).stdout.strip() == "0"
        return self._root

    _watch: "keeper.LinkWatch | None" = None

    def _transport(self):
        """The live SSH transport (connecting first if needed), watched by a keeper.LinkWatch.
        Once the watch declared the link dead, every call raises ConnectError with its line."""
        if self._watch is not None and self._watch.lost:
            raise ConnectError(self._watch.lost)
        if not self.conn.is_connected:
            self.connect()
        tr = self.conn.client.get_transport()
        if self._watch is None or self._watch.transport is not tr:
            if self._watch is not None:
                self._watch.stop()
            where = f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"
            self._watch = keeper.LinkWatch(tr, f"{self.name} ({where})", keeper.link_deadline(self.timeout),
                                           self.conn.close)
        return tr

    def lost(self) -> str:
        return self._watch.lost if self._watch is not None else ""

    def _lost(self, e: BaseException) -> ConnectError:
        if self._watch is not None and self._watch.lost:
            return ConnectError(self._watch.lost)
        self.conn.close()
        if "Timeout opening channel" in str(e):  # the server did not answer within connect_timeout
            where = f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"
            return ConnectError(f"{self.name} ({where}): no answer on its SSH connection for "
                                f"{self.timeout:g}s (network down or host gone); the run on it was stopped")
        return ConnectError(f"{self.name} ({self.address}): connection lost: {e or type(e).__name__}")

    def _exec(self, command, *, timeout, stdin, on_stdout, on_stderr) -> Result:
        """One session channel per command (not invoke's Runner: it swallows Ctrl-C and feeds
        stdin at a crawl). The command is its own process group on the box (keeper.guard_line):
        Ctrl-C and a timeout stop the whole group there."""
        self._check_stop()
        tr = self._transport()
        try:
            chan = tr.open_session(timeout=self.timeout)
            chan.exec_command(keeper.guard_line(command, self.run_id))
        except Exception as e:  # noqa: BLE001 - paramiko.SSHException, EOFError, OSError
            raise self._lost(e) from None

        rc, out, err = run_command(chan, stdin=stdin, timeout=timeout, on_stdout=on_stdout,
                                   on_stderr=on_stderr, stop_group=self._stop_group,
                                   link_error=lambda closed: self._link_error(tr, closed))
        if rc is None:
            return Result(command, 124, out, err + f"\ntimed out after {timeout}s")
        return Result(command, rc, out, err)

    def _link_error(self, tr, closed: bool) -> ConnectError | None:
        """The error for a command: the link was declared dead (keeper.LinkWatch), or its channel
        closed early (`closed`) because the connection is gone; else None."""
        if self._watch is not None and self._watch.lost:
            return ConnectError(self._watch.lost)
        if closed and not tr.is_active():
            return self._lost(EOFError("the SSH connection closed"))
        return None

    def _stop_group(self, pgid: int | None, whole_run: bool = False) -> None:
        """Stop a command's process group on the box (TERM, then KILL), over a new channel; after
        Ctrl-C (`whole_run`) every process group this session started there."""
        if pgid is None and not whole_run:
            return
        try:
            with keeper.allowed():
                self.run(keeper.kill_line(pgid, self.run_id if whole_run else None), sudo=True,
                         check=False, timeout=keeper.KILL_WAIT_S + 2)
        except Exception:  # noqa: BLE001 - the link is gone: the run lock's keeper stops it
            pass

    def _start(self, command: str, stdin: str | None, timeout: float) -> Held:
        self._check_stop()
        tr = self._transport()
        try:
            return _SSHHeld(tr, command, stdin, timeout)
        except Exception as e:  # noqa: BLE001 - paramiko.SSHException, EOFError, OSError
            raise self._lost(e) from None

    def _pipe(self, line: str, timeout: float | None):
        from .pipe import PipeError, SSHPipe
        self._check_stop()
        tr = self._transport()
        try:
            return SSHPipe(tr, f"exec env {keeper.RUN_ENV}={self.run_id} sh -c {quote(line)}", timeout)
        except PipeError as e:
            raise ConnectError(f"{self.name} ({self.address}): connection lost: {e}") from None

    def _upload(self, local_path: str, remote_tmp: str) -> None:
        self._check_stop()
        self._transport()
        # not conn.put(): it writes the bytes under the server's umask (0644 in /tmp) and only
        # then chmods -- a window in which anyone on the box can read a secret. Here the empty
        # file is made 0600 before the first byte is written.
        try:
            sftp = self.conn.sftp()
            with sftp.open(remote_tmp, "wb") as fh:
                fh.chmod(0o600)
                fh.set_pipelined(True)
                with open(local_path, "rb") as src:
                    while True:
                        self._check_stop()
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        fh.write(chunk)
        except (KeyboardInterrupt, ConnectError):
            raise
        except Exception as e:  # noqa: BLE001 - paramiko.SSHException, EOFError, OSError
            if self._watch is not None and self._watch.lost or not self.conn.is_connected:
                raise self._lost(e) from None
            raise

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        self.conn.close()
        self._close_hops()


def connect(host: Host) -> Target:
    """A connected Target for `host` (raises ConnectError with one clear line)."""
    t: Target = LocalTarget(host) if host.is_local else SSHTarget(host)
    try:
        if isinstance(t, SSHTarget):
            t.connect()
        t.check_sudo()
    except BaseException:
        t.close()
        raise
    return t


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
