"""`tune --apply`: write values into a host's own entry of hosts.yaml by editing only those lines
of the text, so comments, order and everything else survive byte for byte; the new text is kept
only if the inventory still loads and carries exactly those values for the host.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..bench.flags import fmt_num
from ..errors import InventoryError


def _fmt_yaml(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(fmt_num(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return fmt_num(v)
    return str(v)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _key_re(key: str) -> re.Pattern:
    return re.compile(r"^(?P<ind>\s*)(?P<q>['\"]?)" + re.escape(key) + r"(?P=q)\s*:(?P<rest>.*)$")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line that belongs to the block opened at `start` (deeper-indented
    content; trailing blank/comment lines are not counted as part of it)."""
    end = start + 1
    i = start + 1
    while i < len(lines):
        if _content(lines[i]):
            if _indent(lines[i]) <= indent:
                break
            end = i + 1
        i += 1
    return end


def _find_child(lines: list[str], start: int, end: int, indent: int, key: str) -> int | None:
    """Line index of `key:` directly under the block (start, end) whose own indent is `indent`."""
    rx = _key_re(key)
    child_ind = None
    for i in range(start + 1, end):
        if not _content(lines[i]):
            continue
        ind = _indent(lines[i])
        if ind <= indent:
            break
        if child_ind is None:
            child_ind = ind
        if ind == child_ind and rx.match(lines[i]):
            return i
    return None


def _child_indent(lines: list[str], start: int, end: int, indent: int) -> int:
    for i in range(start + 1, end):
        if _content(lines[i]) and _indent(lines[i]) > indent:
            return _indent(lines[i])
    return indent + 2


def set_host_values(text: str, host: str, section: str, values: dict[str, Any]) -> str:
    """Set section.key for each of `values` in hosts.<host> of a hosts.yaml text, touching only
    those lines (comments, order and everything else stay byte for byte)."""
    nl = "\n"
    lines = text.split(nl)
    hosts_i = next((i for i, ln in enumerate(lines) if _key_re("hosts").match(ln) and _indent(ln) == 0), None)
    if hosts_i is None:
        raise InventoryError("hosts.yaml: no top-level 'hosts:'")
    h_end = _block_end(lines, hosts_i, 0)
    host_i = _find_child(lines, hosts_i, h_end, 0, host)
    if host_i is None:
        raise InventoryError(f"hosts.yaml: host {host!r} not found under hosts:")
    host_ind = _indent(lines[host_i])
    m = _key_re(host).match(lines[host_i])
    if m and m.group("rest").split("#")[0].strip():
        raise InventoryError(f"hosts.yaml: host {host!r} is written in flow style; edit it by hand")
    hb_end = _block_end(lines, host_i, host_ind)
    sec_i = _find_child(lines, host_i, hb_end, host_ind, section)
    if sec_i is None:
        ci = _child_indent(lines, host_i, hb_end, host_ind)
        new = [" " * ci + f"{section}:"] + [" " * (ci + 2) + f"{k}: {_fmt_yaml(v)}" for k, v in values.items()]
        lines[hb_end:hb_end] = new
        return nl.join(lines)
    sec_ind = _indent(lines[sec_i])
    ms = _key_re(section).match(lines[sec_i])
    if ms and ms.group("rest").split("#")[0].strip():
        raise InventoryError(f"hosts.yaml: host {host!r}: {section} is written in flow style; edit it by hand")
    for k, v in values.items():
        s_end = _block_end(lines, sec_i, sec_ind)
        ki = _find_child(lines, sec_i, s_end, sec_ind, k)
        val = _fmt_yaml(v)
        if ki is None:
            ci = _child_indent(lines, sec_i, s_end, sec_ind)
            lines.insert(s_end, " " * ci + f"{k}: {val}")
            continue
        mk = _key_re(k).match(lines[ki])
        rest = mk.group("rest")
        cm = re.search(r"(\s+#.*)$", rest)
        comment = cm.group(1) if cm else ""
        body = rest[: cm.start()] if cm else rest
        pre = lines[ki][: len(lines[ki]) - len(rest)]
        lead = re.match(r"\s*", body).group(0) or " "
        lines[ki] = f"{pre}{lead}{val}{comment}"
        if not body.strip():  # a block value (`- 0.9` lines) follows: drop it
            k_ind = _indent(lines[ki])
            last = ki
            for j in range(ki + 1, len(lines)):
                if not _content(lines[j]):
                    continue
                if _indent(lines[j]) > k_ind or (lines[j].lstrip().startswith("-") and _indent(lines[j]) == k_ind):
                    last = j
                else:
                    break
            del lines[ki + 1:last + 1]
    return nl.join(lines)


def apply_to_inventory(path: str | Path, host: str, values: dict[str, Any], section: str = "server") -> str:
    """Edit hosts.yaml in place (atomic), after checking that the edited file loads and carries
    exactly these values for the host. Returns the unified diff ("" when nothing changed)."""
    from .. import inventory as inv
    from ..engine import file_diff
    p = Path(path)
    before = p.read_text()
    after = set_host_values(before, host, section, values)
    if after == before:
        return ""
    fd, tmp = tempfile.mkstemp(prefix=".hosts-", suffix=".yaml", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(after)
        try:
            loaded = inv.load(tmp)
        except InventoryError as e:
            raise InventoryError(f"tune --apply: the edited inventory does not load, nothing written: {e}") from None
        got_section = loaded.hosts[host].cfg[section]
        for k, v in values.items():
            got = got_section.get(k)
            if (list(map(float, got)) if isinstance(v, list) and got else got) != (list(map(float, v)) if isinstance(v, list) else v):
                raise InventoryError(f"tune --apply: after the edit {section}.{k} reads {got!r}, not {v!r} "
                                     "(a --set or a later layer overrides it?); nothing written")
        os.chmod(tmp, os.stat(p).st_mode & 0o7777)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return file_diff(str(p), before, after)
