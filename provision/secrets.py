"""Secrets never reach output: every value registered here is masked in all console output."""
from __future__ import annotations

import threading

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "********"


def register(value: str | None) -> None:
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    if not _secrets or not text:
        return text
    with _lock:
        for s in sorted(_secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, MASK)
    return text
