"""Inventory validation: every bad inventory is ONE line naming file, host/group/defaults and key
path (exit status 2 through the CLI, before any host is contacted); the good path and precedence."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision.errors import ExitStatus, InventoryError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).with_name("data")

# (case id, hosts.yaml text, the exact one-line message)
BAD = [
    ('top_unknown',
     'host:\n  rig: {}\n',
     "hosts.yaml: host: unknown top-level key (did you mean 'hosts'?)"),
    ('top_unknown2',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ndefualts: {}\n',
     "hosts.yaml: defualts: unknown top-level key (did you mean 'defaults'?)"),
    ('defaults_unknown_section',
     'defaults:\n  sever: {port: 1}\nhosts:\n  rig:\n    connection: {address: 10.0.0.5}\n',
     "hosts.yaml: defaults: sever: unknown key (did you mean 'server'?)"),
    ('defaults_unknown_key',
     'defaults:\n  paths: {prefx: /opt}\nhosts:\n  rig:\n    connection: {address: 10.0.0.5}\n',
     "hosts.yaml: defaults: paths.prefx: unknown key (did you mean 'prefix'?)"),
    ('group_unknown_key',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  g:\n    hosts: [rig]\n    gpus: {cont: 2}\n',
     "hosts.yaml: group 'g': gpus.cont: unknown key (did you mean 'count'?)"),
    ('group_unknown_section',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  g:\n    hosts: [rig]\n    gpu: {count: 2}\n',
     "hosts.yaml: group 'g': gpu: unknown key (did you mean 'gpus'?)"),
    ('host_unknown_key',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {prot: 8000}\n',
     "hosts.yaml: host 'rig': server.prot: unknown key (did you mean 'port'?)"),
    ('host_unknown_section_nomatch',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    zzzzzz: {}\n',
     "hosts.yaml: host 'rig': zzzzzz: unknown key"),
    ('host_unknown_connection_key',
     "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    llama_cpp: {cuda_arch: '86'}\n",
     "hosts.yaml: host 'rig': llama_cpp.cuda_arch: unknown key (did you mean 'cuda_architectures'?)"),
    ('port_string',
     "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {port: '8000'}\n",
     "hosts.yaml: host 'rig': server.port: must be an integer between 1 and 65535, got a string '8000'"),
    ('port_zero',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {port: 0}\n',
     "hosts.yaml: host 'rig': server.port: must be an integer between 1 and 65535, got 0"),
    ('port_high',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5, port: 70000}\n',
     "hosts.yaml: host 'rig': connection.port: must be an integer between 1 and 65535, got 70000"),
    ('port_bool',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {port: yes}\n',
     "hosts.yaml: host 'rig': server.port: must be an integer between 1 and 65535, got a boolean True"),
    ('port_float',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {port: 80.5}\n',
     "hosts.yaml: host 'rig': server.port: must be an integer between 1 and 65535, got 80.5"),
    ('port_null',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server:\n      port:\n',
     "hosts.yaml: host 'rig': server.port: has no value (leave the key out to get the default, 8000)"),
    ('power_limit_low',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 2, power_limit: 5}\n',
     "hosts.yaml: host 'rig': gpus.power_limit: must be a number between 10 and 2000, got 5"),
    ('power_limit_high',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 2, power_limit: 2500}\n',
     "hosts.yaml: host 'rig': gpus.power_limit: must be a number between 10 and 2000, got 2500"),
    ('power_limit_item',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 2, power_limit: [300, hot]}\n',
     "hosts.yaml: host 'rig': gpus.power_limit: item 1 must be a number between 10 and 2000, got a string 'hot'"),
    ('power_limit_len',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 6, power_limit: [300, 300, 300]}\n',
     "hosts.yaml: host 'rig': gpus.power_limit: has 3 values but gpus.count is 6"),
    ('power_limit_list_no_count',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {power_limit: [300, 300]}\n',
     "hosts.yaml: host 'rig': gpus.power_limit: a list needs gpus.count"),
    ('gpus_count_negative',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: -1}\n',
     "hosts.yaml: host 'rig': gpus.count: must be an integer between 0 and 64, got -1"),
    ('ctx_negative',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {ctx_size: -1}\n',
     "hosts.yaml: host 'rig': server.ctx_size: must be an integer between 0 and 16777216, got -1"),
    ('ctx_huge',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {ctx_size: 99999999}\n',
     "hosts.yaml: host 'rig': server.ctx_size: must be an integer between 0 and 16777216, got 99999999"),
    ('parallel_zero',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {parallel: 0}\n',
     "hosts.yaml: host 'rig': server.parallel: must be an integer between 1 and 1024, got 0"),
    ('parallel_gt_ctx',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {parallel: 64, ctx_size: 32}\n',
     "hosts.yaml: host 'rig': server.parallel: 64 slots exceed server.ctx_size 32"),
    ('tensor_split_short',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 6}\n    server: {tensor_split: [1, 1, 1, 1, 1]}\n',
     "hosts.yaml: host 'rig': server.tensor_split: has 5 values but gpus.count is 6 (a missing GPU must not silently become a 5-way split)"),
    ('tensor_split_long',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 2}\n    server: {tensor_split: [1, 1, 1]}\n',
     "hosts.yaml: host 'rig': server.tensor_split: has 3 values but gpus.count is 2"),
    ('tensor_split_zero',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 2}\n    server: {tensor_split: [0, 0]}\n',
     "hosts.yaml: host 'rig': server.tensor_split: the values must not all be 0"),
    ('tensor_split_negative',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {count: 2}\n    server: {tensor_split: [1, -1]}\n',
     "hosts.yaml: host 'rig': server.tensor_split: item 1 must be a number between 0 and 1000, got -1"),
    ('tensor_split_from_group',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  g:\n    hosts: [rig]\n    gpus: {count: 4}\n    server: {tensor_split: [1, 1]}\n',
     "hosts.yaml: host 'rig': server.tensor_split: has 2 values but gpus.count is 4 (a missing GPU must not silently become a 2-way split)"),
    ('cuda_string',
     "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    llama_cpp: {cuda: 'yes'}\n",
     "hosts.yaml: host 'rig': llama_cpp.cuda: must be true or false, got a string 'yes'"),
    ('cache_type_choice',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {cache_type_k: q9_0}\n',
     "hosts.yaml: host 'rig': server.cache_type_k: must be one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, got 'q9_0'"),
    ('host_key_policy_choice',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5, host_key_policy: loose}\n',
     "hosts.yaml: host 'rig': connection.host_key_policy: must be one of strict, accept-new, got 'loose'"),
    ('connection_type_choice',
     'hosts:\n  rig:\n    connection: {type: telnet, address: 10.0.0.5}\n',
     "hosts.yaml: host 'rig': connection.type: must be one of ssh, local, got 'telnet'"),
    ('packages_string',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    system: {packages: cmake}\n',
     "hosts.yaml: host 'rig': system.packages: must be a list of strings, got a string"),
    ('packages_item_mapping',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    system: {extra_packages: [cmake, {name: git}]}\n',
     "hosts.yaml: host 'rig': system.extra_packages: item 1 must be a string, got a mapping"),
    ('cmake_options_list',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    llama_cpp: {cmake_options: {GGML_CUDA: [1]}}\n',
     "hosts.yaml: host 'rig': llama_cpp.cmake_options: value of 'GGML_CUDA' must be a string or number, got a list"),
    ('cmake_options_not_mapping',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    llama_cpp: {cmake_options: [GGML_CUDA=ON]}\n',
     "hosts.yaml: host 'rig': llama_cpp.cmake_options: must be a mapping, got a list"),
    ('section_not_mapping',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: 8000\n',
     "hosts.yaml: host 'rig': server: must be a mapping, got an integer"),
    ('host_not_mapping',
     'hosts:\n  rig: [1, 2]\n',
     "hosts.yaml: host 'rig': must be a mapping, got a list"),
    ('connect_timeout_zero',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5, connect_timeout: 0}\n',
     "hosts.yaml: host 'rig': connection.connect_timeout: must be a number between 1 and 300, got 0"),
    ('address_missing',
     'hosts:\n  rig:\n    connection: {user: root}\n',
     "hosts.yaml: host 'rig': connection.address: required for an ssh connection"),
    ('address_missing_no_connection',
     'hosts:\n  rig: {}\n',
     "hosts.yaml: host 'rig': connection.address: required for an ssh connection"),
    ('prefix_relative',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    paths: {prefix: opt/llama}\n',
     "hosts.yaml: host 'rig': paths.prefix: must be an absolute path, got 'opt/llama'"),
    ('model_dir_relative',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    model: {dir: models}\n',
     "hosts.yaml: host 'rig': model.dir: must be an absolute path, got 'models'"),
    ('service_user_root',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    paths: {service_user: root}\n',
     "hosts.yaml: host 'rig': paths.service_user: must be an unprivileged user name, got 'root'"),
    ('service_user_bad',
     "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    paths: {service_user: 'll ama'}\n",
     "hosts.yaml: host 'rig': paths.service_user: must be an unprivileged user name, got 'll ama'"),
    ('ubatch_gt_batch',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {batch_size: 512, ubatch_size: 1024}\n',
     "hosts.yaml: host 'rig': server.ubatch_size: 1024 is larger than server.batch_size 512"),
    ('fa_off_quant_v',
     "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {flash_attn: 'off'}\n",
     "hosts.yaml: host 'rig': server.flash_attn: a quantized V cache (q8_0) needs flash attention (auto or on)"),
    ('fa_bool',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {flash_attn: off}\n',
     "hosts.yaml: host 'rig': server.flash_attn: a quantized V cache (q8_0) needs flash attention (auto or on)"),
    ('include_empty',
     "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    model: {include: ' '}\n",
     "hosts.yaml: host 'rig': model.include: must not be empty"),
    ('top_p_range',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {top_p: 1.5}\n',
     "hosts.yaml: host 'rig': server.top_p: must be a number between 0 and 1, got 1.5"),
    ('temp_nan',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    server: {temp: .nan}\n',
     "hosts.yaml: host 'rig': server.temp: must be a number between 0 and 5, got nan"),
    ('lock_type',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    lock: [a]\n',
     "hosts.yaml: host 'rig': lock: must be a string, got a list"),
    ('hosts_missing',
     'defaults: {}\n',
     'hosts.yaml: hosts: must be a non-empty mapping of host names'),
    ('hosts_empty',
     'hosts: {}\n',
     'hosts.yaml: hosts: must be a non-empty mapping of host names'),
    ('hosts_list',
     'hosts: [rig]\n',
     'hosts.yaml: hosts: must be a non-empty mapping of host names'),
    ('host_name_space',
     "hosts:\n  'my rig':\n    connection: {address: 10.0.0.5}\n",
     "hosts.yaml: hosts: invalid host name 'my rig'"),
    ('host_name_comma',
     "hosts:\n  'a,b':\n    connection: {address: 10.0.0.5}\n",
     "hosts.yaml: hosts: invalid host name 'a,b'"),
    ('group_unknown_host',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  g:\n    hosts: [rgi]\n',
     "hosts.yaml: group 'g': hosts: unknown host 'rgi' (did you mean 'rig'?)"),
    ('group_hosts_not_list',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  g:\n    hosts: rig\n',
     "hosts.yaml: group 'g': hosts: must be a list of host names"),
    ('group_same_as_host',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  rig:\n    hosts: [rig]\n',
     "hosts.yaml: group 'rig': a group cannot have the name of a host"),
    ('group_not_mapping',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups:\n  g: [rig]\n',
     "hosts.yaml: group 'g': must be a mapping, got a list"),
    ('groups_not_mapping',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\ngroups: [g]\n',
     'hosts.yaml: groups: must be a mapping of group names'),
    ('defaults_not_mapping',
     'defaults: [1]\nhosts:\n  rig:\n    connection: {address: 10.0.0.5}\n',
     'hosts.yaml: defaults: must be a mapping, got a list'),
    ('top_list',
     '- rig\n- rig2\n',
     'hosts.yaml: top level must be a mapping with defaults/groups/hosts, got a list'),
    ('top_scalar',
     'just text\n',
     'hosts.yaml: top level must be a mapping with defaults/groups/hosts, got a string'),
    ('empty',
     '',
     "hosts.yaml: empty file (expected 'hosts:')"),
    ('comments_only',
     '# nothing here\n\n',
     "hosts.yaml: empty file (expected 'hosts:')"),
    ('yaml_bad_indent',
     'hosts:\n  rig:\n    connection:\n      address: 10.0.0.5\n     port: 22\n',
     "hosts.yaml: line 5, column 6: YAML syntax error: expected <block end>, but found '<block mapping start>'"),
    ('yaml_unclosed_flow',
     'hosts:\n  rig: {connection: {address: 10.0.0.5}\n',
     "hosts.yaml: line 3, column 1: YAML syntax error: expected ',' or '}', but got '<stream end>'"),
    ('yaml_tab',
     'hosts:\n\trig: {}\n',
     "hosts.yaml: line 2, column 1: YAML syntax error: found character '\\t' that cannot start any token"),
    ('yaml_duplicate_host',
     'hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n  rig:\n    connection: {address: 10.0.0.6}\n',
     "hosts.yaml: line 4, column 3: YAML syntax error: duplicate key 'rig'"),
    ('yaml_python_tag',
     'hosts: !!python/object:os.system {}\n',
     "hosts.yaml: line 1, column 8: YAML syntax error: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'"),
]


def _load_text(tmp_path: Path, text: str, overrides=None):
    p = tmp_path / "hosts.yaml"
    p.write_text(text)
    return inv.load(p, overrides)


def test_there_are_at_least_30_distinct_bad_inventories():
    assert len(BAD) >= 30
    assert len({c[0] for c in BAD}) == len(BAD)
    assert len({c[1] for c in BAD}) == len(BAD)


@pytest.mark.parametrize("text,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_inventory_exact_message(tmp_path, text, message):
    with pytest.raises(InventoryError) as ei:
        _load_text(tmp_path, text)
    assert str(ei.value) == message
    assert "\n" not in str(ei.value)
    assert ei.value.status == ExitStatus.BAD_INPUT == 2


def test_not_utf8(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_bytes(b"hosts:\n  rig:\n    description: caf\xe9\n")
    with pytest.raises(InventoryError) as ei:
        inv.load(p)
    assert str(ei.value) == "hosts.yaml: not UTF-8 text (byte 34)"


def test_missing_file(tmp_path):
    with pytest.raises(InventoryError) as ei:
        inv.load(tmp_path / "nope.yaml")
    assert str(ei.value) == f"nope.yaml: file not found ({tmp_path / 'nope.yaml'})"


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "hosts.yaml").mkdir()
    with pytest.raises(InventoryError) as ei:
        inv.load(tmp_path / "hosts.yaml")
    assert str(ei.value) == "hosts.yaml: cannot read: Is a directory"


def test_data_files_bad_inventories():
    """The bad inventories kept as files under tests/data/ (also used by the CLI tests)."""
    expected = {
        "bad_unknown_key.yaml": "bad_unknown_key.yaml: host 'rig': server.prot: unknown key (did you mean 'port'?)",
        "bad_yaml.yaml": "bad_yaml.yaml: line 5, column 6: YAML syntax error: expected <block end>, but found '<block mapping start>'",
        "bad_tensor_split.yaml": "bad_tensor_split.yaml: host 'rig': server.tensor_split: has 5 values but gpus.count is 6 (a missing GPU must not silently become a 5-way split)",
        "bad_group_member.yaml": "bad_group_member.yaml: group 'rtx3090': hosts: unknown host 'rgi' (did you mean 'rig'?)",
        "empty.yaml": "empty.yaml: empty file (expected 'hosts:')",
    }
    for name, message in expected.items():
        with pytest.raises(InventoryError) as ei:
            inv.load(DATA / name)
        assert str(ei.value) == message, name


# ----------------------------------------------------------------------------- --set

SET_BAD = [
    (["server.port=abc"], "command line: server.port: must be an integer between 1 and 65535, got a string 'abc'"),
    (["server.port=0"], "command line: server.port: must be an integer between 1 and 65535, got 0"),
    (["serverport=1"], "command line: --set serverport=1: expected SECTION.KEY=VALUE"),
    (["server.port"], "command line: --set server.port: expected SECTION.KEY=VALUE"),
    (["server.prot=8001"], "command line: server.prot: unknown key (did you mean 'port'?)"),
    (["sever.port=8001"], "command line: sever: unknown key (did you mean 'server'?)"),
    (["server.port="], "command line: server.port: has no value (leave the key out to get the default, 8000)"),
    (["llama_cpp.cuda=maybe"], "command line: llama_cpp.cuda: must be true or false, got a string 'maybe'"),
    (["gpus.power_limit=[300, 300]"], "hosts.yaml: host 'rig': gpus.power_limit: has 2 values but gpus.count is 6"),
]


@pytest.mark.parametrize("sets,message", SET_BAD, ids=[s[0][0] for s in SET_BAD])
def test_bad_set(sets, message):
    with pytest.raises(InventoryError) as ei:
        inv.load(REPO / "hosts.yaml", inv.parse_overrides(sets))
    assert str(ei.value) == message


# ----------------------------------------------------------------------------- selection

def test_unknown_host_on_command_line():
    i = inv.load(REPO / "hosts.yaml")
    with pytest.raises(InventoryError) as ei:
        i.select("rgi")
    assert str(ei.value) == "hosts.yaml: unknown host or group 'rgi' (did you mean 'rig'?)"
    with pytest.raises(InventoryError) as ei:
        i.select("rtx3080")
    assert str(ei.value) == "hosts.yaml: unknown host or group 'rtx3080' (did you mean 'rtx3090'?)"
    with pytest.raises(InventoryError) as ei:
        i.select("zzzz")
    assert str(ei.value) == "hosts.yaml: unknown host or group 'zzzz'"
    with pytest.raises(InventoryError) as ei:
        i.select(None)
    assert str(ei.value) == "hosts.yaml: no host given (use --host NAME, a group, or --all)"
    with pytest.raises(InventoryError) as ei:
        i.select(",")
    assert str(ei.value) == "hosts.yaml: no host selected by ','"


def test_select_hosts_groups_all():
    i = inv.load(REPO / "hosts.yaml")
    assert [h.name for h in i.select("rig")] == ["rig"]
    assert [h.name for h in i.select("rtx3090")] == ["rig"]
    assert [h.name for h in i.select("local, rig,rtx3090")] == ["local", "rig"]
    assert [h.name for h in i.select(None, all_hosts=True)] == ["rig", "local"]


# ----------------------------------------------------------------------------- good path

def test_shipped_hosts_yaml_loads():
    i = inv.load(REPO / "hosts.yaml")
    rig = i.hosts["rig"]
    assert rig.groups == ["rtx3090"]
    assert rig["connection"]["address"] == "192.168.1.50"
    assert rig["connection"]["host_key_policy"] == "strict"
    assert rig["gpus"] == {"count": 6, "model": "NVIDIA GeForce RTX 3090", "power_limit": 350,
                           "persistence": True}
    assert rig["server"]["tensor_split"] == [0.9, 1, 1, 1, 1, 1]
    assert rig["server"]["port"] == 8000 and rig["server"]["ctx_size"] == 262144
    assert rig["server"]["flash_attn"] == "auto"
    assert rig["system"]["packages"] == inv.DEFAULT_PACKAGES
    assert rig["llama_cpp"]["cuda_architectures"] == "auto"
    assert rig.address == "192.168.1.50" and not rig.is_local
    local = i.hosts["local"]
    assert local.is_local and local.address == "localhost" and local.groups == []
    # every schema key is present in the merged settings
    for sec, fields in inv.SCHEMA.items():
        assert set(rig.cfg[sec]) == set(fields), sec


PRECEDENCE = """
defaults:
  server: {port: 8001, ctx_size: 1000, parallel: 2}
  model: {max_attempts: 4}
groups:
  g1:
    hosts: [rig]
    server: {port: 8002, ctx_size: 2000}
    gpus: {count: 2}
  g2:
    hosts: [rig, other]
    server: {top_k: 7}
hosts:
  rig:
    connection: {address: 10.0.0.5}
    server: {port: 8003}
  other:
    connection: {address: 10.0.0.6}
"""


def test_precedence_defaults_group_host_set(tmp_path):
    i = _load_text(tmp_path, PRECEDENCE)
    rig, other = i.hosts["rig"], i.hosts["other"]
    assert rig["server"]["port"] == 8003  # host beats group beats defaults
    assert rig["server"]["ctx_size"] == 2000  # group beats defaults
    assert rig["server"]["parallel"] == 2  # defaults beat built-in default
    assert rig["server"]["top_k"] == 7  # second group
    assert rig["gpus"]["count"] == 2
    assert rig["model"]["max_attempts"] == 4
    assert rig["server"]["temp"] == 0.6  # built-in default untouched
    assert other["server"]["port"] == 8001 and other["server"]["ctx_size"] == 1000
    assert other["gpus"]["count"] == 0
    assert rig.groups == ["g1", "g2"] and other.groups == ["g2"]
    # --set beats everything, for every host
    i = _load_text(tmp_path, PRECEDENCE, inv.parse_overrides(["server.port=9000",
                                                             "server.flash_attn=off",
                                                             "server.cache_type_v=f16"]))
    assert i.hosts["rig"]["server"]["port"] == 9000 == i.hosts["other"]["server"]["port"]
    assert i.hosts["rig"]["server"]["flash_attn"] == "off"  # bare `off` from YAML is a bool
    assert i.hosts["rig"]["server"]["ctx_size"] == 2000


def test_set_value_parsing():
    assert inv.parse_overrides(["server.tensor_split=[1, 1]", "llama_cpp.cuda=false",
                                "server.alias=my model", "model.dir=/data/m"]) == {
        "server": {"tensor_split": [1, 1], "alias": "my model"},
        "llama_cpp": {"cuda": False}, "model": {"dir": "/data/m"}}
    i = inv.load(REPO / "hosts.yaml", inv.parse_overrides(["server.tensor_split=1,1,1,1,1,2"]))
    assert i.hosts["rig"]["server"]["tensor_split"] == [1, 1, 1, 1, 1, 2]


def test_normalisation(tmp_path):
    text = ("hosts:\n  rig:\n    connection: {address: 10.0.0.5, port: 2222.0}\n"
            "    llama_cpp: {cuda_architectures: 86, cmake_options: {GGML_NATIVE: false, X: 3}}\n"
            "    gpus: {count: 2, power_limit: [300, 280.5]}\n")
    rig = _load_text(tmp_path, text).hosts["rig"]
    assert rig["connection"]["port"] == 2222 and isinstance(rig["connection"]["port"], int)
    assert rig["llama_cpp"]["cuda_architectures"] == ["86"]
    assert rig["llama_cpp"]["cmake_options"] == {"GGML_NATIVE": "OFF", "X": "3"}
    assert rig["gpus"]["power_limit"] == [300, 280.5]


def test_null_for_a_key_without_default_is_fine(tmp_path):
    text = ("groups:\n  g:\n    hosts: [rig]\n    gpus: {count: 2, power_limit: 300}\n"
            "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n    gpus: {power_limit: null}\n")
    assert _load_text(tmp_path, text).hosts["rig"]["gpus"]["power_limit"] is None


def test_schema_defaults_are_valid():
    """Each default passes its own check (a schema typo would otherwise reach every host)."""
    problems = []

    def check(sec, key, f):
        v, err = f.check(f.default)
        if err:
            problems.append(f"{sec}.{key}: {err}")
    inv.walk_schema(check)
    assert problems == []


# ----------------------------------------------------------------------------- via the CLI

def _invoke(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def listener():
    """A listening socket; a test asserts that nobody connected to it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def _nobody_connected(sock) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def _write_with_listener(tmp_path, port, extra_host_body=""):
    p = tmp_path / "inv.yaml"
    p.write_text("hosts:\n  rig:\n    connection: {address: 127.0.0.1, port: %d, connect_timeout: 2}\n"
                 % port + extra_host_body)
    return p


@pytest.mark.parametrize("body,args,message", [
    ("    server: {prot: 8000}\n", [],
     "inv.yaml: host 'rig': server.prot: unknown key (did you mean 'port'?)"),
    ("    gpus: {count: 6, power_limit: [300]}\n", [],
     "inv.yaml: host 'rig': gpus.power_limit: has 1 values but gpus.count is 6"),
    ("", ["--set", "server.port=99999"],
     "command line: server.port: must be an integer between 1 and 65535, got 99999"),
    ("", ["--only", "sytem"], None),
], ids=["unknown-key", "power-limit-list", "bad-set", "unknown-step"])
def test_cli_bad_input_exit_2_no_connection(tmp_path, listener, body, args, message):
    p = _write_with_listener(tmp_path, listener.getsockname()[1], body)
    r = _invoke("provision", "--host", "rig", "--inventory", str(p), *args)
    assert r.returncode == 2, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    if message is None:
        assert lines[0] == ("command line: --only: unknown step 'sytem' (did you mean 'system'?); "
                            "steps are: " + ", ".join(__import__("provision.steps", fromlist=["x"]).step_names()))
    else:
        assert lines[0] == message
    assert r.stdout == ""
    assert _nobody_connected(listener)


def test_cli_unknown_host_exit_2_no_connection(tmp_path, listener):
    p = _write_with_listener(tmp_path, listener.getsockname()[1])
    r = _invoke("provision", "--host", "rgi", "--inventory", str(p), "--check")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["inv.yaml: unknown host or group 'rgi' (did you mean 'rig'?)"]
    assert _nobody_connected(listener)


def test_cli_bad_files_exit_2():
    for name in ("bad_yaml.yaml", "empty.yaml", "bad_group_member.yaml"):
        r = _invoke("facts", "--host", "rig", "--inventory", str(DATA / name))
        assert r.returncode == 2, (name, r)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"{name}: "), r.stderr


def test_cuda_architectures_forms(tmp_path):
    def arch(v):
        return inv.load(REPO / "hosts.yaml", inv.parse_overrides([f"llama_cpp.cuda_architectures={v}"])
                        ).hosts["rig"]["llama_cpp"]["cuda_architectures"]
    assert arch("auto") == "auto"
    assert arch("86") == ["86"]
    assert arch("86,89") == ["86", "89"]
    assert arch("[86, 90a]") == ["86", "90a"]
    with pytest.raises(InventoryError) as ei:
        arch("''")
    assert str(ei.value) == ("command line: llama_cpp.cuda_architectures: must be auto or a list "
                             "of strings, got an empty string")
