"""Fingerprints of the primary keys in an OpenPGP keyring (binary `.gpg` or ASCII-armored `.asc`).

Enough of RFC 4880 / RFC 9580 to check an apt keyring against a pinned fingerprint on the
control machine, without gpg on the rig: walk the packets, and for every public-key packet
(tag 6) hash its body — v4: SHA-1 over 0x99, a 2-byte length and the body; v6: SHA-256 over 0x9B,
a 4-byte length and the body. Subkeys (tag 14) sign nothing apt looks at here.
"""
from __future__ import annotations

import base64
import hashlib


class KeyringError(ValueError):
    """Not an OpenPGP keyring (the message says what is wrong)."""


def dearmor(text: str) -> bytes:
    """The bytes of an ASCII-armored block (headers and the CRC line dropped)."""
    lines = text.strip().splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN PGP"))
        end = next(i for i, ln in enumerate(lines) if ln.startswith("-----END PGP") and i > start)
    except StopIteration:
        raise KeyringError("no '-----BEGIN PGP' armor block") from None
    body = lines[start + 1:end]
    if "" in body:  # armor headers (Version: ...) end at the first empty line
        body = body[body.index("") + 1:]
    data = "".join(ln.strip() for ln in body if not ln.startswith("="))
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as e:
        raise KeyringError(f"bad base64 in the armor: {e}") from None


def packets(data: bytes):
    """(tag, body) for every packet."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if not b & 0x80:
            raise KeyringError(f"not an OpenPGP packet at byte {i}")
        if b & 0x40:  # new format
            tag = b & 0x3F
            o = data[i + 1]
            if o < 192:
                length, hdr = o, 2
            elif o < 224:
                length, hdr = ((o - 192) << 8) + data[i + 2] + 192, 3
            elif o == 255:
                length, hdr = int.from_bytes(data[i + 2:i + 6], "big"), 6
            else:
                raise KeyringError("partial-length packet in a keyring")
        else:  # old format
            tag = (b >> 2) & 0x0F
            lt = b & 0x03
            if lt == 3:
                raise KeyringError("indeterminate-length packet in a keyring")
            size = (1, 2, 4)[lt]
            length, hdr = int.from_bytes(data[i + 1:i + 1 + size], "big"), 1 + size
        body = data[i + hdr:i + hdr + length]
        if len(body) != length:
            raise KeyringError("truncated packet")
        yield tag, body
        i += hdr + length


def fingerprint(body: bytes) -> str:
    """Fingerprint (upper-case hex) of a public-key packet body."""
    version = body[0]
    if version == 4:
        h = hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body)
    elif version in (5, 6):
        h = hashlib.sha256((b"\x9a" if version == 5 else b"\x9b") + len(body).to_bytes(4, "big") + body)
    else:
        raise KeyringError(f"public key version {version} is not supported")
    return h.hexdigest().upper()


def primary_fingerprints(data: bytes | str) -> list[str]:
    """Fingerprints of the primary keys in a keyring, in order. Raises KeyringError."""
    if isinstance(data, str):
        data = dearmor(data)
    elif data.lstrip()[:5] == b"-----":
        data = dearmor(data.decode("ascii", "replace"))
    if not data:
        raise KeyringError("empty keyring")
    return [fingerprint(body) for tag, body in packets(data) if tag == 6]


def normalize(fpr: str) -> str:
    """`EB69 3B30 …` / `0xeb69…` -> `EB693B30…`."""
    f = fpr.replace(" ", "").upper()
    return f[2:] if f.startswith("0X") else f
