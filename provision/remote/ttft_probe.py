"""TTFT probe, run ON the rig (stdlib only): time to first token of llama-server itself.

Input (stdin, one JSON object): {"port": 8000, "key": "<api key or null>", "n_prompt": 512,
"depths": [0, 4096, ...]}. For each depth it sends a prompt of exactly `depth` token ids (depth 0:
`n_prompt` tokens) to /completion with n_predict 1 and cache_prompt false, and prints one line
`@@ttft {"depth": d, "n_tokens": n, "prompt_ms": ..., "prompt_n": ..., "wall_ms": ...}` (or
`"error"`). prompt_ms is the server's own `timings.prompt_ms`. The key only ever comes on stdin.
"""
import json, sys, time, urllib.request, urllib.error
a = json.loads(sys.stdin.read())
port, key, n_prompt, depths = a["port"], a.get("key"), a["n_prompt"], a["depths"]
base = "http://127.0.0.1:%d" % port
hdr = {"Content-Type": "application/json"}
if key:
    hdr["Authorization"] = "Bearer " + key
def call(path, body=None, timeout=3600):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=hdr, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())
n_ctx = None
try:
    props = call("/props")
    n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
except Exception:
    pass
try:
    toks = call("/tokenize", {"content": "The quick brown fox jumps over the lazy dog. " * 8})["tokens"]
    toks = [t if isinstance(t, int) else t["id"] for t in toks] or list(range(100, 164))
except Exception:
    toks = list(range(100, 164))
def prompt(n):
    return (toks * (n // len(toks) + 1))[:n]
try:
    call("/completion", {"prompt": prompt(8), "n_predict": 1, "cache_prompt": False})
except Exception:
    pass
for d in depths:
    n = d or n_prompt
    out = {"depth": d, "n_tokens": n}
    if n_ctx and n + 1 > n_ctx:
        out["error"] = "prompt of %d tokens exceeds the server's context of %d" % (n, n_ctx)
    else:
        t0 = time.monotonic()
        try:
            r = call("/completion", {"prompt": prompt(n), "n_predict": 1, "cache_prompt": False,
                                     "temperature": 0})
            t = r.get("timings") or {}
            out.update(prompt_ms=t.get("prompt_ms"), prompt_n=t.get("prompt_n"),
                       wall_ms=(time.monotonic() - t0) * 1000.0)
        except urllib.error.HTTPError as e:
            out["error"] = "HTTP %d" % e.code
        except Exception as e:
            out["error"] = type(e).__name__ + ": " + str(e)[:200]
    print("@@ttft " + json.dumps(out), flush=True)
