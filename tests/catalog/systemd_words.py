"""Read an Exec*= value back the way systemd does (extract_first_word with EXTRACT_UNQUOTE |
EXTRACT_CUNESCAPE per word, then `%%` -> `%` specifiers, then `$$` -> `$` at exec time).

Only what llama-rig writes needs to round-trip, but a lone `%` or `$` (which systemd would expand)
and an unquoted `;` (systemd's command separator) are reported as errors, not read as text.
tests/catalog/test_canary.py checks the same lines against a real systemd."""
from __future__ import annotations

_ESC = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b",
        "f": "\f", "v": "\v", "s": " "}


def exec_words(value: str) -> list[str]:
    words: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            return [_resolve(w) for w in words]
        if value[i] == ";" and (i + 1 == n or value[i + 1] in " \t"):
            raise ValueError("an unquoted ';' separates commands in systemd")
        word, quote = [], None
        while i < n:
            c = value[i]
            if quote is None and c in " \t":
                break
            if c == "\\":
                if i + 1 >= n:
                    raise ValueError("trailing backslash")
                nxt = value[i + 1]
                if nxt not in _ESC:
                    raise ValueError(f"escape \\{nxt} not expected")
                word.append(_ESC[nxt])
                i += 2
                continue
            if quote is None and c in "\"'":
                quote = c
            elif c == quote:
                quote = None
            else:
                word.append(c)
            i += 1
        if quote is not None:
            raise ValueError("unbalanced quote")
        words.append("".join(word))


def _resolve(word: str) -> str:
    return unescape_dollar(unescape_percent(word))


def unescape_percent(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "%":
            if s[i + 1: i + 2] != "%":
                raise ValueError(f"a lone % would be a systemd specifier in {s!r}")
            out.append("%")
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def unescape_dollar(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "$":
            if s[i + 1: i + 2] != "$":
                raise ValueError(f"a lone $ would be an environment variable in {s!r}")
            out.append("$")
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def unit_settings(text: str) -> list[tuple[str, str]]:
    """(key, raw value) of every setting line, in order; section headers as ('[Section]', '')."""
    out = []
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            out.append((line, ""))
            continue
        key, sep, val = line.partition("=")
        if not sep:
            raise ValueError(f"not a setting line: {line!r}")
        out.append((key, val))
    return out
