"""llama-server's `/metrics` (Prometheus text format, `--metrics`) as numbers.

    llamacpp:prompt_tokens_total 21            counters since start
    llamacpp:tokens_predicted_total 8
    llamacpp:prompt_tokens_seconds 486.415     prefill t/s since the previous scrape (gauge)
    llamacpp:predicted_tokens_seconds 3315.96  generation t/s since the previous scrape (gauge)
    llamacpp:requests_processing 0             in flight now
    llamacpp:requests_deferred 0               waiting for a slot
"""
from __future__ import annotations

import math
import re

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)(?:\s+\d+)?$")
PREFIX = "llamacpp:"


def parse(text: str) -> dict[str, float]:
    """Sample name -> value; `llamacpp:` is dropped from names, labelled samples keep
    `name{labels}`. Comments, blank lines and values that are not numbers are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            v = float(m["value"])
        except ValueError:
            continue
        if math.isnan(v):
            continue
        name = m["name"][len(PREFIX):] if m["name"].startswith(PREFIX) else m["name"]
        out[f"{name}{{{m['labels']}}}" if m["labels"] else name] = v
    return out


def summary(m: dict[str, float]) -> dict[str, float | None]:
    """What `invoke status` shows: requests now and waiting, t/s, token totals."""
    return {"requests_processing": m.get("requests_processing"),
            "requests_deferred": m.get("requests_deferred"),
            "predicted_tokens_seconds": m.get("predicted_tokens_seconds"),
            "prompt_tokens_seconds": m.get("prompt_tokens_seconds"),
            "tokens_predicted_total": m.get("tokens_predicted_total"),
            "prompt_tokens_total": m.get("prompt_tokens_total"),
            "n_decode_total": m.get("n_decode_total")}
