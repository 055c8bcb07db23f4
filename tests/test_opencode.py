"""opencode step: the provider block as data, merging into a user's file (kept keys, backup once,
no change when right, malformed untouched), validated by the REAL opencode client, and the step
on a Tier B rig for a configured user."""
from __future__ import annotations

import io
import json
import os

import pytest
import yaml

from provision import inventory as inv
from provision.app import App
from provision.console import Environment
from provision.errors import StepError
from provision.steps import opencode as oc
from tests import opencode_cli


def cfg(**server) -> dict:
    c = inv.defaults()
    c["server"].update({"alias": "tiny-model", "ctx_size": 262144, "parallel": 2, **server})
    return c


URL = "http://10.0.0.5:8000/v1"

USER_FILE = {
    "$schema": "https://opencode.ai/config.json",
    "theme": "tokyonight",
    "model": "anthropic/claude-sonnet-4",
    "provider": {
        "ollama": {"npm": "@ai-sdk/openai-compatible", "options": {"baseURL": "http://x:11434/v1"},
                   "models": {"llama3": {"name": "llama3"}}},
        "llama-cpp": {"options": {"timeout": 600000},
                      "models": {"tiny-model": {"name": "Old", "contextLength": 262144,
                                                "supportsStructuredOutputs": False}}},
    },
}


def test_provider_block_real_schema():
    b = oc.provider_block(cfg(), URL, has_key=True)
    assert b == {
        "npm": "@ai-sdk/openai-compatible",
        "name": "llama.cpp (llama-server)",
        "options": {"baseURL": URL, "apiKey": "{file:llama-rig-llama-cpp.key}"},
        "models": {"tiny-model": {"name": "tiny-model (llama-rig)", "tool_call": True,
                                  "limit": {"context": 131072, "output": 32768}}},
    }
    assert "apiKey" not in oc.provider_block(cfg(), URL, has_key=False)["options"]


def test_output_limit_never_exceeds_the_slot_context():
    b = oc.provider_block(cfg(ctx_size=8192, parallel=1), URL, False)
    assert b["models"]["tiny-model"]["limit"] == {"context": 8192, "output": 8192}


def test_base_url_default_and_override():
    c = cfg(port=8123)
    assert oc.base_url(c, "192.168.1.50") == "http://192.168.1.50:8123/v1"
    c["opencode"]["base_url"] = "https://llm.example/v1/"
    assert oc.base_url(c, "192.168.1.50") == "https://llm.example/v1"


def test_merge_into_empty_sets_models():
    out = oc.merge(None, cfg(), URL, False)
    assert out["model"] == out["small_model"] == "llama-cpp/tiny-model"
    assert out["$schema"] == "https://opencode.ai/config.json"
    assert out["provider"]["llama-cpp"]["options"] == {"baseURL": URL}


def test_merge_keeps_everything_else_and_drops_the_seed_keys():
    out = oc.merge(USER_FILE, cfg(), URL, True)
    assert out["theme"] == "tokyonight"
    assert out["model"] == "anthropic/claude-sonnet-4"  # the user's choice stays
    assert out["small_model"] == "llama-cpp/tiny-model"  # they had none
    assert out["provider"]["ollama"] == USER_FILE["provider"]["ollama"]
    lc = out["provider"]["llama-cpp"]
    assert lc["options"] == {"timeout": 600000, "baseURL": URL, "apiKey": "{file:llama-rig-llama-cpp.key}"}
    assert lc["models"]["tiny-model"] == {"name": "tiny-model (llama-rig)", "tool_call": True,
                                          "limit": {"context": 131072, "output": 32768}}
    assert USER_FILE["provider"]["llama-cpp"]["models"]["tiny-model"]["name"] == "Old"  # input untouched
    assert oc.merge(out, cfg(), URL, True) == out  # idempotent
    # server.api_key: none -> our reference goes (the old {env:...} one too), a user's own stays
    assert "apiKey" not in oc.merge(out, cfg(), URL, False)["provider"]["llama-cpp"]["options"]
    old = json.loads(json.dumps(out))
    old["provider"]["llama-cpp"]["options"]["apiKey"] = "{env:LLAMA_API_KEY}"
    assert "apiKey" not in oc.merge(old, cfg(), URL, False)["provider"]["llama-cpp"]["options"]
    old["provider"]["llama-cpp"]["options"]["apiKey"] = "{env:MY_OWN}"
    assert oc.merge(old, cfg(), URL, False)["provider"]["llama-cpp"]["options"]["apiKey"] == "{env:MY_OWN}"


def test_malformed_is_a_clear_error():
    with pytest.raises(StepError, match=r"is not valid JSON \(line 1, column 11: Expecting value\)"):
        oc.parse('{"theme": }', "rig:/root/.config/opencode/opencode.json")
    with pytest.raises(StepError, match="must hold a JSON object"):
        oc.parse("[1, 2]", "f")


def test_local_apply_backup_once_no_change_when_right(tmp_path):
    path = tmp_path / "opencode" / "opencode.json"
    path.parent.mkdir()
    original = json.dumps(USER_FILE, indent=4)
    path.write_text(original)
    os.chmod(path, 0o640)
    changed, content = oc.apply_local(cfg(), "10.0.0.5", path, check=True)
    assert changed and path.read_text() == original  # --check writes nothing
    changed, content = oc.apply_local(cfg(), "10.0.0.5", path)
    assert changed and path.read_text() == content
    backup = path.with_name("opencode.json.llama-rig.bak")
    assert backup.read_text() == original
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert oc.apply_local(cfg(), "10.0.0.5", path) == (False, content)
    # a second change does not overwrite the backup of the user's original
    changed, _ = oc.apply_local(cfg(port=9000), "10.0.0.5", path)
    assert changed and backup.read_text() == original
    # malformed: error, untouched
    path.write_text('{"theme": ')
    with pytest.raises(StepError, match="not valid JSON"):
        oc.apply_local(cfg(), "10.0.0.5", path)
    assert path.read_text() == '{"theme": '


def test_real_opencode_accepts_the_merged_config(tmp_path):
    path = tmp_path / "opencode.json"
    path.write_text(json.dumps(USER_FILE))
    oc.apply_local(cfg(), "127.0.0.1", path, key="sk-local-test-1")
    assert "sk-local-test-1" not in path.read_text()
    assert (tmp_path / "llama-rig-llama-cpp.key").read_text() == "sk-local-test-1\n"
    assert oct((tmp_path / "llama-rig-llama-cpp.key").stat().st_mode & 0o777) == "0o600"
    r = opencode_cli.run(["debug", "config"], path, tmp_path / "home", timeout=180)
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["provider"]["llama-cpp"]["models"]["tiny-model"]["limit"] == {
        "context": 131072, "output": 32768}
    r = opencode_cli.run(["models", "llama-cpp"], path, tmp_path / "home", timeout=180)
    assert r.returncode == 0, r.stderr
    assert "llama-cpp/tiny-model" in r.stdout.split()
    # and the seed's snippet shape is what opencode rejects/ignores: no limit -> invalid here
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"provider": {"llama-cpp": {"models": {"m": {"limit": {"context": 1}}}}}}))
    r = opencode_cli.run(["debug", "config"], bad, tmp_path / "home", timeout=180)
    assert r.returncode == 1 and "limit.output" in (r.stdout + r.stderr)


# ------------------------------------------------------------------------------------------------
# the step on a Tier B rig, for the sudo user `rigadmin`


def _app(path, *over):
    out = io.StringIO()
    return App(inventory_path=path, overrides=list(over),
               env=Environment(stdout=out, stderr=out, isatty=False)), out


@pytest.mark.rig
def test_opencode_step_on_rig(rig_factory, tmp_path):
    rig = rig_factory(fake_nvidia_smi=False)
    try:
        p = tmp_path / "hosts.yaml"
        p.write_text(yaml.safe_dump({"hosts": {"rig": rig.inventory_entry(
            server={"alias": "tiny-model", "ctx_size": 40960, "parallel": 1, "port": 8080},
            opencode={"user": "rigadmin", "output_limit": 4096})}}))
        conf = "/home/rigadmin/.config/opencode/opencode.json"

        # malformed user file: clear error, untouched
        rig.sh(f"mkdir -p /home/rigadmin/.config/opencode && printf '{{\"theme\": ' > {conf} "
               "&& chown -R rigadmin: /home/rigadmin/.config")
        app, out = _app(str(p))
        assert app.provision("rig", only="opencode") == 1
        assert "is not valid JSON" in out.getvalue() and "leaves it untouched" in out.getvalue()
        assert rig.sh(f"cat {conf}").stdout == '{"theme": '

        # no API key on the rig yet (the service step makes it): no dangling reference, a warning
        rig.sh(f"printf '%s' '{json.dumps(USER_FILE)}' > {conf} && chown rigadmin: {conf} && chmod 0600 {conf}")
        app, out = _app(str(p))
        assert app.provision("rig", only="opencode") == 0, out.getvalue()
        assert "/etc/llama-rig/api-key is not there yet" in out.getvalue()
        assert "apiKey" not in json.loads(rig.sh(f"cat {conf}").stdout)["provider"]["llama-cpp"]["options"]
        # the key the service step made (root:llama 0640 there; root here): copied ON the rig
        key = "0123456789abcdef" * 4
        rig.sh(f"mkdir -p /etc/llama-rig && printf '{key}\\n' > /etc/llama-rig/api-key "
               "&& chmod 0640 /etc/llama-rig/api-key")
        rig.sh(f"printf '%s' '{json.dumps(USER_FILE)}' > {conf} && chown rigadmin: {conf} && chmod 0600 {conf}"
               f" && rm -f {conf}.llama-rig.bak")
        app, out = _app(str(p))
        assert app.provision("rig", only="opencode", diff=True) == 0, out.getvalue()
        assert "opencode: change: copy the API key to /home/rigadmin/.config/opencode/llama-rig-llama-cpp.key" \
            in out.getvalue()
        assert key not in out.getvalue()
        kc = "/home/rigadmin/.config/opencode/llama-rig-llama-cpp.key"
        assert rig.sh(f"cat {kc}").stdout == key + "\n"
        assert rig.sh(f"stat -c '%U %a' {kc}").stdout.split() == ["rigadmin", "600"]
        assert "opencode: change: opencode config" in out.getvalue()
        assert key not in rig.sh(f"cat {conf}").stdout
        got = json.loads(rig.sh(f"cat {conf}").stdout)
        assert got["provider"]["llama-cpp"]["options"]["apiKey"] == "{file:llama-rig-llama-cpp.key}"
        assert got["theme"] == "tokyonight" and got["provider"]["ollama"]
        assert got["provider"]["llama-cpp"]["options"]["baseURL"] == f"http://{rig.address}:8080/v1"
        assert got["provider"]["llama-cpp"]["models"]["tiny-model"]["limit"] == {"context": 40960,
                                                                                 "output": 4096}
        assert json.loads(rig.sh(f"cat {conf}.llama-rig.bak").stdout) == USER_FILE
        assert rig.sh(f"stat -c '%U %a' {conf}").stdout.split() == ["rigadmin", "600"]

        # second run: no change; --check after an inventory change: reports, writes nothing
        app, out = _app(str(p))
        assert app.provision("rig", only="opencode") == 0
        assert "opencode: ok (no change)" in out.getvalue()
        before = rig.sh(f"cat {conf}").stdout
        app, out = _app(str(p), "server.port=8081")
        assert app.provision("rig", only="opencode", check=True) == 0
        assert "opencode: would change" in out.getvalue()
        assert rig.sh(f"cat {conf}").stdout == before

        # a user without a config yet: created with the right owner and dirs
        rig.sh("useradd -m -s /bin/bash dev")
        app, out = _app(str(p), "opencode.user=dev")
        assert app.provision("rig", only="opencode") == 0, out.getvalue()
        assert rig.sh("stat -c %U /home/dev/.config /home/dev/.config/opencode "
                      "/home/dev/.config/opencode/opencode.json").stdout.split() == ["dev"] * 3
        assert rig.sh("test -e /home/dev/.config/opencode/opencode.json.llama-rig.bak",
                      check=False).returncode == 1
        created = json.loads(rig.sh("cat /home/dev/.config/opencode/opencode.json").stdout)
        assert created["model"] == "llama-cpp/tiny-model"

        # --local: the rig's key read once there (sudo) into a 0600 file beside this machine's config
        local_conf = tmp_path / "local" / "opencode.json"
        old = os.environ.get("OPENCODE_CONFIG")
        os.environ["OPENCODE_CONFIG"] = str(local_conf)
        try:
            app, out = _app(str(p))
            assert oc.task_local(app, "rig", False, check=False) == 0, out.getvalue()
        finally:
            if old is None:
                os.environ.pop("OPENCODE_CONFIG", None)
            else:
                os.environ["OPENCODE_CONFIG"] = old
        assert key not in out.getvalue() and key not in local_conf.read_text()
        lk = local_conf.with_name("llama-rig-llama-cpp.key")
        assert lk.read_text() == key + "\n" and oct(lk.stat().st_mode & 0o777) == "0o600"

        # the file fetched from the rig (with its key file beside it) is accepted by the real client
        local = tmp_path / "fetched.json"
        local.write_text(rig.sh(f"cat {conf}").stdout)
        (tmp_path / "llama-rig-llama-cpp.key").write_text(rig.sh(f"cat {kc}").stdout)
        r = opencode_cli.run(["models", "llama-cpp"], local, tmp_path / "home", timeout=180)
        assert r.returncode == 0 and "llama-cpp/tiny-model" in r.stdout.split(), r.stderr
    finally:
        rig_factory.stop(rig)


def test_task_local_merges_into_this_machines_config(tmp_path, monkeypatch):
    inv_path = tmp_path / "hosts.yaml"
    inv_path.write_text(yaml.safe_dump({"hosts": {"rig": {
        "connection": {"address": "192.168.1.50"},
        "server": {"alias": "tiny-model", "port": 8000, "ctx_size": 65536, "parallel": 2,
                   "api_key": "none"}}}}))
    xdg = tmp_path / "xdg"
    monkeypatch.delenv("OPENCODE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    app, out = _app(str(inv_path))
    assert oc.task_local(app, "rig", False, check=False) == 0
    assert "opencode: " + str(xdg / "opencode/opencode.json") + ": changed (provider llama-cpp -> " \
           "http://192.168.1.50:8000/v1)" in out.getvalue()
    data = json.loads((xdg / "opencode/opencode.json").read_text())
    assert data["provider"]["llama-cpp"]["models"]["tiny-model"]["limit"]["context"] == 32768
    app, out = _app(str(inv_path))
    oc.task_local(app, "rig", False, check=False)
    assert "ok (no change)" in out.getvalue()


def test_task_local_with_an_explicit_key_writes_it_beside_the_config(tmp_path, monkeypatch):
    """server.api_key_file (on this machine): no rig needed; the key goes to a 0600 file the
    config references, never into the JSON. (The generated key is read on the rig: tests/test_e2e.py.)"""
    kf = tmp_path / "control.key"
    kf.write_text("sk-explicit-777\n")
    inv_path = tmp_path / "hosts.yaml"
    inv_path.write_text(yaml.safe_dump({"hosts": {"rig": {
        "connection": {"address": "192.168.1.50"},
        "server": {"alias": "tiny-model", "api_key_file": str(kf)}}}}))
    conf = tmp_path / "oc" / "opencode.json"
    monkeypatch.setenv("OPENCODE_CONFIG", str(conf))
    app, out = _app(str(inv_path))
    assert oc.task_local(app, "rig", False, check=False) == 0
    assert "sk-explicit-777" not in out.getvalue() and "sk-explicit-777" not in conf.read_text()
    data = json.loads(conf.read_text())
    assert data["provider"]["llama-cpp"]["options"]["apiKey"] == "{file:llama-rig-llama-cpp.key}"
    key = conf.with_name("llama-rig-llama-cpp.key")
    assert key.read_text() == "sk-explicit-777\n" and oct(key.stat().st_mode & 0o777) == "0o600"
    app, out = _app(str(inv_path))
    oc.task_local(app, "rig", False, check=False)
    assert "ok (no change)" in out.getvalue()
