"""The one HTTP client run ON a rig (stdlib only): llama-server from the box itself, and URLs the
rig must reach. Passed whole to `python3 -c` (or `python3 -` with the source on stdin, as the
unit's readiness gate does); the mode is the first argument:

  wait URL TIMEOUT   the readiness gate (llama-server.service ExecStartPost=, rendered into
                     templates/llama-rig-health.sh.j2): poll URL (/health, open without a key)
                     until HTTP 200; exit 0, else 1 after TIMEOUT seconds with the last answer
  get URL            one GET: is URL reachable from here? prints `@@ok` or `@@fail REASON`
  requests           stdin: {"base": "http://127.0.0.1:PORT", "key": KEY or null, "requests":
                     [{"name", "path", "body" (JSON or null), "auth" (bool), "timeout"}]};
                     prints ONE JSON line {name: [status (0: no answer), body, seconds]}
  ttft               stdin: {"port", "key", "n_prompt", "depths"}: time to first token, one
                     prompt of exactly `depth` token ids per depth (depth 0: n_prompt) to
                     /completion (n_predict 1, cache_prompt false); prints one line per depth
                     `@@ttft {"depth", "n_tokens", "prompt_ms", "prompt_n", "wall_ms"}` (or
                     "error"); prompt_ms is the server's own `timings.prompt_ms`

An API key only ever comes on stdin and goes out as `Authorization: Bearer KEY` (never /health).
"""
import json
import sys
import time
import urllib.error
import urllib.request


def request(base, path, key=None, body=None, timeout=30.0):
    """(status, body text, seconds); status 0 with the reason as body when nothing answered."""
    hdr = {"Content-Type": "application/json"}
    if key:
        hdr["Authorization"] = "Bearer " + key
    r = urllib.request.Request(base + path, headers=hdr, method="GET" if body is None else "POST",
                               data=None if body is None else json.dumps(body).encode())
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace"), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace"), time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 -- every failure is an answer here
        return 0, "%s: %s" % (type(e).__name__, e), time.monotonic() - t0


def wait(url, timeout):
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        status, body, _ = request(url, "", timeout=5)
        if status == 200:
            print("llama-rig-health: %s -> 200" % url, flush=True)
            return 0
        last = "HTTP %d" % status if status else body
        time.sleep(0.25)
    print("llama-rig-health: %s not ready after %gs (%s)" % (url, timeout, last), file=sys.stderr, flush=True)
    return 1


def get(url):
    try:
        urllib.request.urlopen(url, timeout=15).read(1)
        print("@@ok")
    except Exception as e:  # noqa: BLE001
        r = getattr(e, "reason", None)
        print("@@fail " + (str(r) if r is not None else "%s: %s" % (type(e).__name__, e)))
    return 0


def requests(a):
    out = {}
    for q in a["requests"]:
        out[q["name"]] = request(a["base"], q["path"], a.get("key") if q.get("auth", True) else None,
                                 q.get("body"), float(q.get("timeout", 30)))
    print(json.dumps(out))
    return 0


class NoAnswer(Exception):
    """Not HTTP 200: `HTTP 503`, or why nothing answered."""


def ttft(a):
    base = "http://127.0.0.1:%d" % a["port"]
    key, n_prompt = a.get("key"), a["n_prompt"]

    def call(path, body=None):
        status, text, _ = request(base, path, key, body, timeout=3600)
        if status != 200:
            raise NoAnswer("HTTP %d" % status if status else text)
        return json.loads(text)

    n_ctx = None
    try:
        n_ctx = (call("/props").get("default_generation_settings") or {}).get("n_ctx")
    except Exception:  # noqa: BLE001
        pass
    try:
        toks = call("/tokenize", {"content": "The quick brown fox jumps over the lazy dog. " * 8})["tokens"]
        toks = [t if isinstance(t, int) else t["id"] for t in toks] or list(range(100, 164))
    except Exception:  # noqa: BLE001
        toks = list(range(100, 164))

    def prompt(n):
        return (toks * (n // len(toks) + 1))[:n]
    try:
        call("/completion", {"prompt": prompt(8), "n_predict": 1, "cache_prompt": False})
    except Exception:  # noqa: BLE001
        pass
    for d in a["depths"]:
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
            except Exception as e:  # noqa: BLE001
                out["error"] = str(e)[:200] if isinstance(e, NoAnswer) else type(e).__name__ + ": " + str(e)[:200]
        print("@@ttft " + json.dumps(out), flush=True)
    return 0


def main(argv):
    mode = argv[0] if argv else ""
    if mode == "wait" and len(argv) in (2, 3):
        return wait(argv[1], float(argv[2]) if len(argv) > 2 else 60.0)
    if mode == "get" and len(argv) == 2:
        return get(argv[1])
    if mode in ("requests", "ttft") and len(argv) == 1:
        a = json.loads(sys.stdin.read())
        return requests(a) if mode == "requests" else ttft(a)
    print("usage: http_probe.py wait URL [TIMEOUT] | get URL | requests | ttft (JSON on stdin)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
