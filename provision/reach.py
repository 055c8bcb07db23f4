"""Something a step needs is unreachable: say so in ONE line that names it and where from.

The dependencies a run reaches out to, and how each failure is recognised:
  apt mirror / NVIDIA CUDA repo   apt's `Err:`/`Failed to fetch URL  reason` lines (apply), or a
                                  read-only probe of each source's InRelease with apt-helper
                                  (--check, the same proxy and methods as apt itself)
  pip index / wheelhouse          pip's `Failed to establish a new connection: …` retries (apply),
                                  or one GET from the rig (--check)
  git remote                      `git ls-remote` / clone / fetch stderr
  the hub                         huggingface_hub's transport exceptions (httpx2/httpx/requests),
                                  raised on the control machine
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from . import sections
from .target import join, quote

APT_HELPER = "/usr/lib/apt/apt-helper"
PYPI = "https://pypi.org/simple/"

# -- apt --------------------------------------------------------------------------------------

_FETCH_RE = re.compile(r"Failed to fetch (\S+)\s+(.*)$")
_ERR_RE = re.compile(r"^Err:\d+\s+(\S+)(?:\s+(.*))?$")


def _err_url(uri: str, rest: str) -> str:
    """`Err:1 http://deb.debian.org/debian bookworm InRelease` -> the InRelease URL; a flat repo
    (`Err:2 http://x/repos/debian12/x86_64  InRelease`) too; a .deb line keeps its URI."""
    parts = rest.split()
    if len(parts) >= 2 and parts[-1] in ("InRelease", "Release", "Release.gpg"):
        return f"{uri.rstrip('/')}/dists/{parts[0]}/{parts[-1]}"
    if len(parts) == 1 and parts[0] in ("InRelease", "Release", "Release.gpg"):
        return f"{uri.rstrip('/')}/{parts[0]}"
    return uri


def apt_fetch_failures(output: str) -> list[tuple[str, str]]:
    """(url, reason) for every download apt could not make, in order, one per url."""
    out: dict[str, str] = {}
    lines = output.splitlines()
    for i, ln in enumerate(lines):
        m = _FETCH_RE.search(ln)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
            continue
        m = _ERR_RE.match(ln.strip())
        if m and i + 1 < len(lines) and lines[i + 1].startswith(" "):
            out.setdefault(_err_url(m.group(1), m.group(2) or ""), lines[i + 1].strip())
    return list(out.items())


def source_base(url: str) -> str:
    """The source a fetched URL belongs to: `http://deb.debian.org/debian/dists/bookworm/InRelease`
    -> `http://deb.debian.org/debian`; a flat repo's `…/x86_64/InRelease` -> `…/x86_64/`."""
    if "/dists/" in url:
        return url.split("/dists/", 1)[0]
    if "/pool/" in url:
        return url.split("/pool/", 1)[0]
    return url.rsplit("/", 1)[0] + "/"


def name_source(url: str, known: dict[str, str]) -> str:
    """`NVIDIA CUDA repo https://…/debian12/x86_64/` or `apt mirror http://deb.debian.org/debian`."""
    for prefix, label in known.items():
        if url.startswith(prefix):
            return f"{label} {prefix}"
    return f"apt mirror {source_base(url)}"


def _short_reason(reason: str) -> str:
    r = " ".join(reason.split())
    return r if len(r) <= 200 else r[:199] + "…"


def apt_unreachable(host: str, output: str, known: dict[str, str] | None = None,
                    proxy: str | None = None) -> str | None:
    """One line naming every source apt could not reach (None: it reached them all)."""
    fails = apt_fetch_failures(output)
    if not fails:
        return None
    seen: dict[str, str] = {}
    for url, reason in fails:
        seen.setdefault(name_source(url, known or {}), reason)
    via = f" (through the apt proxy {proxy})" if proxy else ""
    parts = [f"{name}: {_short_reason(reason)}" for name, reason in seen.items()]
    return f"unreachable from {host}{via}: " + "; ".join(parts)


def apt_error(output: str) -> str:
    """The last `E:` line of apt's output (or its last line)."""
    errs = [ln[2:].strip() for ln in output.splitlines() if ln.startswith("E:")]
    if errs:
        return errs[-1]
    tail = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return tail[-1] if tail else "no output"


def apt_probe_script(urls: list[str], proxy: str | None = None, timeout: int = 15) -> str:
    """A read-only probe: fetch each URL (an InRelease) with apt's own methods, proxy and config
    into a private temp dir that is removed; prints `@@ok URL` or apt's error lines."""
    opts = ["-o", "APT::Sandbox::User=root", "-o", "Acquire::Retries=0",
            "-o", f"Acquire::http::Timeout={timeout}", "-o", f"Acquire::https::Timeout={timeout}"]
    if proxy:
        opts += ["-o", f"Acquire::http::Proxy={proxy}"]
    lines = ['d=$(mktemp -d) || exit 1', 'trap \'rm -rf "$d"\' EXIT', "i=0"]
    for u in urls:
        lines.append(f"i=$((i+1)); if {APT_HELPER} {join(opts)} download-file {quote(u)} \"$d/$i\" "
                     f">\"$d/log\" 2>&1; then echo \"@@ok {u}\"; else cat \"$d/log\"; fi")
    return "\n".join(lines)


# apt sources reached over a network; `file:`, `copy:` and `cdrom:` sources are on the box itself
# (a flat `file:` repo often has no InRelease at all): apt reads them in place, nothing to reach
_NETWORK_SCHEMES = ("http://", "https://", "ftp://", "tor+http://", "tor+https://", "mirror://",
                    "mirror+http://", "mirror+https://")


def print_uris_sources(output: str) -> list[str]:
    """InRelease URLs from `apt-get update --print-uris` (one per source reached over a network)."""
    out = []
    for ln in output.splitlines():
        m = re.match(r"^'([^']+/InRelease)'\s", ln.strip())
        if m and m.group(1) not in out and m.group(1).lower().startswith(_NETWORK_SCHEMES):
            out.append(m.group(1))
    return out


# -- pip --------------------------------------------------------------------------------------

_PIP_NET = re.compile(r"(Failed to establish a new connection: [^')\"]+|Temporary failure in name resolution|"
                      r"Name or service not known|Network is unreachable|No route to host|"
                      r"Read timed out|Connection refused|Connection reset by peer|"
                      r"There was a problem confirming the ssl certificate[^\n]*|"
                      r"Could not fetch URL \S+: [^\n]*)")


def pip_where(mcfg: dict) -> str:
    """What pip downloads from, as the user configured it."""
    if mcfg.get("pip_find_links") and not mcfg.get("pip_index_url"):
        return f"pip wheelhouse {mcfg['pip_find_links']}"
    if mcfg.get("pip_index_url"):
        extra = f" (and wheelhouse {mcfg['pip_find_links']})" if mcfg.get("pip_find_links") else ""
        return f"pip index {mcfg['pip_index_url']}{extra}"
    return f"pip index {PYPI} (PyPI; set model.pip_index_url or model.pip_find_links for a rig without it)"


def pip_unreachable(host: str, output: str, mcfg: dict) -> str | None:
    m = _PIP_NET.search(output)
    if not m:
        return None
    reason = m.group(1).replace("Failed to establish a new connection: ", "")
    return f"{pip_where(mcfg)} unreachable from {host}: {_short_reason(reason)}"


def pip_probe_url(mcfg: dict) -> str:
    return mcfg.get("pip_index_url") or mcfg.get("pip_find_links") or PYPI


def url_probe_command(url: str) -> str:
    """A read-only GET from the rig (`remote/http_probe.py get`; python3, as the model step needs
    it anyway)."""
    from . import remote
    return remote.command("http_probe.py", "get", url)


def parse_url_probe(output: str) -> str | None:
    """None when reachable, else the reason."""
    for s in sections.parse(output, ("ok", "fail")):
        return None if s.name == "ok" else (s.arg or "failed")
    tail = [ln for ln in output.splitlines() if ln.strip()]
    return tail[-1].strip() if tail else "no answer from the probe"


# -- git --------------------------------------------------------------------------------------


def git_unreachable(host: str, repo: str, stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    # "fatal: unable to connect to HOST:" + "HOST[0: IP]: errno=Connection refused": keep both
    reason = " ".join(lines[-2:]) if len(lines) >= 2 and lines[-2].endswith(":") else (lines[-1] if lines else "failed")
    reason = reason.removeprefix("fatal: ")
    return f"git remote {repo} unreachable from {host}: {_short_reason(reason)}"


# -- the hub (on the control machine) ---------------------------------------------------------


def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "could not talk to the server" for huggingface_hub's HTTP
    stacks (httpx2 in huggingface_hub 2.x, httpx in 1.x, requests before), plus OSError."""
    types: list[type[BaseException]] = [OSError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:
            continue
        for n in names:
            t = getattr(m, n, None)
            if isinstance(t, type) and issubclass(t, BaseException):
                types.append(t)
    return tuple(types)


def endpoint_host(url: str | None) -> str:
    return urlsplit(url).netloc if url else "huggingface.co"
