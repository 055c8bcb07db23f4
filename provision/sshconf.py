"""Where an SSH host really is: the inventory's connection keys over the user's ssh_config.

`resolve(host)` reads the OpenSSH client config (connection.ssh_config, else $LLAMA_RIG_SSH_CONFIG,
else ~/.ssh/config; `none` reads nothing) with paramiko's parser and returns an `Endpoint`: the
address to dial (HostName), port, user, key files and the ProxyJump hops in front of it. What the
inventory sets wins (user, port, key, connect_timeout: set in any layer, or on the command line);
what it leaves out comes from the Host block that matches connection.address (an alias is fine),
then the defaults (root, 22, the default keys and the agent). Each ProxyJump hop is itself looked
up in the same file (its HostName, User, Port, IdentityFile, and its own ProxyJump). The hops are
dialled by provision.target with the same known_hosts and host key policy as the rig: a jump
host's key is checked like any other.

Problems in the file are bad input: one InventoryError line naming the file, the host and the key.
"""
from __future__ import annotations

import getpass
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass, field

from . import values
from .errors import ConnectError, InventoryError

ENV = "LLAMA_RIG_SSH_CONFIG"
DEFAULT = "~/.ssh/config"
MAX_HOPS = 8


@dataclass
class Endpoint:
    alias: str  # the name looked up (connection.address, or a ProxyJump hop as written)
    hostname: str  # what is dialled: HostName, or the alias; an IPv6 address without brackets
    port: int
    user: str
    keys: list[str] = field(default_factory=list)  # key files; empty: the default keys + agent
    identities_only: bool = False  # only `keys` (no agent, no default keys)
    key_source: str = ""  # where `keys` came from: connection.key or <file> IdentityFile
    jump: list["Endpoint"] = field(default_factory=list)  # hops, in the order they are dialled
    proxy_command: str | None = None  # ssh_config ProxyCommand (%h %p already expanded)
    timeout: float = 10.0  # connect timeout, seconds

    @property
    def shown(self) -> str:
        """`host:port` as a person writes it (`[v6]:port`)."""
        h = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{h}:{self.port}"

    def known_hosts_name(self) -> str:
        """The name paramiko (and OpenSSH) file this host's key under in known_hosts."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def config_path(con: dict) -> str | None:
    """The ssh_config file this host reads, or None (`none`, or the default file is missing)."""
    p = con.get("ssh_config")
    explicit = p is not None
    if p is None:
        p = os.environ.get(ENV) or DEFAULT
        explicit = bool(os.environ.get(ENV))
    if p == "none":
        return None
    full = os.path.expanduser(p)
    if not explicit and not os.path.exists(full):
        return None
    return full


def _load(path: str, where: str):
    import paramiko
    try:
        with open(path) as fh:
            text = fh.read(1 << 20)
    except FileNotFoundError:
        raise InventoryError(f"{where}: connection.ssh_config: no such file: {values.clip(path, 200)}") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise InventoryError(f"{where}: connection.ssh_config: cannot read {values.clip(path, 200)}: {why}") from None
    try:
        return paramiko.SSHConfig.from_text(text)
    except Exception as e:  # paramiko raises ConfigParseError, ValueError, ...
        raise InventoryError(f"{path}: {values.clip(str(e) or type(e).__name__, 200)}") from None


def _port(v: str, path: str, alias: str) -> int:
    if not v.isdigit() or not 0 < int(v) < 65536:
        raise InventoryError(f"{path}: Host {alias!r}: Port: must be a port number, got {values.cut(v)}")
    return int(v)


def _hostname(v: str, path: str, alias: str) -> str:
    h = v[1:-1] if v.startswith("[") and v.endswith("]") else v
    try:
        return str(ipaddress.ip_address(h)) if "%" not in h else h
    except ValueError:
        pass
    if values.host(h):
        raise InventoryError(f"{path}: Host {alias!r}: HostName: must be a host name or an IP "
                             f"address, got {values.cut(v)}")
    return h


def _user(v: str, path: str, alias: str) -> str:
    if values.login_user(v):
        raise InventoryError(f"{path}: Host {alias!r}: User: must be a user name, got {values.cut(v)}")
    return v


def resolve(host) -> Endpoint:
    """The Endpoint of an ssh host (see the module doc)."""
    con = host.cfg["connection"]
    explicit = getattr(host, "explicit", None)
    explicit = set(explicit) if explicit is not None else {f"connection.{k}" for k in con}
    where = f"{host.source}: host {host.name!r}"
    alias = con["address"] or host.name
    path = config_path(con)
    cfg = _load(path, where) if path else None
    looked = cfg.lookup(alias) if cfg else {}

    def conf(key):
        return looked.get(key) if cfg else None

    name = _hostname(conf("hostname") or alias, path or where, alias)
    port = int(con["port"])
    if "connection.port" not in explicit and conf("port"):
        port = _port(conf("port"), path, alias)
    user = con["user"]
    if "connection.user" not in explicit and conf("user"):
        user = _user(conf("user"), path, alias)
    ep = Endpoint(alias, name, port, user, timeout=float(con["connect_timeout"]))
    if con["key"]:
        ep.keys, ep.identities_only = [os.path.expanduser(con["key"])], True
        ep.key_source = "connection.key"
    elif conf("identityfile"):
        ep.keys = [os.path.expanduser(k) for k in conf("identityfile")]
        ep.key_source = f"{path}: IdentityFile"
        ep.identities_only = (conf("identitiesonly") or "no").lower() == "yes"
    if "connection.connect_timeout" not in explicit and conf("connecttimeout"):
        t = conf("connecttimeout")
        if not t.isdigit() or not 0 < int(t) <= 300:
            raise InventoryError(f"{path}: Host {alias!r}: ConnectTimeout: must be 1 to 300 seconds, "
                                 f"got {values.cut(t)}")
        ep.timeout = float(t)
    jump = conf("proxyjump")
    if jump and jump.lower() != "none":
        ep.jump = _hops(cfg, path, jump, con, seen={alias})
    elif conf("proxycommand") and conf("proxycommand").lower() != "none":
        ep.proxy_command = conf("proxycommand")
    return ep


_HOP = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]\s]+\]|[^:@\s/]+)(?::(?P<port>[0-9]{1,5}))?/?$")


def _hops(cfg, path: str, spec: str, con: dict, seen: set[str], depth: int = 0) -> list[Endpoint]:
    """ProxyJump `[user@]host[:port][,...]` -> the hops, the first one dialled first."""
    out: list[Endpoint] = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        m = _HOP.fullmatch(item)
        if not m:
            raise InventoryError(f"{path}: ProxyJump: not [user@]host[:port]: {values.cut(item)}")
        alias = m.group("host")
        if alias in seen or depth + len(out) >= MAX_HOPS:
            raise InventoryError(f"{path}: ProxyJump: {alias!r} loops back (or more than {MAX_HOPS} hops)")
        looked = cfg.lookup(alias)
        name = _hostname(looked.get("hostname") or alias, path, alias)
        port = _port(m.group("port") or looked.get("port") or "22", path, alias)
        user = _user(m.group("user") or looked.get("user") or getpass.getuser(), path, alias)
        hop = Endpoint(alias, name, port, user, timeout=float(con["connect_timeout"]))
        if looked.get("identityfile"):
            hop.keys = [os.path.expanduser(k) for k in looked["identityfile"]]
            hop.key_source = f"{path}: IdentityFile"
            hop.identities_only = (looked.get("identitiesonly") or "no").lower() == "yes"
        elif con["key"]:
            # no IdentityFile for the jump host: the rig's key is the likeliest one to work
            hop.keys = [os.path.expanduser(con["key"])]
            hop.key_source = "connection.key"
        # as OpenSSH: the first hop is dialled with its own ProxyJump; each later one is reached
        # through the hop before it (its own ProxyJump does not apply)
        inner = looked.get("proxyjump") if not out else None
        if inner and alias in [(_HOP.fullmatch(x.strip()) or m).group("host") for x in inner.split(",")]:
            inner = None  # `Host *` with a ProxyJump also matches the jump host itself
        if inner and inner.lower() != "none":
            out += _hops(cfg, path, inner, con, seen | {alias}, depth + len(out) + 1)
        out.append(hop)
    return out


def connect_error(e: BaseException, ep: Endpoint, t0: float, known_hosts: str,
                  hop: bool = False) -> ConnectError | None:
    """One line for a failed SSH connect to `ep` (the rig, or a jump host); None: not ours."""
    import errno

    import paramiko

    addr = ep.shown
    login = f"{ep.user}@{addr}"
    t = f"{ep.timeout:g} s"
    no_server = f"no SSH server answered on {addr}"
    check = "(is the rig up, is the port right?)" if not hop else "(is the jump host up, is the port right?)"
    pre = f"jump host {ep.alias}: " if hop else ""
    if isinstance(e, paramiko.BadHostKeyException):
        return ConnectError(
            f"{pre}the host key of {addr} changed: it does not match {known_hosts} — refusing "
            "to connect (possible man-in-the-middle; if the rig was reinstalled, remove the "
            f"old key: ssh-keygen -f {known_hosts} -R '{ep.known_hosts_name()}')")
    if isinstance(e, paramiko.AuthenticationException):
        keys = [k for k in ep.keys if ep.key_source == "connection.key" or os.path.isfile(k)]
        tried = (f"with key {', '.join(keys)}" if keys else
                 "with the SSH agent and the default keys in ~/.ssh (set connection.key)")
        detail = str(e).strip().rstrip(".")
        return ConnectError(f"{pre}{login} refused the login {tried}"
                            + (f": {detail}" if detail and detail != "Authentication failed" else "")
                            + f" (is the public key in {ep.user}'s ~/.ssh/authorized_keys?)")
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        codes = {getattr(x, "errno", None) for x in e.errors.values()}
        if codes <= {errno.ECONNREFUSED}:
            return ConnectError(f"{pre}{no_server}: connection refused {check}")
        reason = next((x.strerror for x in e.errors.values() if getattr(x, "strerror", None)), str(e))
        return ConnectError(f"{pre}cannot reach {addr}: {reason} {check}")
    if isinstance(e, paramiko.SSHException):
        msg = str(e)
        waited = time.monotonic() - t0
        if "not found in known_hosts" in msg or "Server" in msg and "not found" in msg:
            return ConnectError(f"{pre}the host key of {addr} is unknown: not in {known_hosts} "
                                "(add it, or set connection.host_key_policy: accept-new)")
        if ep.keys and "private key" in msg:
            return ConnectError(f"{ep.key_source or 'IdentityFile'}: cannot use {ep.keys[0]}: {msg}")
        if msg.startswith("Error reading SSH protocol banner") or msg == "No existing session":
            if waited >= ep.timeout * 0.8:
                return ConnectError(f"{pre}{no_server} within {t} {check}")
            return ConnectError(f"{pre}{no_server}: something there closed the connection without "
                                "speaking SSH (is the port right?)")
        if ep.proxy_command and "ProxyCommand" in msg:
            return ConnectError(f"the ProxyCommand of {ep.alias} failed: {msg.splitlines()[0]}")
        return ConnectError(f"{pre}SSH to {login} failed: {msg.splitlines()[0] if msg else type(e).__name__}")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return ConnectError(f"{pre}{no_server} within {t} {check}")
    if isinstance(e, socket.gaierror):
        where = ("connection.address: check the spelling, DNS or /etc/hosts" if not hop and ep.alias == ep.hostname
                 else "check HostName / ProxyJump in the ssh_config, DNS or /etc/hosts")
        return ConnectError(f"{pre}cannot resolve the host name {ep.hostname!r} ({where})")
    if isinstance(e, ConnectionRefusedError):
        return ConnectError(f"{pre}{no_server}: connection refused {check}")
    if isinstance(e, (ConnectionResetError, EOFError)):
        return ConnectError(f"{pre}the SSH server on {addr} closed the connection before login "
                            "(too many connections, or it refuses this client)")
    if isinstance(e, OSError):
        reason = e.strerror or str(e) or type(e).__name__
        return ConnectError(f"{pre}cannot reach {addr}: {reason} {check}")
    return None


# -- dialling ------------------------------------------------------------------------------------

class AcceptNew:
    """Like OpenSSH's StrictHostKeyChecking=accept-new: record unknown keys, reject changed ones
    (a changed key raises BadHostKeyException inside paramiko before we are asked)."""

    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, hostname, key) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(line)


def trust(client, known_hosts: str, policy: str) -> None:
    """Host keys for a paramiko client: known_hosts, and strict or accept-new for the rest."""
    import paramiko
    if os.path.exists(known_hosts):
        client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(AcceptNew(known_hosts) if policy == "accept-new"
                                       else paramiko.RejectPolicy())


class _QuickAckSocket(socket.socket):
    """A TCP socket that ACKs what it received at once (Linux TCP_QUICKACK, re-armed after every
    recv: the kernel drops back to delayed ACKs on its own). sshd writes without TCP_NODELAY on a
    session with no terminal: a small reply (a channel opened, an exit status) waits for the ACK
    of its previous small write, and a client in delayed-ACK mode sends that ACK only after
    ~40 ms. Measured on a rig: the first command of a connection took 54 ms, 11 ms with this."""

    def recv(self, *a, **kw):
        data = super().recv(*a, **kw)
        try:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return data


def nodelay_transport(sock, **kw):
    """paramiko's Transport over `sock` with Nagle's algorithm off (TCP_NODELAY) and, on Linux,
    quick ACKs (`_QuickAckSocket`). With Nagle on, the small writes of every command (channel
    open, exec request, stdin EOF) wait for the server's delayed ACK: about 40 ms per command and
    per handshake step on any link. Measured on a rig over a veth (benchmarks/ssh_roundtrip.py):
    a command took 52 ms, now 8 ms; a connect 72 ms, now 31 ms. A ProxyCommand or a jump host's
    channel is left as it is (the jump host's own socket gets the same treatment)."""
    import paramiko
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if hasattr(socket, "TCP_QUICKACK") and type(sock) is socket.socket:
            timeout = sock.gettimeout()
            sock = _QuickAckSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            sock.settimeout(timeout)
    return paramiko.Transport(sock, **kw)


def auth_kwargs(ep: Endpoint) -> dict:
    kw: dict = {"banner_timeout": ep.timeout, "auth_timeout": ep.timeout,
                "transport_factory": nodelay_transport}
    keys = [k for k in ep.keys if ep.key_source == "connection.key" or os.path.isfile(k)]
    if keys:  # OpenSSH skips an IdentityFile that is not there; connection.key must be
        kw.update(key_filename=keys, look_for_keys=False, allow_agent=not ep.identities_only)
    else:
        kw.update(look_for_keys=True, allow_agent=True)
    return kw


def open_route(ep: Endpoint, known_hosts: str, policy: str, hops: list):
    """The socket the rig's SSH session runs over: None (a direct TCP connection), a
    ProxyCommand, or a direct-tcpip channel through the last jump host. Each jump host's client
    is appended to `hops` (the caller closes them) and its host key checked like the rig's."""
    import paramiko
    if ep.proxy_command:
        return paramiko.ProxyCommand(ep.proxy_command)
    sock = None
    for i, hop in enumerate(ep.jump):
        client = paramiko.SSHClient()
        trust(client, known_hosts, policy)
        hops.append(client)
        t0 = time.monotonic()
        try:
            client.connect(hostname=hop.hostname, port=hop.port, username=hop.user, sock=sock,
                           timeout=hop.timeout, **auth_kwargs(hop))
        except Exception as e:
            err = connect_error(e, hop, t0, known_hosts, hop=True)
            if err is None:
                raise
            raise err from None
        nxt = ep.jump[i + 1] if i + 1 < len(ep.jump) else ep
        try:
            sock = client.get_transport().open_channel(
                "direct-tcpip", (nxt.hostname, nxt.port), ("", 0), timeout=nxt.timeout)
        except paramiko.ChannelException as e:
            raise ConnectError(f"the jump host {hop.alias} ({hop.shown}) cannot reach {nxt.shown}: "
                               f"{e.text or 'refused'} (is the rig up, is the port right?)") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            why = str(e) or type(e).__name__
            if "Timeout" in why or isinstance(e, socket.timeout):
                why = f"no answer within {nxt.timeout:g} s"
            raise ConnectError(f"the jump host {hop.alias} ({hop.shown}) cannot reach {nxt.shown}: "
                               f"{why} (is the rig up, is the port right?)") from None
    return sock
