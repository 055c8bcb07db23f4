"""hosts.yaml: load, merge (defaults < group < host < command line) and validate.

Every problem becomes ONE line naming the file, the host (or section) and the key path, and
raises InventoryError (exit status 2) before any host is contacted.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import values
from .errors import InventoryError
from .values import cut
from .yamlfile import MAX_FILE_BYTES, parse_yaml

_MISSING = object()


@dataclass(frozen=True)
class F:
    """One inventory key: its kind, default and limits."""

    kind: str  # str int num bool list_str list_num dict_str num_or_list str_or_list
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""
    value: str = "text"  # what each string names: a checker in provision.values.CHECKS

    def _text(self, s: str) -> str | None:
        return values.CHECKS[self.value](s)

    def check(self, value: Any) -> tuple[Any, str | None]:
        """Return (normalised value, error text or None)."""
        if value is None:
            if self.default is not None:
                # `port:` with nothing after it would silently replace the default by None
                return None, (f"has no value (leave the key out to get the default, "
                              f"{_show_default(self.default)})")
            return None, None
        k = self.kind
        if k == "str":
            if isinstance(value, bool) and self.choices and {"on", "off"} <= set(self.choices):
                value = "on" if value else "off"  # YAML 1.1 reads a bare `off` as false
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                return value, f"must be a string, got {_tname(value)}"
            if self.choices:
                if value not in self.choices:
                    return value, f"must be one of {', '.join(self.choices)}, got {cut(value)}"
                return value, None
            return value, self._text(value)
        if k == "bool":
            if not isinstance(value, bool):
                return value, f"must be true or false, got {_tname(value)} {value!r}"
            return value, None
        if k in ("int", "num"):
            return self._number(value, integer=(k == "int"))
        if k in ("list_str", "str_or_list"):
            if k == "str_or_list" and isinstance(value, (str, int)) and not isinstance(value, bool):
                if str(value) == "auto":
                    return "auto", None
                # "86,89" (YAML or --set) means two values, not one called "86,89"
                value = [x.strip() for x in str(value).split(",") if x.strip()]
                if not value:
                    return value, "must be auto or a list of strings, got an empty string"
            if not isinstance(value, list):
                return value, f"must be a list of strings, got {_tname(value)}"
            if len(value) > 1000:
                return value, f"has {len(value)} items (at most 1000)"
            out = []
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    v = str(v)
                if not isinstance(v, str):
                    return value, f"item {i} must be a string, got {_tname(v)}"
                err = self._text(v)
                if err:
                    return value, f"item {i} {err}"
                out.append(v)
            return out, None
        if k in ("list_num", "num_or_list"):
            if k == "num_or_list" and not isinstance(value, list):
                return self._number(value, integer=False)
            if isinstance(value, str) and k == "list_num":
                try:
                    value = [float(x) for x in value.split(",")]
                except ValueError:
                    return value, f"must be a list of numbers, got {cut(value)}"
            if not isinstance(value, list) or not value:
                return value, f"must be a non-empty list of numbers, got {_tname(value)}"
            if len(value) > 1000:
                return value, f"has {len(value)} items (at most 1000)"
            out = []
            for i, v in enumerate(value):
                nv, err = self._number(v, integer=False)
                if err:
                    return value, f"item {i} {err}"
                out.append(nv)
            return out, None
        if k == "dict_str":
            if not isinstance(value, dict):
                return value, f"must be a mapping, got {_tname(value)}"
            out = {}
            for kk, vv in value.items():
                err = values.cmake_var(kk)
                if err:
                    return value, f"key {err}"
                if isinstance(vv, bool):
                    vv = "ON" if vv else "OFF"
                if not isinstance(vv, (str, int, float)):
                    return value, f"value of {kk!r} must be a string or number, got {_tname(vv)}"
                err = values.text(str(vv))
                if err:
                    return value, f"value of {kk!r} {err}"
                out[str(kk)] = str(vv)
            return out, None
        raise AssertionError(k)

    def _number(self, value: Any, integer: bool) -> tuple[Any, str | None]:
        what = "an integer" if integer else "a number"
        rng = ""
        if self.lo is not None and self.hi is not None:
            rng = f" between {_fmt(self.lo)} and {_fmt(self.hi)}"
        elif self.lo is not None:
            rng = f" of at least {_fmt(self.lo)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"must be {what}{rng}, got {_tname(value)} {cut(value)}"
        if integer and isinstance(value, float):
            if not value.is_integer():
                return value, f"must be {what}{rng}, got {cut(value)}"
            value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            return value, f"must be {what}{rng}, got {cut(value)}"
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            return value, f"must be {what}{rng}, got {_fmt(value)}"
        return value, None


def _show_default(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{}" if not v else str(v)
    return str(v)


def _fmt(x: float) -> str:
    if isinstance(x, int):
        text = str(x) if x.bit_length() <= 200 else cut(x)
    else:
        text = str(int(x)) if float(x).is_integer() else str(x)
    return text if len(text) <= values.CUT else text[:values.CUT] + "…"


def _key(k: Any) -> str:
    """A key as it appears in a message: as written when plain, else repr; cut."""
    s = str(k)
    if isinstance(k, str) and values.bad_char(s) is None and len(s) <= values.CUT:
        return s
    return cut(k)


def _tname(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(v), type(v).__name__)


CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
DEFAULT_PACKAGES = ["build-essential", "cmake", "git", "ninja-build", "ccache", "libssl-dev",
                    "pkg-config", "curl", "python3-venv", "ca-certificates"]

SCHEMA: dict[str, dict[str, F]] = {
    "connection": {
        "type": F("str", "ssh", choices=("ssh", "local")),
        "address": F("str", None, value="ssh_address"),
        "port": F("int", 22, 1, 65535),
        "user": F("str", "root", value="login_user"),
        "key": F("str", None, value="local_path"),
        "known_hosts": F("str", "~/.ssh/known_hosts", value="local_path"),
        "host_key_policy": F("str", "strict", choices=("strict", "accept-new")),
        "sudo": F("bool", None),
        "sudo_password_env": F("str", None, value="env_name"),
        "connect_timeout": F("num", 10, 1, 300),
        # OpenSSH client config read for Host aliases, User, Port, IdentityFile, ProxyJump
        # (default: $LLAMA_RIG_SSH_CONFIG, else ~/.ssh/config; `none`: read none)
        "ssh_config": F("str", None, value="local_path"),
    },
    "gpus": {
        "count": F("int", 0, 0, 64),
        "model": F("str", None),
        "power_limit": F("num_or_list", None, 10, 2000),
        "persistence": F("bool", True),
    },
    "system": {
        "packages": F("list_str", DEFAULT_PACKAGES, value="deb_package"),
        "extra_packages": F("list_str", [], value="deb_package"),
        "cuda_toolkit": F("str", "cuda-toolkit-12-8", value="deb_package_or_empty"),
        "cuda_repo": F("str", "https://developer.download.nvidia.com/compute/cuda/repos", value="http_url"),
        "cuda_repo_key": F("str", None),  # fingerprint; default: the one pinned for NVIDIA's repo
        "driver": F("str", "require", choices=("require", "install")),
        "driver_package": F("str", None, value="deb_package"),  # default nvidia-open (NVIDIA's repo)
        "kernel_headers": F("bool", None),
        "apt_proxy": F("str", None, value="proxy_url"),
        "reboot_timeout": F("int", 900, 30, 7200),  # provision --reboot: wait this long for SSH
    },
    "llama_cpp": {
        "repo": F("str", "https://github.com/ggml-org/llama.cpp", value="git_url"),
        "ref": F("str", "master", value="git_ref"),
        "cuda": F("bool", True),
        "cuda_architectures": F("str_or_list", "auto", value="cuda_arch"),
        "fa_all_quants": F("bool", True),
        "native": F("bool", True),
        "rpc": F("bool", False),
        "prebuilt_ui": F("bool", True),
        "targets": F("list_str", ["llama-server", "llama-bench", "llama-fit-params"], value="name"),
        "cmake_options": F("dict_str", {}),
        "keep_builds": F("int", 3, 1, 50),
        "jobs": F("int", None, 1, 1024),
    },
    "model": {
        "repo": F("str", "unsloth/Qwen3.5-122B-A10B-GGUF", value="hf_model_id"),
        "revision": F("str", "main", value="git_ref"),
        "include": F("str", "UD-Q6_K_XL/*", value="glob"),
        "dir": F("str", "/var/lib/llama-rig/models", value="abs_path"),
        "token_env": F("str", "HF_TOKEN", value="env_name"),
        "token_file": F("str", None, value="local_path"),
        "endpoint": F("str", None, value="http_url"),
        "hub_requirement": F("str", "huggingface-hub>=2.4,<3", value="pip_requirement"),
        "pip_index_url": F("str", None, value="http_url"),
        "pip_find_links": F("str", None, value="url_or_path"),
        "free_space_margin_gb": F("num", 5, 0, 100000),
        "max_attempts": F("int", 3, 1, 20),
        "hash_workers": F("int", 4, 1, 64),
        "download_workers": F("int", None, 1, 64),
        "xet_high_performance": F("bool", False),
        "xet_chunk_cache_gb": F("num", 0, 0, 100000),
        "keep_versions": F("int", 2, 1, 20),
    },
    "server": {
        "host": F("str", "0.0.0.0", value="host"),
        "port": F("int", 8000, 1, 65535),
        "n_gpu_layers": F("int", 999, 0, 100000),
        "ctx_size": F("int", 262144, 0, 16777216),
        "cache_type_k": F("str", "q8_0", choices=CACHE_TYPES),
        "cache_type_v": F("str", "q8_0", choices=CACHE_TYPES),
        "flash_attn": F("str", "auto", choices=("on", "off", "auto")),
        "parallel": F("int", 1, 1, 1024),
        "split_mode": F("str", "layer", choices=("none", "layer", "row", "tensor")),
        "tensor_split": F("list_num", None, 0, 1000),
        "warmup": F("bool", False),
        "temp": F("num", 0.6, 0, 5),
        "top_p": F("num", 0.95, 0, 1),
        "top_k": F("int", 20, 0, 100000),
        "min_p": F("num", 0.0, 0, 1),
        "jinja": F("bool", True),
        "alias": F("str", "Qwen3.5-122B-A10B-UD-Q6_K_XL", value="alias"),
        # auto: a key made on the rig (/etc/llama-rig/api-key, --api-key-file); none: open
        "api_key": F("str", "auto", choices=("auto", "none")),
        "api_key_file": F("str", None, value="local_path"),
        "batch_size": F("int", None, 1, 1048576),
        "ubatch_size": F("int", None, 1, 1048576),
        "extra_args": F("list_str", [], value="extra_arg"),
        "start_timeout": F("int", 1800, 5, 86400),
        "vram_margin_mib": F("int", 1536, 0, 1048576),
        "metrics": F("bool", True),
        "slots": F("bool", False),
    },
    "paths": {
        "prefix": F("str", "/opt/llama-rig", value="abs_path"),
        "state_dir": F("str", "/var/lib/llama-rig", value="abs_path"),
        "service_user": F("str", "llama", value="service_user"),
    },
    # how other rigs copy from this one (`invoke provision --host B --from THIS`, provision/transfer/)
    "transfer": {
        "mode": F("str", "auto", choices=("auto", "direct", "relay")),
        "address": F("str", None, value="host"),  # where other rigs reach this one (default: connection.address)
        "rate_limit_mb": F("num", 0, 0, 1000000),  # MB/s read here for a copy; 0 = no limit
    },
    # llama.cpp's RPC backend (provision/rpc.py): a main host lists its workers; a worker has a bind
    "rpc": {
        "workers": F("list_str", [], value="name"),  # main: hosts or groups running ggml-rpc-server
        "address": F("str", None, value="rpc_address"),  # main: where the workers see it (nft allow)
        "wait_timeout": F("int", 300, 5, 86400),  # main: seconds to wait for the workers at a start
        "bind": F("str", None, value="rpc_address"),  # worker: the private address it listens on
        "port": F("int", 50052, 1, 65535),  # worker
        "gpus": F("list_str", [], value="gpu_index"),  # worker: GPUs it exposes ([] = all)
        "cache": F("bool", True),  # worker: -c, the tensor cache
        "cache_dir": F("str", None, value="abs_path"),  # worker: default <state_dir>/rpc-cache
        "cache_max_gb": F("num", 0, 0, 1000000),  # worker: pruned to this at each start (0 = no cap)
        "firewall": F("bool", True),  # worker: nft table: only the main hosts reach the port
    },
    "opencode": {
        "enabled": F("bool", True),
        "user": F("str", None, value="login_user"),
        "provider_id": F("str", "llama-cpp", value="name"),
        "base_url": F("str", None, value="http_url"),
        "output_limit": F("int", 32768, 1, 16777216),
    },
}
TOP_LEVEL_HOST_KEYS = {"lock": F("str", None, value="local_path"), "description": F("str", None)}
STEP_SECTIONS = tuple(SCHEMA)


def defaults() -> dict[str, Any]:
    cfg: dict[str, Any] = {sec: {k: copy.deepcopy(f.default) for k, f in fields.items()}
                           for sec, fields in SCHEMA.items()}
    for k, f in TOP_LEVEL_HOST_KEYS.items():
        cfg[k] = f.default
    return cfg


@dataclass
class Host:
    """One resolved host: its name, groups and the merged, validated settings."""

    name: str
    groups: list[str]
    cfg: dict[str, Any]
    source: str = "hosts.yaml"
    # "section.key" of every value the inventory (any layer) or the command line set: these win
    # over ~/.ssh/config (provision.sshconf); None: treat every connection key as set
    explicit: frozenset[str] | None = None
    rpc_workers: list["Host"] = field(default_factory=list, repr=False, compare=False)  # rpc.workers, resolved
    rpc_mains: list["Host"] = field(default_factory=list, repr=False, compare=False)  # hosts that use this worker

    def __getitem__(self, section: str) -> Any:
        return self.cfg[section]

    @property
    def is_local(self) -> bool:
        return self.cfg["connection"]["type"] == "local"

    @property
    def address(self) -> str:
        c = self.cfg["connection"]
        return "localhost" if self.is_local else (c["address"] or self.name)


@dataclass
class Inventory:
    path: Path
    hosts: dict[str, Host]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def select(self, spec: str | None, all_hosts: bool = False) -> list[Host]:
        """`rig`, `rig,rig2`, a group name, or all_hosts. Unknown names -> InventoryError."""
        if all_hosts:
            out = list(self.hosts.values())
            check_control_files(out)
            return out
        if not spec:
            raise InventoryError(f"{self.path.name}: no host given (use --host NAME, a group, or --all)")
        out: list[Host] = []
        for name in [s.strip() for s in spec.split(",") if s.strip()]:
            if name in self.hosts:
                picked = [name]
            elif name in self.groups:
                picked = self.groups[name]
            else:
                raise InventoryError(f"{self.path.name}: unknown host or group {cut(name)}"
                                     + _did_you_mean(name, [*self.hosts, *self.groups]))
            for p in picked:
                if self.hosts[p] not in out:
                    out.append(self.hosts[p])
        if not out:
            raise InventoryError(f"{self.path.name}: no host selected by {cut(spec)}")
        check_control_files(out)
        return out


def _did_you_mean(word: str, options) -> str:
    if len(word) > 200:
        return ""
    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {m[0]!r}?)" if m else ""


def check_control_files(hosts: list[Host]) -> None:
    """What THIS machine must have for a selected host before it is contacted: the SSH key, a
    readable ssh_config without errors, the sudo password's environment variable. A missing or
    bad one is bad input (exit 2), not an unreachable rig. The user and port that ssh_config
    gives (where the inventory sets none) are written into the host's settings."""
    from . import sshconf
    for h in hosts:
        con = h.cfg["connection"]
        where = f"{h.source}: host {_key(h.name)!r}"
        env = con["sudo_password_env"]
        if env:
            pw = os.environ.get(env)
            if not pw:
                raise InventoryError(f"{where}: connection.sudo_password_env: the environment variable "
                                     f"{env} is not set (or empty)")
            if "\n" in pw or "\0" in pw or "\r" in pw:
                raise InventoryError(f"{where}: connection.sudo_password_env: ${env} holds more than "
                                     "one line (a sudo password is one line)")
        if h.is_local:
            continue
        ep = sshconf.resolve(h)
        con["user"], con["port"] = ep.user, ep.port
        key = con["key"]
        if not key:
            continue
        full = os.path.expanduser(key)
        where = f"{where}: connection.key"
        if not os.path.exists(full):
            raise InventoryError(f"{where}: no such file: {values.clip(full, 200)}")
        if not os.path.isfile(full):
            raise InventoryError(f"{where}: not a file: {values.clip(full, 200)}")
        if not os.access(full, os.R_OK):
            raise InventoryError(f"{where}: cannot read {values.clip(full, 200)} (permission denied)")


def _validate_layer(layer: Any, where: str, allow_hosts_key: bool = False) -> dict[str, Any]:
    """Check one layer (defaults, a group, a host, overrides): keys and types. Returns it normalised."""
    if layer is None:
        return {}
    if not isinstance(layer, dict):
        raise InventoryError(f"{where}: must be a mapping, got {_tname(layer)}")
    out: dict[str, Any] = {}
    for sec, body in layer.items():
        if allow_hosts_key and sec == "hosts":
            continue
        if sec in TOP_LEVEL_HOST_KEYS:
            v, err = TOP_LEVEL_HOST_KEYS[sec].check(body)
            if err:
                raise InventoryError(f"{where}: {sec}: {err}")
            out[sec] = v
            continue
        if sec not in SCHEMA:
            extra = ["hosts"] if allow_hosts_key else []
            raise InventoryError(f"{where}: {_key(sec)}: unknown key"
                                 + _did_you_mean(str(sec), [*SCHEMA, *TOP_LEVEL_HOST_KEYS, *extra]))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise InventoryError(f"{where}: {sec}: must be a mapping, got {_tname(body)}")
        fields = SCHEMA[sec]
        norm = {}
        for key, value in body.items():
            if key not in fields:
                raise InventoryError(f"{where}: {sec}.{_key(key)}: unknown key"
                                     + _did_you_mean(str(key), fields))
            v, err = fields[key].check(value)
            if err:
                raise InventoryError(f"{where}: {sec}.{key}: {err}")
            norm[key] = v
        out[sec] = norm
    return out


def check_values(cfg: dict[str, Any], where: str) -> None:
    """Every value of a merged host against its kind again: a lock file (or code) may have put
    values there after the layers were checked."""
    for sec, fields in SCHEMA.items():
        for key, f in fields.items():
            v, err = f.check(cfg[sec][key])
            if err:
                raise InventoryError(f"{where}: {sec}.{key}: {err}")
            cfg[sec][key] = v


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> None:
    for sec, body in layer.items():
        if isinstance(body, dict) and isinstance(base.get(sec), dict):
            base[sec].update(copy.deepcopy(body))
        else:
            base[sec] = copy.deepcopy(body)


def _explicit(layers: list[dict[str, Any]]) -> set[str]:
    return {f"{sec}.{k}" for layer in layers for sec, body in layer.items()
            if isinstance(body, dict) for k in body}


def _split_address(cfg: dict[str, Any], explicit: set[str], where: str) -> None:
    """connection.address `[v6]`, `[v6]:port` or `host:port` -> a bare address (+ the port)."""
    con = cfg["connection"]
    if not con["address"]:
        return
    addr, port = values.split_host_port(con["address"])
    if port is not None:
        if "connection.port" in explicit and con["port"] != port:
            raise InventoryError(f"{where}: connection.port: {con['port']} but connection.address "
                                 f"{cut(con['address'])} says port {port}")
        con["port"] = port
        explicit.add("connection.port")
    con["address"] = addr


def _cross_check(cfg: dict[str, Any], where: str) -> None:
    """Rules that involve more than one key, on the merged settings of a host."""
    check_values(cfg, where)
    con, gpus, srv = cfg["connection"], cfg["gpus"], cfg["server"]
    if con["type"] == "ssh" and not con["address"]:
        raise InventoryError(f"{where}: connection.address: required for an ssh connection")
    n = gpus["count"]
    pl = gpus["power_limit"]
    if isinstance(pl, list):
        if n and len(pl) != n:
            raise InventoryError(f"{where}: gpus.power_limit: has {len(pl)} values but gpus.count is {n}")
        if not n:
            raise InventoryError(f"{where}: gpus.power_limit: a list needs gpus.count")
    ts = srv["tensor_split"]
    if ts is not None:
        if n and len(ts) > n and not cfg["rpc"]["workers"]:
            raise InventoryError(f"{where}: server.tensor_split: has {len(ts)} values but gpus.count is {n}")
        if n and len(ts) != n and not cfg["rpc"]["workers"]:  # with workers: rpc.link_hosts
            raise InventoryError(f"{where}: server.tensor_split: has {len(ts)} values but gpus.count is {n}"
                                 f" (a missing GPU must not silently become a {len(ts)}-way split)")
        if sum(ts) <= 0:
            raise InventoryError(f"{where}: server.tensor_split: the values must not all be 0")
    if srv["parallel"] > max(srv["ctx_size"], 1) and srv["ctx_size"]:
        raise InventoryError(f"{where}: server.parallel: {srv['parallel']} slots exceed server.ctx_size {srv['ctx_size']}")
    if srv["cache_type_v"] not in ("f16", "f32", "bf16") and srv["flash_attn"] == "off":
        raise InventoryError(f"{where}: server.flash_attn: a quantized V cache ({srv['cache_type_v']}) needs flash attention (auto or on)")
    if srv["api_key"] == "none" and srv["api_key_file"]:
        raise InventoryError(f"{where}: server.api_key: none contradicts server.api_key_file "
                             f"{srv['api_key_file']} (drop one of them)")
    if srv["batch_size"] and srv["ubatch_size"] and srv["ubatch_size"] > srv["batch_size"]:
        raise InventoryError(f"{where}: server.ubatch_size: {srv['ubatch_size']} is larger than server.batch_size {srv['batch_size']}")
    inc = cfg["model"]["include"]
    if not inc.strip():
        raise InventoryError(f"{where}: model.include: must not be empty")
    key = cfg["system"]["cuda_repo_key"]
    if key is not None and not re.fullmatch(r"(0[xX])?([0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})", key.replace(" ", "")):
        raise InventoryError(f"{where}: system.cuda_repo_key: must be a full key fingerprint "
                             f"(40 or 64 hex digits), got {key!r}")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set server.port=8001` style overrides (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        shown = cut(item) if len(item) > values.CUT or values.bad_char(item) else item
        if "=" not in item:
            raise InventoryError(f"command line: --set {shown}: expected SECTION.KEY=VALUE")
        key, raw = item.split("=", 1)
        if "." not in key:
            raise InventoryError(f"command line: --set {shown}: expected SECTION.KEY=VALUE")
        sec, k = key.split(".", 1)
        try:
            val = parse_yaml(raw, f"command line: --set {_key(key)}") if raw != "" else None
        except InventoryError:
            val = raw
        out.setdefault(sec, {})[k] = val
    return out


def load(path: str | os.PathLike = "hosts.yaml", overrides: dict[str, Any] | None = None) -> Inventory:
    path = Path(path)
    fname = path.name
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InventoryError(f"{fname}: {size / (1 << 20):.1f} MiB is too large for an inventory "
                                 f"(at most {MAX_FILE_BYTES >> 20} MiB)")
        text = path.read_text()
    except FileNotFoundError:
        raise InventoryError(f"{fname}: file not found ({path})") from None
    except OSError as e:
        raise InventoryError(f"{fname}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InventoryError(f"{fname}: not UTF-8 text (byte {e.start})") from None
    data = parse_yaml(text, fname)
    return from_data(data, fname, path, overrides)


def from_data(data: Any, fname: str = "hosts.yaml", path: Path | None = None,
              overrides: dict[str, Any] | None = None) -> Inventory:
    path = path or Path(fname)
    if data is None:
        raise InventoryError(f"{fname}: empty file (expected 'hosts:')")
    if not isinstance(data, dict):
        raise InventoryError(f"{fname}: top level must be a mapping with defaults/groups/hosts, got {_tname(data)}")
    for k in data:
        if isinstance(k, str) and k.startswith("x-"):
            continue  # a place for anchors (`x-gpu: &gpu {...}`), like compose files
        if k not in ("defaults", "groups", "hosts"):
            raise InventoryError(f"{fname}: {_key(k)}: unknown top-level key"
                                 + _did_you_mean(str(k), ["defaults", "groups", "hosts"]))
    dflt = _validate_layer(data.get("defaults"), f"{fname}: defaults")
    hosts_raw = data.get("hosts")
    if not isinstance(hosts_raw, dict) or not hosts_raw:
        raise InventoryError(f"{fname}: hosts: must be a non-empty mapping of host names")
    for hname in hosts_raw:
        if not _good_name(hname):
            raise InventoryError(f"{fname}: hosts: invalid host name {cut(hname)}")
    groups_raw = data.get("groups") or {}
    if not isinstance(groups_raw, dict):
        raise InventoryError(f"{fname}: groups: must be a mapping of group names")
    groups: dict[str, list[str]] = {}
    group_layers: dict[str, dict] = {}
    for gname, gbody in groups_raw.items():
        if not _good_name(gname):
            raise InventoryError(f"{fname}: groups: invalid group name {cut(gname)}")
        where = f"{fname}: group {gname!r}"
        if gname in hosts_raw:
            raise InventoryError(f"{where}: a group cannot have the name of a host")
        if gbody is None:
            gbody = {}
        if not isinstance(gbody, dict):
            raise InventoryError(f"{where}: must be a mapping, got {_tname(gbody)}")
        members = gbody.get("hosts", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise InventoryError(f"{where}: hosts: must be a list of host names")
        for m in members:
            if m not in hosts_raw:
                raise InventoryError(f"{where}: hosts: unknown host {cut(m)}" + _did_you_mean(m, hosts_raw))
        groups[gname] = list(members)
        group_layers[gname] = _validate_layer(gbody, where, allow_hosts_key=True)
    over = _validate_layer(overrides or {}, "command line")
    hosts: dict[str, Host] = {}
    for hname, hbody in hosts_raw.items():
        where = f"{fname}: host {hname!r}"
        layer = _validate_layer(hbody, where)
        cfg = defaults()
        _merge(cfg, dflt)
        member_of = [g for g, members in groups.items() if hname in members]
        for g in member_of:
            _merge(cfg, group_layers[g])
        _merge(cfg, layer)
        _merge(cfg, over)
        explicit = _explicit([dflt, *(group_layers[g] for g in member_of), layer, over])
        _split_address(cfg, explicit, where)
        _cross_check(cfg, where)
        hosts[hname] = Host(hname, member_of, cfg, fname, frozenset(explicit))
    from .rpc import link_hosts
    link_hosts(hosts, groups, fname)  # rpc.workers -> Host.rpc_workers / rpc_mains, checked
    return Inventory(path, hosts, groups)



_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,63}$")


def _good_name(n: Any) -> bool:
    """A host or group name: it names files (locks/<host>.lock.yaml) and appears in every line."""
    return isinstance(n, str) and bool(_NAME_RE.fullmatch(n))


def walk_schema(fn: Callable[[str, str, F], None]) -> None:
    for sec, fields in SCHEMA.items():
        for k, f in fields.items():
            fn(sec, k, f)
