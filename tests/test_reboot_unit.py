"""RebootHost and `provision --reboot` in the engine, with an in-memory box that reboots:
reported without --reboot (exit 1, REBOOT, later steps skipped), planned in --check, done with
--reboot (wait for the new system, re-read, re-run the step, go on), at most once, bounded."""
from __future__ import annotations

import pytest

from provision import engine
from provision import inventory as inv
from provision.engine import RebootHost, RunOptions, Step, run
from provision.errors import ConnectError, ExitStatus
from provision.target import Result
from tests.test_engine import FakeTarget, console, recap_row


class Box:
    """What survives a reboot (disk) and what does not (/run, the loaded driver)."""

    def __init__(self, loads_after_reboot=True, comes_back=True):
        self.files: dict = {}
        self.loaded = False
        self.marker = False
        self.boots = 0
        self.loads_after_reboot = loads_after_reboot
        self.comes_back = comes_back
        self.sessions: list["BoxTarget"] = []


class BoxTarget(FakeTarget):
    def __init__(self, host, box: Box):
        super().__init__(host, box.files)
        self.box = box

    def _exec(self, command, *, timeout, stdin, on_stdout, on_stderr) -> Result:
        self.log.append(command)
        b = self.box
        if command.startswith("echo llama-rig > /run/llama-rig.reboot"):
            b.marker = True
        elif command.startswith("systemctl reboot"):
            b.boots += 1
            b.marker = False
            b.loaded = b.loads_after_reboot
        elif command.startswith("test -e /run/llama-rig.reboot"):
            return Result(command, 0 if b.marker else 1, "", "")
        return Result(command, 0, "", "")


class DriverStep(Step):
    name = "driver"

    def plan(self, ctx):
        box = ctx.target.box
        if box.loaded:
            return []
        return [RebootHost("reboot to load the driver", after="the driver still does not load")]


class AfterStep(Step):
    name = "after"

    def __init__(self):
        self.ran = 0

    def plan(self, ctx):
        self.ran += 1
        return []


def ssh_host(**system):
    return inv.from_data({"hosts": {"box": {"connection": {"type": "ssh", "address": "10.9.9.9"},
                                            "system": {"reboot_timeout": 30, **system}}}}).hosts["box"]


def go(box: Box, opts: RunOptions, h=None):
    h = h or ssh_host()
    con, out, err = console()
    after = AfterStep()

    def factory(_h):
        if box.boots and not box.comes_back:
            raise ConnectError("box (10.9.9.9): connection refused")
        t = BoxTarget(h, box)
        box.sessions.append(t)
        return t
    status, reports = run([h], [DriverStep(), after], con, opts, factory)
    return status, reports[0], after, out.getvalue() + err.getvalue()


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(engine, "REBOOT_POLL_S", 0.01)


def test_reported_not_done_without_reboot():
    box = Box()
    status, rep, after, out = go(box, RunOptions())
    assert status == ExitStatus.FAILED and box.boots == 0 and after.ran == 0
    assert rep.reboot_pending == "reboot to load the driver"
    assert "driver: needs a reboot to go on: reboot to load the driver — not rebooting; run again " \
           "with --reboot (or reboot box yourself and run again)" in out
    assert recap_row(out)["result"] == "REBOOT"
    assert "waiting for a reboot: box" in out
    assert [r.message for r in rep.results if r.step == "after"] == ["after the reboot (reboot to load the driver)"]


def test_check_shows_it_and_stops_there():
    box = Box()
    status, rep, after, out = go(box, RunOptions(check=True, reboot=True))
    assert status == ExitStatus.OK and box.boots == 0 and after.ran == 0
    assert "driver: would change: reboot to load the driver" in out


def test_reboot_waits_rereads_reruns_and_goes_on():
    box = Box()
    status, rep, after, out = go(box, RunOptions(reboot=True))
    assert status == ExitStatus.OK, out
    assert box.boots == 1 and after.ran == 1
    assert "rebooting (--reboot): reboot to load the driver; waiting up to 30s for SSH" in out
    assert "reading the facts again" in out
    assert [r.step for r in rep.results] == ["driver", "driver (after reboot)", "after"]
    assert [r.status for r in rep.results] == ["changed", "ok", "ok"]
    # the old session asked for the reboot; the run lock was taken again on the new one
    first, *rest = box.sessions
    assert "systemctl reboot || reboot" in first.log and first.closed
    assert any(s.holds for s in rest)
    assert rep.commands == sum(s.commands_run for s in box.sessions)


def test_at_most_one_reboot():
    box = Box(loads_after_reboot=False)
    status, rep, after, out = go(box, RunOptions(reboot=True))
    assert status == ExitStatus.FAILED and box.boots == 1 and after.ran == 0
    assert "driver: FAILED: the driver still does not load" in out


def test_bounded_wait():
    box = Box(comes_back=False)
    h = ssh_host()
    h.cfg["system"]["reboot_timeout"] = 0.3  # (the inventory's minimum is 30 s)
    status, rep, after, out = go(box, RunOptions(reboot=True), h=h)
    assert status == ExitStatus.UNREACHABLE, out
    assert "did not come back within 0s after the reboot (system.reboot_timeout)" in rep.unreachable


def test_never_reboots_the_control_machine():
    h = inv.from_data({"hosts": {"box": {"connection": {"type": "local"}}}}).hosts["box"]
    box = Box()
    status, rep, after, out = go(box, RunOptions(reboot=True), h=h)
    assert status == ExitStatus.FAILED and box.boots == 0
    assert "does not reboot the machine it runs on (connection: local)" in out
