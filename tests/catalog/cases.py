"""The catalog's cases, generated from the inventory SCHEMA: for every key, every hostile or
malformed value that fits its kind (strings for string keys, numbers for number keys, items for
lists, keys and values for mappings). `{canary}` in a payload is replaced by a path that must
never appear."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from provision import inventory as inv

CONTROL = {  # must be refused by EVERY string key
    "newline_unit_line": "x\nUser=root",
    "newline_exec": "/x\nExecStartPre=/bin/touch {canary}",
    "carriage_return": "x\rExecStartPre=/bin/true",
    "nul": "x\x00y",
    "tab": "a\tb",
    "escape_seq": "x\x1b[2J",
    "delete": "x\x7f",
    "c1_next_line": "x\x85y",
    "line_separator": "x\u2028y",
    "bidi_override": "x\u202eexe.txt",
    "long": "a" * 100_000,
}
SHELL = {  # hostile for a shell, an option parser or systemd: refused, or proven harmless
    "dash_option": "--upload-pack=touch {canary};",
    "dash_o": "-oAPT::Get::AllowUnauthenticated=1",
    "command_subst": "$(touch {canary})",
    "backticks": "`touch {canary}`",
    "semicolon": "x; touch {canary}",
    "and_and": "x && touch {canary}",
    "pipe": "x | tee {canary}",
    "single_quote": "x' ; touch {canary}; '",
    "double_quote": 'x"; touch {canary}; "',
    "redirect": "x > {canary}",
    "systemd_specifier": "%n-%h-%u",
    "systemd_env": "$HOME${{PATH}}",
    "glob_brace": "{{a,b}}*?[x]",
    "ifs_subst": "$(touch${{IFS}}{canary})",
    "abs_path_subst": "/tmp/$(touch {canary})",
    "abs_path_semicolon": "/tmp/x;touch {canary}",
    "abs_path_quote": "/tmp/x' ;touch {canary};'",
    "abs_path_space": "/tmp/a b/c",
    "abs_path_percent": "/tmp/%n/$HOME",
    "ext_transport": "ext::sh -c touch% {canary}",
    "opencode_subst": "{{file:/etc/shadow}}",
    "empty": "",
    "blank": " ",
}
# extra payloads for particular keys: what a careless user writes there (all must be refused)
KEY_EXTRA = {
    # llama.cpp's RPC server has no authentication: never a wildcard, public or resolvable bind
    ("rpc", "bind"): {"wildcard_v4": "0.0.0.0", "wildcard_v6": "::", "wildcard_v6_brackets": "[::]",
                      "mapped_wildcard": "::ffff:0.0.0.0", "public_v4": "8.8.8.8",
                      "public_v6": "2001:4860:4860::8888", "multicast": "224.0.0.1",
                      "hostname": "worker.lan", "localhost_name": "localhost", "with_port": "10.0.0.2:50052",
                      "zone": "fe80::1%eth0"},
    ("rpc", "address"): {"wildcard_v4": "0.0.0.0", "public_v4": "1.1.1.1", "hostname": "main.lan"},
    ("rpc", "workers"): {"unknown_host": ["nosuchhost"], "self": ["rig"]},
    ("rpc", "gpus"): {"negative": ["-1"], "comma_list": ["0,1"], "uuid": ["GPU-0f1e"]},
}
NON_STRING = {"integer_for_string": None, "list_for_string": ["a", "b"], "mapping_for_string": {"a": 1}}
NUMBER = {
    "word": "abc", "shell": "1; touch {canary}", "nan": math.nan, "inf": math.inf, "negative": -1,
    "huge_int": 10 ** 400, "huge_float": 1e308, "bool": True, "list": [1], "mapping": {},
    "hex_string": "0x10", "long_string": "9" * 100_000,
}
BOOL = {"string_yes": "yes", "integer": 1, "shell": "true; touch {canary}", "list": [True]}


@dataclass(frozen=True)
class Case:
    id: str
    section: str | None  # None: a top-level host key (lock, description)
    key: str
    value: Any
    payload: str  # name of the payload

    def fill(self, canary: str) -> Any:
        return _fill(self.value, canary)

    @property
    def path(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key


def _fill(v: Any, canary: str) -> Any:
    if isinstance(v, str):
        return v.format(canary=canary) if "{" in v else v
    if isinstance(v, list):
        return [_fill(x, canary) for x in v]
    if isinstance(v, dict):
        return {_fill(k, canary): _fill(x, canary) for k, x in v.items()}
    return v


def _strings(sec, key, f: inv.F) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [*CONTROL.items()]
    if f.choices:  # an enum: a few stand-ins are enough
        out += [(p, SHELL[p]) for p in ("dash_option", "command_subst", "semicolon", "empty")]
    else:
        out += list(SHELL.items())
    out += [("list_for_string", ["a", "b"]), ("mapping_for_string", {"a": 1})]
    return out


def generate() -> list[Case]:
    cases: list[Case] = []

    def add(sec, key, payload, value):
        cases.append(Case(f"{sec + '.' if sec else ''}{key}={payload}", sec, key, value, payload))

    fields = [(sec, k, f) for sec, fs in inv.SCHEMA.items() for k, f in fs.items()]
    fields += [(None, k, f) for k, f in inv.TOP_LEVEL_HOST_KEYS.items()]
    for sec, key, f in fields:
        k = f.kind
        if k == "str":
            for name, v in _strings(sec, key, f):
                add(sec, key, name, v)
        elif k in ("int", "num"):
            for name, v in NUMBER.items():
                add(sec, key, name, v)
        elif k == "bool":
            for name, v in BOOL.items():
                add(sec, key, name, v)
        elif k in ("list_str", "str_or_list"):
            for name, v in [*CONTROL.items(), *SHELL.items()]:
                add(sec, key, "item_" + name, ["ok", v] if k == "list_str" else ["86", v])
            add(sec, key, "mapping", {"a": "b"})
            add(sec, key, "too_many_items", ["x"] * 1001)
            add(sec, key, "item_mapping", [{"a": 1}])
        elif k in ("list_num", "num_or_list"):
            for name, v in (("item_word", [1, "x"]), ("item_nan", [1, math.nan]), ("item_inf", [math.inf]),
                            ("item_negative", [1, -1]), ("shell_string", "1,2;touch {canary}"),
                            ("empty_list", []), ("mapping", {"a": 1}), ("too_many_items", [1] * 1001)):
                add(sec, key, name, v)
        elif k == "dict_str":
            for name, v in [*CONTROL.items(), *SHELL.items()]:
                add(sec, key, "key_" + name, {v: "1"})
                add(sec, key, "value_" + name, {"GGML_X": v})
            add(sec, key, "value_list", {"GGML_X": [1]})
            add(sec, key, "list", ["GGML_X=ON"])
        else:
            raise AssertionError(k)
        for name, v in KEY_EXTRA.get((sec, key), {}).items():
            add(sec, key, name, v)
    return cases


CASES = generate()
