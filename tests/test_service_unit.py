"""service step as data: the rendered command line (every seed flag), the unit, the env file,
restart decisions, the VRAM preflight parser/checker, secrets."""
from __future__ import annotations

import io
import json
import shlex

import pytest

from provision import inventory as inv
from provision import secrets
from provision.engine import Call, Run, WriteFile
from provision.errors import StepError
from provision.steps import api_key as auth
from provision.steps import service as s
from provision.steps import vram_preflight as vp

MODEL = "/var/lib/llama-rig/models/Qwen3.5-122B-A10B-UD-Q6_K_XL-00001-of-00004.gguf"
BIN = "/opt/llama-rig/llama.cpp/current/bin/llama-server"

SEED_ARGS = (f"-m {MODEL} --host 0.0.0.0 --port 8000 -ngl 999 -c 262144 -ctk q8_0 -ctv q8_0 "
             "--parallel 1 --split-mode layer -ts 0.9,1,1,1,1,1 --no-warmup --temp 0.6 --top-p 0.95 "
             "--top-k 20 --min-p 0.0 --jinja")
KEY_ARGS = " --api-key-file /etc/llama-rig/api-key"


def seed_cfg(**server) -> dict:
    c = inv.defaults()
    c["gpus"]["count"] = 6
    c["server"]["tensor_split"] = [0.9, 1, 1, 1, 1, 1]
    c["server"].update(server)
    return c


def test_server_argv_is_the_seed_command_line():
    argv = s.server_argv(seed_cfg(), MODEL, BIN)
    assert argv[0] == BIN
    assert " ".join(argv[1:]) == (SEED_ARGS + " --alias Qwen3.5-122B-A10B-UD-Q6_K_XL --metrics --no-slots"
                                  + KEY_ARGS)
    # server.api_key: none -> no key flag; an explicit key file (control machine) -> the same flag
    assert "--api-key-file" not in s.server_argv(seed_cfg(api_key="none"), MODEL, BIN)
    assert " ".join(s.server_argv(seed_cfg(api_key_file="/k"), MODEL, BIN)).endswith(KEY_ARGS)


def test_server_argv_optional_flags():
    c = seed_cfg(flash_attn="on", batch_size=4096, ubatch_size=4096, warmup=True, jinja=False,
                 extra_args=["--mlock", "--metrics"], tensor_split=None, temp=1.0)
    argv = s.server_argv(c, MODEL, BIN)
    line = " ".join(argv)
    assert "--no-warmup" not in argv and "-ts" not in argv
    assert "--no-jinja" in argv and "--temp 1 " in line
    assert line.endswith("--metrics --no-slots" + KEY_ARGS + " -fa on -b 4096 -ub 4096 --mlock --metrics")


def test_server_argv_metrics_on_slots_off_unless_asked():
    assert s.server_argv(seed_cfg(api_key="none"), MODEL, BIN)[-2:] == ["--metrics", "--no-slots"]
    argv = s.server_argv(seed_cfg(metrics=False, slots=True), MODEL, BIN)
    assert "--metrics" not in argv and "--no-slots" not in argv and "--slots" not in argv


def test_fit_params_argv_same_memory_flags():
    argv = s.fit_params_argv(seed_cfg(), MODEL, "/x/llama-fit-params")
    assert " ".join(argv) == (f"/x/llama-fit-params -m {MODEL} -c 262144 -ctk q8_0 -ctv q8_0 -ngl 999 "
                              "-sm layer -ts 0.9,1,1,1,1,1 -fitp on")


def test_unit_has_everything():
    unit = s.render_unit(seed_cfg(start_timeout=1800), MODEL)
    sections = unit.split("[Service]")
    head, svc = sections[0], sections[1]
    for needle in ("After=network-online.target llama-rig-gpu.service",
                   "Wants=network-online.target llama-rig-gpu.service", "StartLimitIntervalSec=",
                   "StartLimitBurst="):
        assert needle in head
    for needle in ("Type=exec", "User=llama", "Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID",
                   "EnvironmentFile=/etc/llama-rig/llama-server.env", "Restart=on-failure",
                   "RestartSec=10", "LimitMEMLOCK=infinity", "LimitNOFILE=65536",
                   "TimeoutStartSec=1800",
                   "ExecStartPost=/opt/llama-rig/bin/llama-rig-health http://127.0.0.1:8000/health 1800"):
        assert needle in svc, needle
    exec_line = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")][0]
    assert exec_line == (f"ExecStart={BIN} {SEED_ARGS} --alias Qwen3.5-122B-A10B-UD-Q6_K_XL --metrics "
                         "--no-slots" + KEY_ARGS)
    assert "WantedBy=multi-user.target" in unit.split("[Install]")[1]


def test_unit_quotes_args_for_systemd():
    unit = s.render_unit(seed_cfg(alias="my model", extra_args=["--chat-template-kwargs",
                                                                '{"enable_thinking": false}']), MODEL)
    exec_line = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")][0]
    assert '--alias "my model"' in exec_line
    assert r'"{\"enable_thinking\": false}"' in exec_line


def test_unit_is_hardened():
    """The sandbox settings `systemd-analyze security` scores (measured on a rig: 1.6 OK, see
    benchmarks/service-hardening/); the GPUs stay reachable."""
    svc = s.render_unit(seed_cfg(), MODEL).split("[Service]")[1]
    lines = set(svc.splitlines())
    for need in ("ProtectSystem=strict", "ReadWritePaths=/var/lib/llama-rig/home", "ProtectHome=yes",
                 "PrivateTmp=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
                 "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                 "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged",
                 "DevicePolicy=closed", "DeviceAllow=char-nvidia-frontend rw",
                 "DeviceAllow=char-nvidia-uvm rw", "DeviceAllow=char-nvidia-caps r", "UMask=0077"):
        assert need in lines, need
    assert "PrivateDevices=yes" not in lines  # would hide /dev/nvidia*
    # a model (or state dir) under /home stays reachable: read-only there, the home still writable
    unit = s.render_unit(seed_cfg(), "/home/ann/models/m-00001-of-00002.gguf")
    assert "ProtectHome=read-only" in unit.splitlines() and "ReadWritePaths=/var/lib/llama-rig/home" in unit
    c = seed_cfg()
    c["paths"]["state_dir"] = "/root/llama-rig"
    assert "ProtectHome=read-only" in s.render_unit(c, MODEL).splitlines()
    assert s.protect_home("/homestead/m.gguf", "/var/lib/x") == "yes"
    assert any(ln.startswith("ExecStartPre=-+/bin/sh -c ") and "nvidia-modprobe -u -c 0" in ln
               for ln in lines)


def test_env_file_holds_no_key():
    assert "LLAMA_API_KEY" not in s.render_env() and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in s.render_env()


def test_api_key_read_on_control_machine_and_registered(tmp_path):
    kf = tmp_path / "key"
    kf.write_text("sk-very-secret-123\n")
    c = seed_cfg(api_key_file=str(kf))
    assert s.read_api_key(c) == "sk-very-secret-123"
    assert secrets.redact("x sk-very-secret-123 y") == f"x {secrets.MASK} y"
    kf.write_text("")
    with pytest.raises(StepError, match="exactly one non-empty line"):
        s.read_api_key(c)
    with pytest.raises(StepError, match="cannot read"):
        s.read_api_key(seed_cfg(api_key_file=str(tmp_path / "nope")))


KEY_OK = auth.KeyFile(True, "root", "llama", 0o640, 65)


def _steady(c, key=KEY_OK) -> s.Observed:
    return s.Observed(user_exists=True, user_home=s.user_home(c), user_shell="/usr/sbin/nologin",
                      unit_now=s.render_unit(c, MODEL), env_now=s.render_env(), key=key,
                      helper_now=s.render_helper(c), enabled=True, active=True,
                      binary_now="/opt/llama-rig/llama.cpp/builds/b1-aaa/bin/llama-server",
                      started={"binary": "/opt/llama-rig/llama.cpp/builds/b1-aaa/bin/llama-server",
                               "model": MODEL})


def test_steady_state_is_no_change():
    c = seed_cfg()
    assert s.plan(c, _steady(c), MODEL, None) == []


def test_fresh_box_creates_user_files_enables_and_starts():
    c = seed_cfg()
    changes = s.plan(c, s.Observed(), MODEL, None)
    desc = [ch.description for ch in changes]
    assert desc[0] == "create system user llama (no login shell, home /var/lib/llama-rig/home)"
    assert "--shell /usr/sbin/nologin" in changes[0].commands[1] and "--system" in changes[0].commands[1]
    files = {ch.path: ch for ch in changes if isinstance(ch, WriteFile)}
    assert set(files) == {"/opt/llama-rig/bin/llama-rig-health", "/etc/llama-rig/llama-server.env",
                          "/etc/systemd/system/llama-server.service"}
    assert files["/etc/llama-rig/llama-server.env"].mode == 0o600
    assert files["/opt/llama-rig/bin/llama-rig-health"].mode == 0o755
    assert "systemctl enable llama-server.service" in [c for ch in changes if isinstance(ch, Run)
                                                       for c in ch.commands]
    (gen,) = [ch for ch in changes if ch.description.startswith("generate the API key")]
    assert gen.description == "generate the API key on the rig: /etc/llama-rig/api-key (root:llama 0640)"
    assert gen.notify == ("llama-server.restart",) and "/dev/urandom" in gen.commands[0]
    assert desc.index(gen.description) > 0  # after the user (its group) exists
    last = changes[-1]
    assert isinstance(last, Call) and last.data["action"] == "start"
    assert "not running" in last.data["reasons"]


def test_one_flag_changed_restarts_once_with_daemon_reload():
    c = seed_cfg()
    obs = _steady(c)
    c2 = seed_cfg(ctx_size=131072)
    changes = s.plan(c2, obs, MODEL, None)
    assert [ch.description for ch in changes] == [
        "unit /etc/systemd/system/llama-server.service",
        "systemctl daemon-reload (unit changed)",
        "restart llama-server.service (unit changed), wait for /health, test a completion"]
    assert changes[0].notify == ("llama-server.restart",)
    assert "-c 131072" in changes[0].diff()


def test_explicit_key_installed_on_the_rig_restarts_and_never_shows():
    c = seed_cfg(api_key_file="/control/key")
    changes = s.plan(c, _steady(c, auth.KeyFile(True, "root", "llama", 0o640, 65, "old\n")), MODEL,
                     "sk-new-key-999")
    key = changes[0]
    assert isinstance(key, WriteFile) and key.secret and key.notify == ("llama-server.restart",)
    assert (key.path, key.mode, key.owner, key.group) == ("/etc/llama-rig/api-key", 0o640, "root", "llama")
    assert key.content == "sk-new-key-999\n"
    assert "sk-new-key-999" not in key.diff() and "sk-new-key-999" not in key.description
    assert changes[-1].data["reasons"] == ["API key file changed"]
    same = auth.KeyFile(True, "root", "llama", 0o640, 15, "sk-new-key-999\n")
    assert s.plan(c, _steady(c, same), MODEL, "sk-new-key-999") == []


def test_auto_key_made_once_fixed_if_loose_and_none_leaves_it():
    c = seed_cfg()
    # missing or empty -> generated on the rig (the command holds no key), one restart
    for kf in (auth.KeyFile(), auth.KeyFile(True, "root", "llama", 0o640, 0)):
        ch = s.plan(c, _steady(c, kf), MODEL, None)
        assert ch[0].description.startswith("generate the API key on the rig")
        assert ch[-1].data["reasons"] == ["API key file changed"]
    # readable by others: mode/owner fixed, no restart (the key is the same)
    ch = s.plan(c, _steady(c, auth.KeyFile(True, "llama", "llama", 0o644, 65)), MODEL, None)
    assert [x.description for x in ch] == ["fix /etc/llama-rig/api-key: root:llama 0640 (was llama:llama 644)"]
    assert ch[0].notify == ()
    # none: no key file managed, no flag
    c2 = seed_cfg(api_key="none")
    assert s.plan(c2, _steady(c2, auth.KeyFile()), MODEL, None) == []


def test_old_env_file_with_the_key_is_rewritten_without_showing_it():
    c = seed_cfg()
    obs = _steady(c)
    obs.env_now = "CUDA_DEVICE_ORDER=PCI_BUS_ID\nLLAMA_API_KEY=sk-old-123\n"
    ch = s.plan(c, obs, MODEL, None)
    assert ch[0].description == "env file /etc/llama-rig/llama-server.env (LLAMA_API_KEY removed)"
    assert ch[0].secret and "sk-old-123" not in ch[0].diff()


def test_generate_command_never_holds_a_key_and_makes_one(tmp_path, monkeypatch):
    """The generator itself, run here: 64 hex digits, mode 0640, kept when it exists."""
    import subprocess
    monkeypatch.setattr(auth, "KEY_DIR", str(tmp_path / "etc"))
    monkeypatch.setattr(auth, "KEY_PATH", str(tmp_path / "etc" / "api-key"))
    grp = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    cmd = auth.generate_command(grp)
    subprocess.run(cmd, shell=True, check=True)
    key = (tmp_path / "etc" / "api-key").read_text()
    assert len(key) == 65 and key.endswith("\n") and int(key, 16) > 0
    assert oct((tmp_path / "etc" / "api-key").stat().st_mode & 0o777) == "0o640"
    assert oct((tmp_path / "etc").stat().st_mode & 0o777) == "0o755"  # the service user gets in
    assert key.strip() not in cmd
    subprocess.run(cmd, shell=True, check=True)
    assert (tmp_path / "etc" / "api-key").read_text() == key  # made once
    assert [p.name for p in (tmp_path / "etc").iterdir()] == ["api-key"]


def test_loopback_and_the_open_server_warning():
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("[::1]")
    assert auth.is_loopback("localhost") and not auth.is_loopback("0.0.0.0")
    assert not auth.is_loopback("192.168.1.5") and not auth.is_loopback("rig.lan")


def test_none_with_a_key_file_is_bad_input():
    data = {"hosts": {"r": {"connection": {"type": "local"},
                            "server": {"api_key": "none", "api_key_file": "/k"}}}}
    with pytest.raises(inv.InventoryError, match="server.api_key: none contradicts server.api_key_file"):
        inv.from_data(data)
    with pytest.raises(inv.InventoryError, match="server.api_key"):
        inv.from_data({"hosts": {"r": {"connection": {"type": "local"}, "server": {"api_key": "sk-123"}}}})


def test_owed_restart_and_binary_change():
    c = seed_cfg()
    obs = _steady(c)
    obs.owed = True
    ch = s.plan(c, obs, MODEL, None)
    assert len(ch) == 1 and ch[0].data == {"action": "restart", "reasons": [
        "restart owed (binary, model or config changed earlier)"]}
    obs = _steady(c)
    obs.binary_now = "/opt/llama-rig/llama.cpp/builds/b2-bbb/bin/llama-server"
    ch = s.plan(c, obs, MODEL, None)
    assert ch[0].data["reasons"] == ["binary changed (b1-aaa -> b2-bbb)"]


def test_not_running_is_started():
    c = seed_cfg()
    obs = _steady(c)
    obs.active = False
    ch = s.plan(c, obs, MODEL, None)
    assert [x.data for x in ch] == [{"action": "start", "reasons": ["not running"]}]


def test_no_systemd_is_a_clear_error():
    with pytest.raises(StepError, match="does not run systemd"):
        s.plan(seed_cfg(), s.Observed(systemd=False), MODEL, None)


# -- VRAM preflight --------------------------------------------------------------------------

FIT_OUT = """CUDA0 17900 560 1200
CUDA1 17900 560 700
Host 9 0 290
"""


def test_parse_fit_output():
    assert vp.parse_fit_output("llama_fit: printing ...\n" + FIT_OUT) == {
        "CUDA0": (17900, 560, 1200), "CUDA1": (17900, 560, 700), "Host": (9, 0, 290)}


def test_check_fit_ok_and_refused_with_proposal():
    ok = vp.check_fit(vp.parse_fit_output(FIT_OUT), {0: 24000, 1: 24000}, margin=1024)
    assert ok.ok and ok.proposed_ts is None
    assert ok.rows[0] == ["CUDA0", 17900, 560, 1200, 19660, 24000, "ok"]
    bad = vp.check_fit(vp.parse_fit_output(FIT_OUT), {0: 20000, 1: 24000},
                      {0: "NVIDIA GeForce RTX 3090"}, margin=1024)
    assert not bad.ok
    assert bad.problems == ["GPU 0 (NVIDIA GeForce RTX 3090): needs 19660 MiB (model 17900 + context 560 "
                            "+ compute 1200) + 1024 MiB margin but only 20000 MiB are free"]
    # the first candidate a refusal starts from (preflight checks it with llama-fit-params):
    # room = free - compute - margin: 20000-1200-1024 = 17776, 24000-700-1024 = 22276
    assert vp.propose_ts(vp.cuda_devices(vp.parse_fit_output(FIT_OUT)), {0: 20000, 1: 24000},
                        margin=1024) == [0.8, 1.0]


def test_propose_ts_none_when_nothing_fits():
    assert vp.propose_ts({0: (30000, 0, 500), 1: (30000, 0, 500)}, {0: 24000, 1: 24000}) is None


def layer_split_estimate(n_layer: int, layer_mib: int, ctx_mib: int, compute: int, calls: list):
    """llama-fit-params' shape under a layer split: whole layers go to each GPU by the cumulative
    -ts (like llama.cpp), each carrying its weights and its share of the KV cache."""
    def estimate(ts):
        calls.append(list(ts))
        total = sum(ts)
        cum = [sum(ts[:i + 1]) / total for i in range(len(ts))]
        layers = [0] * len(ts)
        for il in range(n_layer):
            layers[next(i for i, c in enumerate(cum) if il / n_layer < c)] += 1
        return {i: (n * layer_mib, n * ctx_mib, compute) for i, n in enumerate(layers)}
    return estimate


def test_fitted_ts_is_checked_with_fit_params_and_cut_until_it_fits():
    # 6 x 24 GiB, GPU 0 with 6000 MiB taken by a display: 48 layers x 400 MiB (+ 10 MiB KV each)
    free = {0: 24575 - 6000, **{i: 24575 for i in range(1, 6)}}
    calls: list = []
    est = layer_split_estimate(48, 400, 10, 1200, calls)
    cuda = est([0.9, 1, 1, 1, 1, 1])  # the seed's plan: 8 layers on GPU 0
    calls.clear()
    ts = vp.fitted_ts(est, cuda, free)
    assert ts is not None and calls and calls[-1] == ts
    final = est(ts)
    for i, (m, c, k) in final.items():
        assert m + c + k + vp.PREFLIGHT_MARGIN_MIB <= free[i], (i, final, ts)
    assert sum(m for m, _, _ in final.values()) == 48 * 400  # every layer is placed
    assert ts[0] < 1 and max(ts) == 1


def test_fitted_ts_cuts_a_share_that_whole_layers_overflow():
    # proportional shares that do not fit once layers are whole: the first candidate overflows,
    # the checked one is cut further
    free = {0: 1024 + 300 + 2 * 1000 + 500, 1: 1024 + 300 + 3 * 1000 + 100}
    calls: list = []
    est = layer_split_estimate(5, 1000, 0, 300, calls)
    ts = vp.fitted_ts(est, est([1, 1]), free, margin=1024)
    assert len(calls) >= 3, calls  # the proportional guess was refused by the estimate
    assert ts is not None and est(ts)[0][0] <= 2000 and est(ts)[1][0] <= 3000


def test_fitted_ts_none_when_the_estimate_never_fits_or_fails():
    free = {0: 2000, 1: 24000}
    # GPU 0 cannot even hold its compute buffer + margin: no split helps
    assert vp.fitted_ts(lambda ts: {0: (0, 0, 1500), 1: (20000, 0, 500)}, {0: (10000, 0, 1500),
                       1: (10000, 0, 500)}, free) is None
    # llama-fit-params failing on the candidate: no proposal rather than an unchecked one
    assert vp.fitted_ts(lambda ts: None, {0: (10000, 0, 500), 1: (10000, 0, 500)}, free) is None


def test_check_mode_on_a_fresh_box_plans_a_pending_install(tmp_path):
    """--check before the llama/model steps ran: a visible pending change, not a failure."""
    from provision.console import Console, Environment
    from provision.engine import Context
    from provision.inventory import Host
    from provision.target import LocalTarget

    c = seed_cfg()
    c["connection"]["type"] = "local"
    c["paths"].update({"prefix": str(tmp_path / "opt"), "state_dir": str(tmp_path / "state")})
    host = Host("box", [], c)
    out = io.StringIO()
    ctx = Context(host, LocalTarget(host), Console(Environment(out, out, False)), check=True)
    changes = s.ServiceStep().plan(ctx)
    assert len(changes) == 1 and changes[0].data["action"] == "pending"
    assert changes[0].description.startswith("install and start llama-server.service once the model is in place")
    ctx.check = False
    with pytest.raises(StepError, match="no model manifest on this host yet"):
        s.ServiceStep().plan(ctx)


def test_model_unreadable_by_the_service_user_is_fixed():
    c = seed_cfg()
    obs = _steady(c)
    obs.model_readable = False
    ch = s.plan(c, obs, MODEL, None)
    assert ch[0].description == "let llama read the model (/var/lib/llama-rig/models)"
    assert ch[0].commands == ["chgrp -R llama /var/lib/llama-rig/models && chmod -R g+rX /var/lib/llama-rig/models"]
    obs.model_readable = True
    assert s.plan(c, obs, MODEL, None) == []
