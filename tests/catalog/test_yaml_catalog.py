"""YAML loading: what YAML allows is accepted (anchors, aliases, merge keys with overrides);
duplicate keys are refused with line and column; depth and size are bounded with a clear line;
no RecursionError, no traceback, no value echoed whole -- for inventories and lock files."""
from __future__ import annotations

import pytest

from provision import inventory as inv
from provision import lock as lk
from provision import values
from provision.errors import ExitStatus, InventoryError, UsageError
from tests.catalog import record

PART = "YAML loading"
H = "hosts:\n  rig:\n    connection: {address: 10.0.0.5}\n"

ACCEPTED = [  # (id, text, {dotted path on host 'rig' (or 'host:path'): expected value})
    ("merge_key_then_override", """\
x-base: &base
  connection: {address: 10.0.0.5, port: 22}
  server: {port: 8000, ctx_size: 4096}
hosts:
  rig:
    <<: *base
    server: {port: 9000}
""", {"server.port": 9000, "server.ctx_size": 262144, "connection.port": 22}),
    ("merge_inside_a_section", """\
defaults:
  server: &srv {port: 8001, ctx_size: 8192, parallel: 2}
hosts:
  rig:
    connection: {address: 10.0.0.5}
    server:
      <<: *srv
      port: 9001
      parallel: 4
""", {"server.port": 9001, "server.ctx_size": 8192, "server.parallel": 4}),
    ("merge_list_of_mappings", """\
x-a: &a {port: 2222, user: rigadmin}
x-b: &b {port: 2200, connect_timeout: 5}
hosts:
  rig:
    connection:
      <<: [*a, *b]
      address: 10.0.0.5
""", {"connection.port": 2222, "connection.user": "rigadmin", "connection.connect_timeout": 5}),
    ("alias_of_a_list", """\
x-pkgs: &pkgs [cmake, git]
hosts:
  rig:
    connection: {address: 10.0.0.5}
    system: {packages: *pkgs, extra_packages: *pkgs}
""", {"system.packages": ["cmake", "git"], "system.extra_packages": ["cmake", "git"]}),
    ("anchor_in_one_host_alias_in_another", """\
hosts:
  rig:
    connection: &c {address: 10.0.0.5, port: 2022}
  rig2:
    connection: *c
""", {"rig2:connection.port": 2022}),
    ("same_key_in_two_mappings", """\
hosts:
  rig:
    connection: {address: 10.0.0.5, port: 22}
    server: {port: 8000}
""", {"server.port": 8000, "connection.port": 22}),
    ("depth_64_is_fine", "x-deep: " + "[" * 60 + "]" * 60 + "\n" + H, {}),
    ("flow_and_block_styles", H.replace("{address: 10.0.0.5}", "\n      address: 10.0.0.5"), {}),
    ("quoted_keys", "hosts:\n  'rig':\n    \"connection\": {'address': \"10.0.0.5\"}\n", {}),
    ("document_start_and_end", "---\n" + H + "...\n", {}),
    ("comments_everywhere", "# top\nhosts: # hosts\n  rig: # a rig\n    connection: {address: 10.0.0.5} # there\n", {}),
    ("crlf_line_ends", H.replace("\n", "\r\n"), {}),
    ("utf8_bom", "\ufeff" + H, {}),
]

REFUSED = [  # (id, text, expected message (exact) or a prefix ending in '*')
    ("duplicate_explicit_key", H + "    server: {port: 1}\n    server: {port: 2}\n",
     "hosts.yaml: line 5, column 5: YAML syntax error: duplicate key 'server'"),
    ("duplicate_key_after_merge", """\
x-b: &b {port: 1}
hosts:
  rig:
    connection:
      <<: *b
      address: 10.0.0.5
      port: 2
      port: 3
""", "hosts.yaml: line 8, column 7: YAML syntax error: duplicate key 'port'"),
    ("duplicate_host", H + "  rig:\n    connection: {address: 10.0.0.6}\n",
     "hosts.yaml: line 4, column 3: YAML syntax error: duplicate key 'rig'"),
    ("duplicate_flow_key", "hosts:\n  rig: {connection: {address: a, address: b}}\n",
     "hosts.yaml: line 2, column 34: YAML syntax error: duplicate key 'address'"),
    ("nesting_2000_levels", H + "    server: " + "[" * 2000 + "]" * 2000 + "\n",
     "hosts.yaml: line 4, column 74: YAML syntax error: nested more than 64 levels deep"),
    ("nesting_2000_mappings", H + "    server: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n",
     "hosts.yaml: line 4, column 254: YAML syntax error: nested more than 64 levels deep"),
    ("nesting_block_style", "hosts:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 80)),
     "hosts.yaml: line 64, column 127: YAML syntax error: nested more than 64 levels deep"),
    ("integer_5000_digits", H + "    server: {port: " + "9" * 5000 + "}\n",
     "hosts.yaml: line 4, column 20: YAML syntax error: integer too long"),
    ("value_100k_echo_cut", H + "    server: {port: 'x" + "a" * 100_000 + "'}\n",
     "hosts.yaml: host 'rig': server.port: must be an integer between 1 and 65535, got a string "
     "'x" + "a" * 59 + "…'"),
    ("key_1000_echo_cut", H + "    server: {" + "k" * 1000 + ": 1}\n",
     "hosts.yaml: host 'rig': server.'" + "k" * 60 + "…': unknown key"),
    ("explicit_key_100k_echo_cut", H + "    server:\n      ? " + "k" * 100_000 + "\n      : 1\n",
     "hosts.yaml: host 'rig': server.'" + "k" * 60 + "…': unknown key"),
    ("host_name_1000", "hosts:\n  " + "r" * 1000 + ": {}\n",
     "hosts.yaml: hosts: invalid host name '" + "r" * 60 + "…'"),
    ("plain_key_over_1024_chars", "hosts:\n  " + "r" * 2000 + ": {}\n",
     "hosts.yaml: line 2, column 2003: YAML syntax error: mapping values are not allowed here"),
    ("host_name_newline", "hosts:\n  \"r\\nx\": {}\n", "hosts.yaml: hosts: invalid host name 'r\\nx'"),
    ("host_name_dots", "hosts:\n  '../../etc/cron.d/x': {}\n",
     "hosts.yaml: hosts: invalid host name '../../etc/cron.d/x'"),
    ("group_name_newline", H + "groups:\n  \"g\\n\": {hosts: [rig]}\n", "hosts.yaml: groups: invalid group name 'g\\n'"),
    ("unhashable_key", H + "    server: {[a]: 1}\n", "hosts.yaml: line 4, column 14: YAML syntax error: found unhashable key"),
    ("python_object_tag", "hosts: !!python/object/apply:os.system ['touch x']\n",
     "hosts.yaml: line 1, column 8: YAML syntax error: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("python_name_tag", "hosts: !!python/name:os.system\n", "hosts.yaml: line 1, column 8: YAML syntax error: *"),
    ("unknown_local_tag", H + "    server: !weird {port: 1}\n", "hosts.yaml: line 4, column 13: YAML syntax error: *"),
    ("undefined_alias", H + "    server: *nothing\n",
     "hosts.yaml: line 4, column 13: YAML syntax error: found undefined alias 'nothing'"),
    ("recursive_alias", "hosts: &h\n  rig: *h\n", "hosts.yaml: host 'rig': rig: unknown key"),
    ("self_list_alias", H + "    server:\n      extra_args: &e [a, *e]\n",
     "hosts.yaml: host 'rig': server.extra_args: item 1 must be a string, got a list"),
    ("billion_laughs", "x-a: &a [x, x, x, x, x, x, x, x, x]\nx-b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "x-c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nx-d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     + H + "    server: {extra_args: *d}\n",
     "hosts.yaml: host 'rig': server.extra_args: item 0 must be a string, got a list"),
    ("timestamp_for_string", H + "    llama_cpp: {ref: 2024-01-01}\n",
     "hosts.yaml: host 'rig': llama_cpp.ref: must be a string, got date"),
    ("binary_for_string", H + "    llama_cpp: {ref: !!binary aGVsbG8=}\n",
     "hosts.yaml: host 'rig': llama_cpp.ref: must be a string, got bytes"),
    ("null_key", H + "    server: {~: 1}\n", "hosts.yaml: host 'rig': server.None: unknown key"),
    ("tab_indent", "hosts:\n\trig: {}\n", "hosts.yaml: line 2, column 1: YAML syntax error: *"),
    ("two_documents", H + "---\n" + H, "hosts.yaml: line 4, column 1: YAML syntax error: *"),
    ("unclosed_quote", H + "    server: {alias: 'x}\n", "hosts.yaml: line 5, column 1: YAML syntax error: *"),
    ("unknown_top_level", "hostss:\n  rig: {}\n", "hosts.yaml: hostss: unknown top-level key (did you mean 'hosts'?)"),
    ("x_prefix_only_top_level", H.replace("connection", "x-conn: {}\n    connection"),
     "hosts.yaml: host 'rig': x-conn: unknown key"),
]


def _write(tmp_path, text: str):
    p = tmp_path / "hosts.yaml"
    p.write_text(text, encoding="utf-8", newline="")
    return p


def _get(cfg: dict, dotted: str):
    sec, key = dotted.split(".")
    return cfg[sec][key]


@pytest.mark.parametrize("text,expect", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_yaml_accepted(tmp_path, request, text, expect):
    i = inv.load(_write(tmp_path, text))
    for path, want in expect.items():
        host, _, dotted = path.rpartition(":")
        assert _get(i.hosts[host or "rig"].cfg, dotted) == want, path
    record(PART, request.node.callspec.id, "harmless")


@pytest.mark.parametrize("text,message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_yaml_refused_one_line(tmp_path, request, text, message):
    with pytest.raises(InventoryError) as ei:
        inv.load(_write(tmp_path, text))
    msg = str(ei.value)
    if message.endswith("*"):
        assert msg.startswith(message[:-1]), msg
    else:
        assert msg == message
    assert ei.value.status == ExitStatus.BAD_INPUT
    assert values.bad_char(msg) is None and len(msg) < 400
    record(PART, request.node.callspec.id, "refused")


def test_file_size_bounded(tmp_path):
    p = _write(tmp_path, H + "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(InventoryError) as ei:
        inv.load(p)
    assert str(ei.value) == "hosts.yaml: 2.0 MiB is too large for an inventory (at most 1 MiB)"
    record(PART, "yaml file_size_2MiB", "refused")


def test_lock_file_uses_the_same_loader(tmp_path):
    p = tmp_path / "rig.lock.yaml"
    p.write_text("lock: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(UsageError) as ei:
        lk.load(p)
    assert str(ei.value) == f"{p}: not valid YAML: line 1, column 70: YAML syntax error: nested more than 64 levels deep"
    p.write_text("lock: {format: 1, format: 1}\n")
    with pytest.raises(UsageError) as ei:
        lk.load(p)
    assert "duplicate key 'format'" in str(ei.value)
    record(PART, "yaml lock_file_depth_and_duplicates", "refused")


def test_set_values_use_the_same_loader():
    """--set VALUE is YAML too: deep nesting is refused as bad input, never a RecursionError."""
    over = inv.parse_overrides(["server.extra_args=" + "[" * 5000 + "]" * 5000])
    # the unparsable YAML stays the literal text; the schema refuses it as one line
    with pytest.raises(InventoryError) as ei:
        inv.from_data({"hosts": {"rig": {"connection": {"address": "10.0.0.5"}}}}, overrides=over)
    assert str(ei.value).startswith("command line: server.extra_args: must be a list of strings, got a string")
    record(PART, "yaml set_value_depth", "refused")
