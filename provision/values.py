"""Kinds of values that reach a command, a unit file or a config on a rig.

An inventory, a lock file or a task option is data written by someone else: each string that can
reach a rig is checked here against what it names (a Debian package, a git URL or ref, an absolute
path, a host, a Hugging Face model id, ...). A checker returns None when the value is fine, else
the reason as text that completes "<file>: host 'x': <key>: ..." (one line, the value cut to
`CUT` characters). Where a value goes, it is quoted for that place as well (shell, `--` before
positional arguments, systemd's own escaping, JSON): checking is the first fence, not the only one.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Any, Callable
from urllib.parse import urlsplit

CUT = 60  # characters of a value echoed in a message
MAX_TEXT = 4096  # no inventory string is longer


def cut(value: Any, n: int = CUT) -> str:
    """repr() of a value, at most about n characters (a 10 MB value is never echoed whole)."""
    if isinstance(value, str):
        return repr(value[:n] + "…") if len(value) > n else repr(value)
    if isinstance(value, int) and value.bit_length() > 200:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


def clip(s: str, n: int = 160) -> str:
    """A text (not a value) shortened to about n characters, one line."""
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n] + "…"


# -- characters --------------------------------------------------------------------------------

_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def bad_char(s: str) -> str | None:
    """The first character no one-line value may hold: control characters (newline, tab, NUL,
    escape, DEL, C1), line/paragraph separators and bidirectional overrides; else None."""
    for ch in s:
        if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return ch
    return None


def _char_name(ch: str) -> str:
    return {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte"}.get(
        ch, f"the control character U+{ord(ch):04X}")


def text(s: str) -> str | None:
    """Any one-line text: no control characters, not absurdly long."""
    if len(s) > MAX_TEXT:
        return f"is {len(s)} characters long (at most {MAX_TEXT}): {cut(s)}"
    ch = bad_char(s)
    if ch is not None:
        return f"must be one line of text without control characters, got {_char_name(ch)} in {cut(s)}"
    return None


def _plain(s: str, what: str, example: str) -> str | None:
    """Shared start of the stricter kinds: text() first, then no leading `-` (never an option)."""
    err = text(s)
    if err:
        return err
    if not s:
        return f"must be {what}, got an empty string"
    if s.startswith("-"):
        return f"must be {what}, not an option (it starts with '-'): {cut(s)}"
    return None


# -- Debian packages ---------------------------------------------------------------------------

DEB_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1


def deb_package(s: str) -> str | None:
    err = _plain(s, "a Debian package name", "cuda-toolkit-12-8")
    if err:
        return err
    if not DEB_RE.fullmatch(s):
        return ("must be a Debian package name (lower-case letters, digits, '+', '-', '.'; "
                f"at least 2 characters), got {cut(s)}")
    return None


# -- git ---------------------------------------------------------------------------------------

GIT_SCHEMES = ("https", "http", "git", "ssh", "file")
_SCP_RE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<path>[^:\s].*)$")
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~:/?#@!$&'()*+,;=%\[\]-]+$")


def git_url(s: str) -> str | None:
    """https/http/git/ssh/file URLs, scp-like `user@host:path`, or an absolute local path."""
    what = "a git URL (https://, http://, git://, ssh://, file://, user@host:path or /abs/path)"
    err = _plain(s, what, "https://github.com/ggml-org/llama.cpp")
    if err:
        return err
    if s.startswith("/"):
        return abs_path(s)
    if any(c.isspace() for c in s):
        return f"must be {what} without spaces, got {cut(s)}"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", s)
    if m:
        scheme = m.group(1).lower()
        if scheme not in GIT_SCHEMES:
            return f"must be {what}; scheme {scheme!r} is not allowed, got {cut(s)}"
        if scheme != "file":
            u = urlsplit(s)
            try:
                host = u.hostname
                u.port  # noqa: B018 - raises on a bad port
            except ValueError:
                return f"must be {what}, got a malformed address in {cut(s)}"
            if not host or host_error(host):
                return f"must be {what}, got no valid host in {cut(s)}"
        return None
    if "::" in s.split("/", 1)[0]:
        # <transport>::<address> runs a remote helper (ext:: runs any command)
        return f"must be {what}; git's '<transport>::' form is not allowed, got {cut(s)}"
    m = _SCP_RE.fullmatch(s)
    if m and "/" not in s.split(":", 1)[0] and not host_error(m.group("host")):
        return None
    return f"must be {what}, got {cut(s)}"


_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
SHA_RE = re.compile(r"^[0-9a-fA-F]{40}$")


def git_ref(s: str) -> str | None:
    """A branch, tag or commit: the rules of `git check-ref-format --allow-onelevel`, no leading
    '-' (it would be an option), or 40 hex digits."""
    what = "a git branch, tag or 40-hex commit"
    err = _plain(s, what, "master, b6895 or a commit")
    if err:
        return err
    if SHA_RE.fullmatch(s):
        return None
    why = None
    if _REF_BAD.search(s):
        why = "space, control character, ~ ^ : ? * [ or \\"
    elif ".." in s:
        why = "'..'"
    elif "@{" in s:
        why = "'@{'"
    elif s == "@":
        why = "just '@'"
    elif s.startswith("/") or s.endswith("/") or "//" in s:
        why = "an empty path component"
    elif s.endswith("."):
        why = "a trailing '.'"
    elif any(c.startswith(".") or c.endswith(".lock") for c in s.split("/")):
        why = "a component that starts with '.' or ends with '.lock'"
    if why:
        return f"must be {what} (git check-ref-format: no {why}), got {cut(s)}"
    return None


# -- paths -------------------------------------------------------------------------------------


def abs_path(s: str) -> str | None:
    err = text(s)
    if err:
        return err
    if not s.startswith("/"):
        return f"must be an absolute path, got {cut(s)}"
    return None


def local_path(s: str) -> str | None:
    """A path on the control machine (may start with ~)."""
    err = text(s)
    if err:
        return err
    if not s:
        return "must be a path, got an empty string"
    return None


# -- hosts, users, names -----------------------------------------------------------------------

_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def host_error(s: str) -> str | None:
    """None for a host name (RFC 1123 labels), an IPv4 or an IPv6 address (brackets allowed)."""
    h = s[1:-1] if s.startswith("[") and s.endswith("]") else s
    try:
        ipaddress.ip_address(h)
        return None
    except ValueError:
        if h != s:
            return "brackets hold an IPv6 address"
    if len(h) > 253 or not h:
        return "length"
    labels = h[:-1].split(".") if h.endswith(".") else h.split(".")
    if all(_LABEL.fullmatch(lb) for lb in labels) and not h.startswith("-"):
        return None
    return "name"


def host(s: str) -> str | None:
    what = "a host name, an IPv4 or an IPv6 address"
    err = _plain(s, what, "192.168.1.50 or rig.lan")
    if err:
        return err
    if host_error(s):
        return f"must be {what}, got {cut(s)}"
    return None


def split_host_port(s: str) -> tuple[str, int | None]:
    """`[v6]` / `[v6]:port` / `name:port` / `v4:port` / a bare IPv6 / a name -> (address, port)."""
    m = re.fullmatch(r"\[([^\[\]]+)\](?::([0-9]{1,5}))?", s)
    if m:
        return m.group(1), int(m.group(2)) if m.group(2) else None
    if s.count(":") == 1:
        h, _, p = s.partition(":")
        if p.isdigit():
            return h, int(p)
    return s, None


def ssh_address(s: str) -> str | None:
    """connection.address: what `host` takes, and `[v6]:port` / `name:port` (port 1-65535)."""
    what = "a host name, an IPv4 or an IPv6 address (optionally [address]:port)"
    err = _plain(s, what, "192.168.1.50, rig.lan or [fe80::1%eth0]:2222")
    if err:
        return err
    h, port = split_host_port(s)
    if s.startswith("["):
        try:
            ipaddress.IPv6Address(h)
        except ValueError:
            return f"must be {what}; brackets hold an IPv6 address, got {cut(s)}"
    if port is not None and not 0 < port < 65536:
        return f"must be {what} with a port of 1 to 65535, got {cut(s)}"
    if host_error(h):
        return f"must be {what}, got {cut(s)}"
    return None


_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_LOGIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


def unix_user(s: str) -> str | None:
    """A system user name as useradd accepts it by default."""
    err = _plain(s, "a user name", "llama")
    if err:
        return err
    if not _USER_RE.fullmatch(s):
        return f"must be a user name (lower-case letters, digits, '_', '-'; at most 32), got {cut(s)}"
    return None


def service_user(s: str) -> str | None:
    if s == "root" or unix_user(s):
        return f"must be an unprivileged user name, got {cut(s)}"
    return None


def login_user(s: str) -> str | None:
    """The SSH login user."""
    err = _plain(s, "a user name", "root")
    if err:
        return err
    if not _LOGIN_RE.fullmatch(s):
        return f"must be a user name (letters, digits, '.', '_', '-'), got {cut(s)}"
    return None


_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_name(s: str) -> str | None:
    err = _plain(s, "an environment variable name", "HF_TOKEN")
    if err:
        return err
    if not _ENV_RE.fullmatch(s):
        return f"must be an environment variable name (letters, digits, '_'), got {cut(s)}"
    return None


_HF_PART = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")


def hf_model_id(s: str) -> str | None:
    """`org/name` with Hugging Face's rules (huggingface_hub validate_repo_id)."""
    what = "a Hugging Face model id org/name"
    err = _plain(s, what, "unsloth/Qwen3.5-122B-A10B-GGUF")
    if err:
        return err
    parts = s.split("/")
    ok = (len(parts) == 2 and all(_HF_PART.fullmatch(p) and p[0] not in "-." and p[-1] not in "-."
                                  for p in parts)
          and "--" not in s and ".." not in s and not s.endswith(".git"))
    if not ok:
        return (f"must be {what} (letters, digits, '-', '_', '.'; no '--' or '..'; a part "
                f"neither starts nor ends with '-' or '.'), got {cut(s)}")
    return None


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def name(s: str) -> str | None:
    """A plain identifier (cmake target, provider id, cmake variable)."""
    err = _plain(s, "a name", "llama-server")
    if err:
        return err
    if not _NAME_RE.fullmatch(s) or len(s) > 200:
        return f"must be a name (letters, digits, '_', '.', '+', '-'), got {cut(s)}"
    return None


_CMAKE_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?::[A-Z]+)?$")


def cmake_var(s: str) -> str | None:
    """`NAME` or `NAME:TYPE` (cmake -D NAME:TYPE=VALUE)."""
    if not isinstance(s, str) or not _CMAKE_VAR.fullmatch(s) or len(s) > 200:
        return f"must be a CMake variable name (letters, digits, '_'; optionally :TYPE), got {cut(s)}"
    return None


_ARCH_RE = re.compile(r"^(?:[0-9]{2,3}[a-z]?(?:-real|-virtual)?|native|all|all-major)$")


def cuda_arch(s: str) -> str | None:
    err = text(s)
    if err:
        return err
    if not _ARCH_RE.fullmatch(s):
        return f"must be a CUDA architecture like 86, 90a, 120-real, native or all, got {cut(s)}"
    return None


def alias(s: str) -> str | None:
    """The model id clients use: printable, one line, not an option."""
    err = _plain(s, "a model alias", "Qwen3.5-122B-A10B-UD-Q6_K_XL")
    if err:
        return err
    if len(s) > 256:
        return f"must be at most 256 characters, got {len(s)}: {cut(s)}"
    if "{env:" in s or "{file:" in s:
        # opencode expands these in its config (where the alias becomes the model id)
        return f"must not hold opencode's {{env:...}} or {{file:...}}, got {cut(s)}"
    return None


def extra_arg(s: str) -> str | None:
    """One word of llama-server's command line (its own argv item; quoted for systemd)."""
    return text(s)


def glob(s: str) -> str | None:
    err = text(s)
    if err:
        return err
    if s.lstrip().startswith("-"):
        return f"must be a file pattern like UD-Q6_K_XL/*, not something that starts with '-': {cut(s)}"
    return None


# -- URLs --------------------------------------------------------------------------------------

_USERINFO = r"(?:[A-Za-z0-9._~%!$&()*+,=-]+(?::[A-Za-z0-9._~%!$&()*+,=-]*)?@)?"
_PROXY_RE = re.compile(r"^https?://" + _USERINFO +
                       r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?/?$")


def proxy_url(s: str) -> str | None:
    """http(s)://[user[:password]@]host[:port][/] -- no quotes, spaces or anything else that could
    end the value in apt's `Acquire::http::Proxy "...";`."""
    what = "a proxy URL http://host:port"
    err = _plain(s, what, "http://10.0.0.1:3142")
    if err:
        return err
    m = _PROXY_RE.fullmatch(s)
    if not m or host_error(m.group("host")) or (m.group("port") and not 0 < int(m.group("port")) < 65536):
        return f"must be {what} (http or https, host[:port], no quotes or spaces), got {cut(s)}"
    return None


def http_url(s: str) -> str | None:
    """An http(s) URL (a hub endpoint, a pip index, opencode's base URL)."""
    what = "an http(s) URL"
    err = _plain(s, what, "https://huggingface.co")
    if err:
        return err
    if not _URL_SAFE.fullmatch(s) or "'" in s:
        return f"must be {what} without spaces or quotes, got {cut(s)}"
    u = urlsplit(s)
    try:
        hostname = u.hostname
        u.port  # noqa: B018
    except ValueError:
        return f"must be {what}, got a malformed address in {cut(s)}"
    if u.scheme not in ("http", "https") or not hostname or host_error(hostname):
        return f"must be {what}, got {cut(s)}"
    return None


def url_or_path(s: str) -> str | None:
    """pip's --find-links: an http(s)/file URL or an absolute path on the rig."""
    if s.startswith("/"):
        return abs_path(s)
    if s.startswith("file://"):
        return abs_path(s[len("file://"):]) and f"must be a file:// URL of an absolute path, got {cut(s)}"
    return http_url(s)


_SIMPLE_REQUIREMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
                                 r"(?:(?:==|!=|>=|<=|<|>)\d+(?:\.\d+)*(?:,(?:==|!=|>=|<=|<|>)\d+(?:\.\d+)*)*)?")


def pip_requirement(s: str) -> str | None:
    """A PEP 508 requirement (never a pip option like -r FILE or --index-url)."""
    what = "a pip requirement like huggingface-hub>=2.4,<3"
    err = _plain(s, what, "huggingface-hub>=2.4,<3")
    if err:
        return err
    if _SIMPLE_REQUIREMENT.fullmatch(s):  # name + plain version bounds: valid, no parser needed
        return None
    from packaging.requirements import InvalidRequirement, Requirement
    try:
        r = Requirement(s)
    except InvalidRequirement:
        return f"must be {what}, got {cut(s)}"
    if r.url:
        return f"must be {what} (no URL), got {cut(s)}"
    return None


def rpc_address(s: str) -> str | None:
    """An IP address of a private network (or loopback) for the RPC backend, which has no
    authentication at all: never a wildcard (0.0.0.0, ::), a multicast or a global address, and
    never a host name (it could resolve to anything)."""
    what = "a private IP address (10.x, 172.16-31.x, 192.168.x, 100.64/10, fd00::/8, loopback)"
    err = _plain(s, what, "10.0.0.2")
    if err:
        return err
    h = s[1:-1] if s.startswith("[") and s.endswith("]") else s
    if "%" in h:
        return f"must be {what} without a zone (%...), got {cut(s)}"
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return f"must be {what}, not a host name, got {cut(s)}"
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_unspecified:
        return (f"must be {what}: {cut(s)} listens on every interface and the RPC server has no "
                "authentication")
    if ip.is_multicast or ip.is_global or (ip.is_reserved and not ip.is_loopback):
        return (f"must be {what}: {cut(s)} is a public or non-unicast address and the RPC server "
                "has no authentication")
    return None


def gpu_index(s: str) -> str | None:
    """A GPU index as nvidia-smi numbers them (0, 1, ...)."""
    err = text(s)
    if err:
        return err
    if not s.isascii() or not s.isdigit() or len(s) > 3:
        return f"must be a GPU index (0, 1, ...), got {cut(s)}"
    return None


CHECKS: dict[str, Callable[[str], str | None]] = {
    "text": text, "deb_package": deb_package, "git_url": git_url, "git_ref": git_ref,
    "abs_path": abs_path, "local_path": local_path, "host": host, "unix_user": unix_user,
    "service_user": service_user, "login_user": login_user, "env_name": env_name,
    "hf_model_id": hf_model_id, "name": name, "cuda_arch": cuda_arch, "alias": alias,
    "extra_arg": extra_arg, "glob": glob, "proxy_url": proxy_url, "http_url": http_url,
    "url_or_path": url_or_path, "pip_requirement": pip_requirement, "ssh_address": ssh_address,
    "rpc_address": rpc_address, "gpu_index": gpu_index,
}
CHECKS["deb_package_or_empty"] = lambda s: None if s == "" else deb_package(s)
