"""TTFT through the running llama-server: `provision/remote/http_probe.py ttft` runs on the rig and asks
the server itself (127.0.0.1), one prompt of exactly `depth` tokens per depth; the server's own
`timings.prompt_ms` is the measured TTFT.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from .. import remote, sections
from ..steps import service as service_step


def parse_ttft(text: str) -> dict[int, dict[str, Any]]:
    out = {}
    for s in sections.parse(text, ("ttft",)):
        d = json.loads(s.arg)
        out[int(d["depth"])] = d
    return out


def measure_ttft(ctx, depths: Sequence[int], n_prompt: int) -> dict[int, dict[str, Any]]:
    """The API key (read by the service step, registered as a secret) travels on stdin only."""
    key = service_step.read_api_key(ctx.cfg)
    args = {"port": ctx.cfg["server"]["port"], "key": key, "n_prompt": n_prompt, "depths": list(depths)}
    from ..steps import api_key as auth  # no explicit key: the rig's key file, read there as root
    r = ctx.target.run(auth.keyed(ctx.cfg, remote.command("http_probe.py", "ttft")),
                       stdin=json.dumps(args), sudo=auth.enabled(ctx.cfg), check=False, timeout=7200)
    return parse_ttft(r.stdout)
