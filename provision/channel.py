"""One command on a box, at the channel level: what provision/target.py builds on.

* `run_command()` -- a command on one SSH session channel: stdin written at full speed (a thread,
  never through invoke's Runner, which feeds a non-tty stream at ~100 bytes/s and swallows
  Ctrl-C), stdout/stderr collected and passed on line by line, the command's process group id
  read from its first stderr line (keeper.guard_line) and used to stop the group on Ctrl-C
  (keeper.must_stop), a timeout, or a KeyboardInterrupt in the calling thread.
* `Held` -- a command that runs until released (the run lock's keeper, provision/runlock.py):
  heartbeats on its stdin, EOF to end it.
* `stop_local()` -- the local counterpart of stopping a group.
"""
from __future__ import annotations

import abc
import codecs
import io
import os
import select
import signal
import socket
import subprocess
import threading
import time
from typing import Callable

from . import keeper

LineCallback = Callable[[str], None]


class LineWriter(io.TextIOBase):
    """A file-like that collects text and calls back once per complete line."""

    def __init__(self, cb: LineCallback | None):
        self.cb = cb
        self.buf = ""

    def write(self, s: str) -> int:
        if self.cb is None:
            return len(s)
        self.buf += s
        while True:
            cut = min((i for i in (self.buf.find("\n"), self.buf.find("\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line, self.buf = self.buf[:cut], self.buf[cut + 1:]
            if line.strip():
                self.cb(line)
        return len(s)

    def flush(self) -> None:
        pass


class Held(abc.ABC):
    """A command started by Target.hold(): running until release()."""

    first_line: str = ""

    @abc.abstractmethod
    def release(self) -> None:
        """Close its stdin (it sees EOF and ends) and wait a little for it."""

    def beat(self) -> bool:
        """Send it one line (a heartbeat: provision/runlock.py); False once it cannot be sent."""
        return False

    def alive(self) -> bool:
        """Whether it is still running."""
        return True


class LocalHeld(Held):
    def __init__(self, line: str, stdin: str | None, timeout: float):
        self.proc = subprocess.Popen(["bash", "-c", line], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if stdin:
            self.proc.stdin.write(stdin)
            self.proc.stdin.flush()
        got: list[str] = []
        t = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        self.first_line = got[0].strip() if got else ""

    def beat(self) -> bool:
        try:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def release(self) -> None:
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class SSHHeld(Held):
    def __init__(self, transport, line: str, stdin: str | None, timeout: float):
        self.chan = transport.open_session(timeout=timeout)
        self.chan.settimeout(timeout)
        self.chan.set_combine_stderr(True)  # an error (sudo, a missing tool) is the first line
        self.chan.exec_command(line)
        if stdin:
            self.chan.sendall(stdin.encode())
        buf = b""
        try:
            while not buf.endswith(b"\n"):
                b = self.chan.recv(1)
                if not b:
                    break
                buf += b
        except socket.timeout:
            pass
        self.first_line = buf.decode(errors="replace").strip()
        self._mu = threading.Lock()

    def beat(self) -> bool:
        with self._mu:
            try:
                if self.chan.closed or self.chan.exit_status_ready():
                    return False
                self.chan.sendall(b"\n")
                return True
            except Exception:  # noqa: BLE001 - socket.timeout, a closed channel, a dead transport
                return False

    def alive(self) -> bool:
        return not (self.chan.closed or self.chan.exit_status_ready())

    def release(self) -> None:
        try:
            with self._mu:
                self.chan.shutdown_write()
            ended = getattr(self.chan, "status_event", None)  # set on exit status and on close
            if ended is not None:
                ended.wait(5)
            else:
                t0 = time.monotonic()
                while (not self.chan.exit_status_ready() and not self.chan.closed
                       and time.monotonic() - t0 < 5):
                    time.sleep(0.02)
        except Exception:  # noqa: BLE001 - a dead session: the keeper on the box sees EOF or its lease end
            pass
        finally:
            self.chan.close()


def stop_local(proc: subprocess.Popen, term: bool = True) -> None:
    """TERM the command's process group (it has its own session), KILL what is left after
    keeper.KILL_WAIT_S."""
    try:
        if term:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(keeper.KILL_WAIT_S)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass



def run_command(chan, *, stdin: str | None, timeout: float | None, on_stdout: LineCallback | None,
                on_stderr: LineCallback | None, stop_group: Callable[[int | None, bool], None],
                link_error: Callable[[bool], BaseException | None]) -> tuple[int | None, str, str]:
    """Run the command already exec'd on `chan` to its end: (exit status, stdout, stderr without
    the group id line); exit status None when `timeout` ran out (its group was stopped). Ctrl-C
    stops the group (and the run's other groups) and raises keeper.Interrupted. What
    link_error(channel_closed_early) returns, if anything, is raised (the link is gone: the
    empty output of a killed session must never read as "nothing there")."""
    def feed() -> None:
        try:
            if stdin:
                chan.sendall(stdin.encode())
            chan.shutdown_write()
        except Exception:  # noqa: BLE001 - the command ended before reading it all
            pass
    if stdin:
        threading.Thread(target=feed, daemon=True).start()
    else:
        feed()
    out, err = bytearray(), bytearray()
    dec_out, dec_err = codecs.getincrementaldecoder("utf-8")("replace"), codecs.getincrementaldecoder("utf-8")("replace")
    out_w, err_w = LineWriter(on_stdout), LineWriter(on_stderr)
    pgid: int | None = None
    head: bytes | None = b""  # stderr until the marker line is through (None after)
    mark = keeper.PGID_MARK.encode()
    t0 = time.monotonic()
    fd = chan.fileno()
    try:
        while True:
            while chan.recv_ready():
                b = chan.recv(1 << 16)
                out += b
                if on_stdout:
                    out_w.write(dec_out.decode(b))
            while chan.recv_stderr_ready():
                b = chan.recv_stderr(1 << 16)
                if head is not None:
                    head += b
                    if b"\n" not in head and len(head) < 200 and mark.startswith(head[:len(mark)]):
                        continue
                    first, nl, rest = head.partition(b"\n")
                    if first.startswith(mark) and nl:
                        try:
                            pgid = int(first[len(mark):].strip())
                        except ValueError:
                            pass
                        b = rest
                    else:
                        b = head
                    head = None
                err += b
                if on_stderr and b:
                    err_w.write(dec_err.decode(b))
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                e = link_error(True)
                if e is not None:
                    raise e
                break
            if keeper.must_stop():
                stop_group(pgid, whole_run=True)
                raise keeper.Interrupted()
            if timeout and time.monotonic() - t0 >= timeout:
                stop_group(pgid)
                tail = bytes(head or b"") + err
                return None, out.decode(errors="replace"), tail.decode(errors="replace")
            select.select([fd], [], [], 0.1)
    except KeyboardInterrupt:  # Ctrl-C in the main thread (a task outside keeper.run_hosts)
        stop_group(pgid, whole_run=True)
        raise
    finally:
        chan.close()
    if head:
        err[:0] = head
    rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
    e = link_error(False)
    if e is not None:
        raise e
    return rc, out.decode(errors="replace"), err.decode(errors="replace")

