"""Byte pipes to a command on a box: what `Target.pipe()` returns.

`Target.run()` collects a command's output as text and sends its stdin in one piece; a copy between
two rigs needs more: bytes streamed into one command's stdin while they come out of another's
stdout, without staging them anywhere (provision/transfer/). A `Pipe` is that running command:

    p = target.pipe("python3 helper.py recv", sudo=True)
    p.write(b"...")        # its stdin
    p.read(1 << 20)        # its stdout (b"" at EOF)
    p.close_stdin()        # EOF for it
    p.wait()               # exit status; p.stderr_text() afterwards
    p.close()              # stop it (always safe; what a `finally` calls)

Over SSH it is one session channel of the Target's connection (with a larger window than paramiko's
default, for throughput); locally a subprocess in its own process group. `timeout` bounds every
read/write: a peer that says nothing for that long raises `PipeTimeout` (a silent network drop
must not hang the copy).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time


class PipeError(OSError):
    """The command's stream broke (connection lost, process gone)."""


class PipeTimeout(PipeError):
    """Nothing moved on the stream for `timeout` seconds."""


class Pipe:
    """A command running on a box with its stdin/stdout as byte streams."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def readline(self, limit: int = 1 << 20) -> bytes:
        """One line of stdout (with its newline; b"" at EOF)."""
        out = bytearray()
        while len(out) < limit:
            b = self.read(1)
            if not b:
                break
            out += b
            if b == b"\n":
                break
        return bytes(out)

    def close_stdin(self) -> None:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int:
        raise NotImplementedError

    def stderr_text(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Pipe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalPipe(Pipe):
    def __init__(self, line: str, timeout: float | None = None):
        self.timeout = timeout
        self.proc = subprocess.Popen(["bash", "-c", line], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, bufsize=0)
        self._err: list[bytes] = []
        self._err_thread = threading.Thread(target=self._drain_err, daemon=True)
        self._err_thread.start()

    def _drain_err(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(65536), b""):
            self._err.append(chunk)

    def write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ValueError) as e:
            raise PipeError(f"the command's stdin is closed: {e}") from None

    def read(self, n: int) -> bytes:
        # a local process that stalls is not a network drop: no timeout here (Ctrl-C still works)
        return self.proc.stdout.read(n) or b""

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PipeTimeout(f"the command did not exit within {timeout}s") from None
        self._err_thread.join(5)
        return rc

    def stderr_text(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def close(self) -> None:
        self.close_stdin()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        for s in (self.proc.stdout, self.proc.stderr):
            try:
                s.close()
            except OSError:
                pass


# paramiko's defaults (2 MiB window, 32 KiB packets) cap one channel far below a LAN's speed
WINDOW = 64 << 20
MAX_PACKET = 32768


class SSHPipe(Pipe):
    def __init__(self, transport, line: str, timeout: float | None = None):
        self.timeout = timeout
        try:
            self.chan = transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                               timeout=timeout or 30)
            self.chan.settimeout(timeout)
            self.chan.exec_command(line)
        except (socket.timeout, OSError, EOFError) as e:
            raise PipeError(f"cannot start the command: {e or type(e).__name__}") from None
        except Exception as e:  # paramiko.SSHException
            raise PipeError(f"cannot start the command: {e or type(e).__name__}") from None
        self._err: list[bytes] = []
        self._err_thread = threading.Thread(target=self._drain_err, daemon=True)
        self._err_thread.start()

    def _drain_err(self) -> None:
        while True:
            try:
                b = self.chan.recv_stderr(65536)
            except socket.timeout:
                if self.chan.closed or self.chan.exit_status_ready():
                    return
                continue
            except Exception:  # noqa: BLE001 - the channel went away
                return
            if not b:
                return
            self._err.append(b)

    def write(self, data: bytes) -> None:
        try:
            self.chan.sendall(data)
        except socket.timeout:
            raise PipeTimeout(f"nothing could be sent for {self.timeout:g}s") from None
        except Exception as e:  # noqa: BLE001 - socket.error, paramiko.SSHException, EOFError
            raise PipeError(f"sending failed: {e or type(e).__name__}") from None

    def read(self, n: int) -> bytes:
        try:
            return self.chan.recv(n)
        except socket.timeout:
            raise PipeTimeout(f"nothing arrived for {self.timeout:g}s") from None
        except Exception as e:  # noqa: BLE001
            raise PipeError(f"receiving failed: {e or type(e).__name__}") from None

    def close_stdin(self) -> None:
        try:
            self.chan.shutdown_write()
        except Exception:  # noqa: BLE001
            pass

    def wait(self, timeout: float | None = None) -> int:
        t0 = time.monotonic()
        while not self.chan.exit_status_ready():
            if self.chan.closed:
                return -1
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise PipeTimeout(f"the command did not exit within {timeout}s")
            time.sleep(0.02)
        self._err_thread.join(5)
        return self.chan.recv_exit_status()

    def stderr_text(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def close(self) -> None:
        # closing the channel ends the remote command's stdin and stdout: the helpers exit on
        # EOF / EPIPE (they never outlive the copy)
        try:
            self.chan.close()
        except Exception:  # noqa: BLE001
            pass
