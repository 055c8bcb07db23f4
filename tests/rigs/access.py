"""Ways into a Tier B rig that the stock boxes do not have (used by the sudo-password and
ssh_config tests):

* ``add_password_sudo_user(rig, user, password)`` -- a login user (same client key) whose sudo
  asks for a password: ``user ALL=(ALL) ALL`` in /etc/sudoers.d, no NOPASSWD.
* ``private_link(a, b)`` -- a cable between two rigs' network namespaces on a /24 of their own
  (10.251.N.0/24, N = b's slot, so parallel sessions never collide): the control machine has no
  address there and an `unreachable` route for it; only ``a`` and ``b`` are on it.
* ``ssh_only_on(rig, address)`` -- the rig's sshd listens on that address only (a drop-in in
  /etc/ssh/sshd_config.d + restart): with ``private_link`` the rig is reachable over SSH only
  from the other rig (a bastion).
"""
from __future__ import annotations

import shlex

from . import Rig, sh, tcp_banner, tcp_open, wait_for


def add_password_sudo_user(rig: Rig, user: str, password: str) -> Rig:
    q = shlex.quote
    rig.sh(
        f"id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/bash {user}\n"
        f"printf '%s:%s\\n' {user} {q(password)} | chpasswd\n"
        f"install -d -m 700 -o {user} -g {user} /home/{user}/.ssh\n"
        f"install -m 600 -o {user} -g {user} /root/.ssh/authorized_keys /home/{user}/.ssh/authorized_keys\n"
        f"printf '%s ALL=(ALL) ALL\\n' {user} > /etc/sudoers.d/{user}.tmp\n"
        f"chmod 0440 /etc/sudoers.d/{user}.tmp && mv /etc/sudoers.d/{user}.tmp /etc/sudoers.d/{user}\n"
        f"visudo -c >/dev/null")
    return rig.as_user(user)


def _slot(rig: Rig) -> int:
    return int(rig.address.split(".")[2])


def private_link(a: Rig, b: Rig) -> tuple[str, str]:
    """(a's address, b's address) on a private /24 between the two rigs only."""
    n = _slot(b)
    ia, ib = f"pa-{b.name}", f"pb-{b.name}"
    for cmd in (["ip", "link", "add", ia, "type", "veth", "peer", "name", ib],
                ["ip", "link", "set", ia, "netns", a.name],
                ["ip", "link", "set", ib, "netns", b.name],
                ["ip", "-n", a.name, "addr", "add", f"10.251.{n}.1/24", "dev", ia],
                ["ip", "-n", b.name, "addr", "add", f"10.251.{n}.2/24", "dev", ib],
                ["ip", "-n", a.name, "link", "set", ia, "up"],
                ["ip", "-n", b.name, "link", "set", ib, "up"],
                # this machine has no way there: fail at once rather than leave by the default
                # route (where a sandbox's egress may answer any TCP connect)
                ["ip", "route", "replace", "unreachable", f"10.251.{n}.0/24"]):
        sh(cmd, timeout=30)
    return f"10.251.{n}.1", f"10.251.{n}.2"


def unlink_private(a: Rig, b: Rig) -> None:
    sh(["ip", "-n", a.name, "link", "del", f"pa-{b.name}"], check=False, timeout=30)
    sh(["ip", "route", "del", "unreachable", f"10.251.{_slot(b)}.0/24"], check=False, timeout=30)


def ssh_only_on(rig: Rig, address: str) -> None:
    rig.sh(f"printf 'ListenAddress %s\\n' {address} > /etc/ssh/sshd_config.d/zz-llama-rig-test.conf "
           "&& systemctl restart ssh")
    wait_for(lambda: not tcp_open(rig.address, 22, timeout=0.5), 15, interval=0.1,
             what=f"sshd of {rig.name} to leave {rig.address}")
    wait_for(lambda: rig.sh(f"python3 -c 'import socket; socket.create_connection((\"{address}\", 22), 1)'",
                            check=False).returncode == 0, 15, interval=0.1,
             what=f"sshd of {rig.name} on {address}")


__all__ = ["add_password_sudo_user", "private_link", "unlink_private", "ssh_only_on", "tcp_banner"]
