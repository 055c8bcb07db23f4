"""The REAL opencode client (npm opencode-ai, pinned) for tests: installed once into the test
cache (see tests/NPM_INSTALL), run with an isolated HOME/XDG dirs and OPENCODE_CONFIG."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.rigs import flocked

VERSION = "1.18.33"
CACHE = Path(os.environ.get("LLAMA_RIG_TEST_CACHE", "/var/cache/llama-rig-tests"))
DEST = CACHE / "opencode"
BIN = DEST / "node_modules" / ".bin" / "opencode"


def ensure_opencode() -> Path:
    with flocked(CACHE / "opencode.lock"):
        ok = BIN.exists() and subprocess.run([str(BIN), "--version"], capture_output=True, text=True,
                                             timeout=120).stdout.strip() == VERSION
        if not ok:
            DEST.mkdir(parents=True, exist_ok=True)
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(DEST),
                            f"opencode-ai@{VERSION}"], check=True, capture_output=True, timeout=900)
    return BIN


def run(args: list[str], config: Path, home: Path, timeout: float = 300,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """opencode ARGS with OPENCODE_CONFIG=config and an empty, private HOME/XDG tree."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".local/state"),
           "OPENCODE_CONFIG": str(config), "OPENCODE_DISABLE_AUTOUPDATE": "1", "NO_COLOR": "1",
           "TERM": "dumb", **(extra_env or {})}
    return subprocess.run([str(ensure_opencode()), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(home), stdin=subprocess.DEVNULL)
