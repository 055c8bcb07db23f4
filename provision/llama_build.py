"""Pure functions behind the `llama` step: ref kinds, tree facts, CMake flags, fingerprints,
build-directory names, `llama-server --version` parsing, ninja progress. No I/O here."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from . import sections

# -- refs -------------------------------------------------------------------------------------

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SHORT_SHA_RE = re.compile(r"^[0-9a-f]{7,39}$")
TAG_RE = re.compile(r"^(b\d+|v\d+\.\d+\.\d+.*)$")


def ref_kind(ref: str) -> str:
    """`commit` (40 hex), `tag` (bNNNN / vX.Y.Z), `short` (7-39 hex: a short commit or a branch)
    or `branch`."""
    if SHA_RE.match(ref):
        return "commit"
    if TAG_RE.match(ref):
        return "tag"
    if SHORT_SHA_RE.match(ref):
        return "short"
    return "branch"


def parse_ls_remote(output: str, ref: str) -> str | None:
    """The commit `ref` names in `git ls-remote` output: a peeled tag wins over the tag object,
    a tag over a branch."""
    refs: dict[str, str] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and SHA_RE.match(parts[0]):
            refs[parts[1]] = parts[0]
    for name in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
        if name in refs:
            return refs[name]
    return None


def local_rev(ref: str) -> list[str]:
    """Revisions to try, in order, inside a clone whose remote is `origin`."""
    kind = ref_kind(ref)
    if kind == "commit":
        return [ref]
    if kind == "tag":
        return [f"refs/tags/{ref}", f"refs/remotes/origin/{ref}"]
    if kind == "short":
        return [f"refs/remotes/origin/{ref}", ref]
    return [f"refs/remotes/origin/{ref}", f"refs/tags/{ref}"]


# -- tree facts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeFacts:
    """What a checked-out llama.cpp tree offers (read with one command, see tree_script)."""

    fa_flag: str | None  # "GGML_CUDA_FA_QUANTS" (new) | "GGML_CUDA_FA_ALL_QUANTS" (old) | None
    targets: frozenset[str] = frozenset()
    commit_count: int | None = None
    shallow: bool = False
    short_commit: str | None = None  # what `git rev-parse --short` gives (as the build prints it)

    @property
    def rpc_target(self) -> str | None:
        for t in ("ggml-rpc-server", "rpc-server"):
            if t in self.targets:
                return t
        return None


def tree_script(src: str, commit: str) -> str:
    """One read-only command: reads the tree from git objects (works before checkout too)."""
    s, c = shlex.quote(src), shlex.quote(commit)
    g = f"git -C {s}"
    return "; ".join([
        "export LC_ALL=C",
        f"echo '@@fa'; {g} show {c}:ggml/CMakeLists.txt 2>/dev/null"
        " | grep -oE '(option|set)[[:space:]]*\\([[:space:]]*GGML_CUDA_FA_(ALL_)?QUANTS\\b' | sed -E 's/.*\\(\\s*//'",
        f"echo '@@targets'; {g} grep -h -E 'set[[:space:]]*\\([[:space:]]*TARGET[[:space:]]|add_executable[[:space:]]*\\(' {c}"
        " -- 'tools/*CMakeLists.txt' 'examples/*CMakeLists.txt' 2>/dev/null",
        f"echo '@@count'; {g} rev-list --count {c} 2>/dev/null",
        f"echo '@@shallow'; {g} rev-parse --is-shallow-repository 2>/dev/null",
        f"echo '@@short'; {g} rev-parse --short {c} 2>/dev/null",
        "true",
    ])


_TARGET_RE = re.compile(r"(?:set\s*\(\s*TARGET\s+|add_executable\s*\(\s*)([A-Za-z0-9_.+-]+)")


def parse_tree(output: str) -> TreeFacts:
    sec = {k: [ln.strip() for ln in v if ln.strip()]
           for k, v in sections.split(output, ("fa", "targets", "count", "shallow", "short")).items()}
    fa_names = {m.group(0) for ln in sec["fa"]
                for m in re.finditer(r"GGML_CUDA_FA_(?:ALL_)?QUANTS\b", ln)}
    fa = ("GGML_CUDA_FA_QUANTS" if "GGML_CUDA_FA_QUANTS" in fa_names
          else "GGML_CUDA_FA_ALL_QUANTS" if "GGML_CUDA_FA_ALL_QUANTS" in fa_names else None)
    targets = set()
    for ln in sec["targets"]:
        for m in _TARGET_RE.finditer(ln):
            name = m.group(1)
            if "$" not in name:
                targets.add(name)
    count = int(sec["count"][0]) if sec["count"] and sec["count"][0].isdigit() else None
    shallow = bool(sec["shallow"]) and sec["shallow"][0] == "true"
    short = sec["short"][0] if sec["short"] else None
    return TreeFacts(fa, frozenset(targets), count, shallow, short)


# -- CUDA architectures -------------------------------------------------------------------------


def gpu_archs(override: Any, compute_caps: Iterable[str | None]) -> list[str]:
    """CMAKE_CUDA_ARCHITECTURES values: the inventory override wins, else one per distinct
    compute capability found (8.6 -> 86), sorted numerically."""
    if override not in (None, "auto", [], ["auto"]):
        vals = [override] if isinstance(override, str) else list(override)
        out = []
        for v in vals:
            for part in str(v).replace(",", ";").split(";"):
                part = part.strip()
                if part and part not in out:
                    out.append(part)
        return out
    found = set()
    for cc in compute_caps:
        if cc:
            found.add(cc.strip().replace(".", ""))
    return sorted(found, key=lambda a: (int(re.sub(r"\D", "", a) or 0), a))


# -- CMake arguments ------------------------------------------------------------------------

_OPT_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(:[A-Z]+)?$")


class BuildConfigError(ValueError):
    """The inventory asks for something this tree/box cannot build (message is one line)."""


def onoff(v: bool) -> str:
    return "ON" if v else "OFF"


def build_targets(cfg: dict, tree: TreeFacts) -> tuple[list[str], list[str]]:
    """(targets to build, configured targets this tree lacks). llama-server is mandatory."""
    lc = cfg["llama_cpp"]
    want = list(dict.fromkeys(lc["targets"]))
    if "llama-server" not in want:
        want.insert(0, "llama-server")
    if lc["rpc"]:
        rpc = tree.rpc_target
        if rpc is None and tree.targets:
            raise BuildConfigError("llama_cpp.rpc is on but this tree has neither ggml-rpc-server "
                                   "nor rpc-server")
        want.append(rpc or "ggml-rpc-server")
    if not tree.targets:  # unknown (not read): trust the inventory
        return want, []
    missing = [t for t in want if t not in tree.targets]
    if "llama-server" in missing:
        raise BuildConfigError("this llama.cpp tree has no llama-server target")
    return [t for t in want if t not in missing], missing


def cmake_args(cfg: dict, tree: TreeFacts, archs: Sequence[str],
               build_number: int | None = None, build_commit: str | None = None) -> list[str]:
    """Every -D/-G argument of the configure command, in a stable order (fingerprinted).
    `build_number`/`build_commit` are passed when the clone cannot tell them (shallow)."""
    lc = cfg["llama_cpp"]
    args = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
            f"-DGGML_NATIVE={onoff(lc['native'])}",
            "-DGGML_CCACHE=ON",
            f"-DLLAMA_USE_PREBUILT_UI={onoff(lc['prebuilt_ui'])}"]
    if lc["cuda"]:
        if not archs:
            raise BuildConfigError("llama_cpp.cuda is on but no GPU compute capability was found "
                                   "(set llama_cpp.cuda_architectures, e.g. 86)")
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}"]
        if lc["fa_all_quants"]:
            if tree.fa_flag == "GGML_CUDA_FA_QUANTS":
                args.append("-DGGML_CUDA_FA_QUANTS=all")
            else:  # old trees (and unknown ones) only know the boolean
                args.append("-DGGML_CUDA_FA_ALL_QUANTS=ON")
    else:
        args.append("-DGGML_CUDA=OFF")
    args.append(f"-DGGML_RPC={onoff(lc['rpc'])}")
    if build_number is not None:
        args.append(f"-DLLAMA_BUILD_NUMBER={build_number}")
    if build_commit:
        args.append(f"-DLLAMA_BUILD_COMMIT={build_commit}")
    for k, v in (lc.get("cmake_options") or {}).items():
        if not _OPT_KEY_RE.match(str(k)):
            raise BuildConfigError(f"llama_cpp.cmake_options: {k!r} is not a CMake variable name")
        args.append(f"-D{k}={v}")
    return args


def describe(cfg: dict, tree: TreeFacts, archs: Sequence[str]) -> str:
    """`CUDA 86, FA all quants` / `CPU only` (+ RPC)."""
    lc = cfg["llama_cpp"]
    parts = []
    if lc["cuda"]:
        parts.append(f"CUDA {','.join(archs)}")
        parts.append("FA all quants" if lc["fa_all_quants"] else "FA default quants")
    else:
        parts.append("CPU only")
    if lc["rpc"]:
        parts.append("RPC")
    if lc["cmake_options"]:
        parts.append("+" + ",".join(lc["cmake_options"]))
    return ", ".join(parts)


# -- fingerprint / names ----------------------------------------------------------------------


def fingerprint(commit: str, args: Sequence[str], gcc: str | None, nvcc: str | None,
                archs: Sequence[str], targets: Sequence[str] = (), glibc: str | None = None) -> str:
    """sha256 over everything that changes the binaries (hex).

    `glibc` (the C library the binaries link against, "2.36") joined the fingerprint when builds
    started moving between rigs (`provision --from`): a binary needs a glibc at least as new as
    the one it was built with. Without it (not known) the blob is exactly the old one, so builds
    made before keep their fingerprint; `steps.llama.RigView.match` accepts such a build on its
    own rig (its glibc only moves forward within a release) instead of rebuilding everything."""
    d: dict[str, Any] = {"commit": commit, "args": list(args), "gcc": gcc or "", "nvcc": nvcc or "",
                         "archs": list(archs), "targets": sorted(targets)}
    if glibc:
        d["glibc"] = glibc
    blob = json.dumps(d, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


GLIBC_CMD = "getconf GNU_LIBC_VERSION 2>/dev/null; true"


def parse_glibc(output: str) -> str | None:
    """`glibc 2.36` -> "2.36"; None where there is no glibc (musl) or no getconf."""
    m = re.search(r"glibc\s+([0-9][0-9.]*)", output or "")
    return m.group(1) if m else None


def build_dir_name(build_number: int | None, commit: str, fp: str) -> str:
    return f"b{build_number if build_number is not None else 0}-{commit[:7]}-{fp[:8]}"


# -- version / help ---------------------------------------------------------------------------

_VERSION_NEW = re.compile(r"version:\s*\S+\s*\(build\s+(\d+),\s*commit\s+([0-9a-zA-Z]+)\)")
_VERSION_OLD = re.compile(r"version:\s*(\d+)\s*\(([0-9a-zA-Z]+)\)")


def parse_version(text: str) -> tuple[int, str]:
    """`version: 6895 (4341dc8bc)` or `version: 0.5.0-dev (build 6895, commit 4341dc8bc)` ->
    (6895, "4341dc8bc"). Raises ValueError on anything else."""
    for rx in (_VERSION_NEW, _VERSION_OLD):
        m = rx.search(text or "")
        if m:
            return int(m.group(1)), m.group(2)
    first = (text or "").strip().splitlines()[:1]
    raise ValueError(f"cannot parse llama-server --version output: {first[0] if first else '(empty)'!r}")


def version_matches(parsed: tuple[int, str], build_number: int | None, commit: str) -> bool:
    n, c = parsed
    if c == "unknown" or not commit.startswith(c):
        return False
    return build_number is None or n == build_number


def server_flags(cfg: dict) -> list[str]:
    """Every llama-server flag the service step will pass (from the inventory `server` section)."""
    s = cfg["server"]
    flags = ["-m", "--host", "--port", "-ngl", "-c", "-ctk", "-ctv", "--parallel", "--split-mode",
             "--temp", "--top-p", "--top-k", "--min-p", "--alias", "-fa"]
    if s.get("tensor_split"):
        flags.append("-ts")
    if (cfg.get("rpc") or {}).get("endpoints"):
        flags.append("--rpc")
    if not s.get("warmup"):
        flags.append("--no-warmup")
    if s.get("jinja"):
        flags.append("--jinja")
    if s.get("api_key", "auto") != "none":  # the key file (provision/steps/api_key.py)
        flags.append("--api-key-file")
    if s.get("metrics", True):
        flags.append("--metrics")
    if not s.get("slots", False):
        flags.append("--no-slots")
    if s.get("batch_size"):
        flags.append("-b")
    if s.get("ubatch_size"):
        flags.append("-ub")
    for a in s.get("extra_args") or []:
        if a.startswith("-") and not _is_number(a):
            flags.append(a.split("=", 1)[0])
    return list(dict.fromkeys(flags))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def missing_flags(help_text: str, flags: Iterable[str]) -> list[str]:
    """Flags that do not appear as a whole word in `llama-server --help`."""
    out = []
    for f in flags:
        if not re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", help_text):
            out.append(f)
    return out


# -- progress ---------------------------------------------------------------------------------

_NINJA_RE = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")


def ninja_progress(line: str) -> tuple[int, int, str] | None:
    m = _NINJA_RE.match(line.strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3)


def is_compile(desc: str) -> bool:
    return desc.startswith("Building ") and " object " in desc


# -- ccache -----------------------------------------------------------------------------------


def parse_ccache_stats(output: str) -> dict[str, int]:
    """`ccache --print-stats` (tab separated) -> {"hits": .., "misses": ..} (+ raw keys)."""
    raw: dict[str, int] = {}
    for line in output.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().lstrip("-").isdigit():
            raw[parts[0].strip()] = int(parts[1])
    hits = raw.get("direct_cache_hit", 0) + raw.get("preprocessed_cache_hit", 0)
    misses = raw.get("cache_miss", 0)
    return {"hits": hits, "misses": misses, **{k: v for k, v in raw.items()
                                               if k in ("cache_size_kibibyte", "files_in_cache")}}


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {"hits": after.get("hits", 0) - before.get("hits", 0),
            "misses": after.get("misses", 0) - before.get("misses", 0)}


# -- builds kept --------------------------------------------------------------------------------


@dataclass
class BuildInfo:
    """A good build on the rig (from its llama-rig-build.json)."""

    name: str
    fingerprint: str
    commit: str
    build_number: int | None
    built_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def prune(builds: Sequence[BuildInfo], keep: int, current: str | None,
          previous: str | None) -> list[str]:
    """Names of good builds to delete: all but the newest `keep`; never current or previous."""
    ordered = sorted(builds, key=lambda b: b.built_at, reverse=True)
    keep_names = {b.name for b in ordered[:keep]}
    return [b.name for b in ordered if b.name not in keep_names and b.name not in (current, previous)]
