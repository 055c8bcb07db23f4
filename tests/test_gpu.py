"""gpu step: the plan as data (nvidia-smi facts in -> changes out), the boot unit, and the real
thing on a Tier B rig with the fake nvidia-smi (in range, out of range, not root, "reboot")."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
import yaml

from provision import inventory as inv
from provision.app import App
from provision.console import Environment
from provision.engine import Run, WriteFile
from provision.errors import StepError
from provision.facts.gpu import Gpu, GpuFacts
from provision.steps import gpu as g


def gpu(i: int, limit: float = 350.0, pm: bool = True, name: str = "NVIDIA GeForce RTX 3090",
        lo: float | None = 100.0, hi: float | None = 350.0, used: int = 1) -> Gpu:
    return Gpu(index=i, uuid=f"GPU-{i}", name=name, pci_bus_id=f"00000000:0{i + 1}:00.0",
               compute_cap="8.6", memory_total_mib=24576, memory_used_mib=used, persistence=pm,
               power_draw=21.5, power_limit=limit, power_default=350.0, power_min=lo, power_max=hi,
               driver_version="570.133.20")


def facts(*gpus: Gpu) -> GpuFacts:
    return GpuFacts(True, "", tuple(gpus), "12.8")


def cfg(**gpus) -> dict:
    c = inv.defaults()
    c["gpus"].update({"count": 6, "model": "NVIDIA GeForce RTX 3090", "power_limit": 350,
                      "persistence": True})
    c["gpus"].update(gpus)
    return c


SIX = [gpu(i) for i in range(6)]
OBS_OK = g.Observed(unit_now=None, unit_enabled=False)


def unit_for(c, gs=SIX):
    return g.render_unit(c, tuple(gs))


def commands(changes):
    return [cmd for ch in changes if isinstance(ch, Run) for cmd in ch.commands]


def test_all_right_is_no_change():
    c = cfg()
    obs = g.Observed(unit_now=unit_for(c), unit_enabled=True)
    changes, warnings = g.plan(c, facts(*SIX), obs)
    assert changes == [] and warnings == []


def test_sets_only_what_differs_grouped_by_value():
    c = cfg(power_limit=[300, 300, 350, 280, 300, 350])
    gs = [gpu(0, 350), gpu(1, 300), gpu(2, 350), gpu(3, 350), gpu(4, 350), gpu(5, 350)]
    obs = g.Observed(unit_now=unit_for(c, gs), unit_enabled=True)
    changes, _ = g.plan(c, facts(*gs), obs)
    assert commands(changes) == ["/usr/bin/nvidia-smi -i 0,4 -pl 300",
                                 "/usr/bin/nvidia-smi -i 3 -pl 280"]
    assert changes[0].description == "power limit 300 W on GPU 0,4 (now 350 W)"


def test_persistence_only_where_off():
    c = cfg()
    gs = [gpu(i, pm=i not in (1, 4)) for i in range(6)]
    changes, _ = g.plan(c, facts(*gs), g.Observed(unit_now=unit_for(c), unit_enabled=True))
    assert commands(changes) == ["/usr/bin/nvidia-smi -i 1,4 -pm 1"]


def test_out_of_range_names_range_and_plans_nothing():
    c = cfg(power_limit=400)
    with pytest.raises(StepError) as e:
        g.plan(c, facts(*[gpu(i, pm=False, limit=300) for i in range(6)]), OBS_OK)
    msg = str(e.value)
    assert "400 W is outside the allowed range 100–350 W" in msg and "GPU 0" in msg
    assert "nothing was changed" in msg


def test_one_gpu_out_of_range_in_a_list_is_caught_before_anything():
    c = cfg(power_limit=[350, 350, 350, 350, 350, 90])
    with pytest.raises(StepError, match=r"GPU 5 .*90 W is outside the allowed range 100–350 W"):
        g.plan(c, facts(*[gpu(i, 300, pm=False) for i in range(6)]), OBS_OK)


def test_missing_gpu_is_an_error():
    with pytest.raises(StepError, match="expected 6 GPUs .* shows 5.*missing GPU is an error"):
        g.plan(cfg(), facts(*SIX[:5]), OBS_OK)


def test_wrong_model_is_an_error():
    gs = [*SIX[:5], gpu(5, name="NVIDIA GeForce RTX 3080")]
    with pytest.raises(StepError, match="GPU 5 = 'NVIDIA GeForce RTX 3080'"):
        g.plan(cfg(), facts(*gs), OBS_OK)


def test_no_driver_with_gpus_expected_is_an_error():
    with pytest.raises(StepError, match="gpus.count is 6 but nvidia-smi failed"):
        g.plan(cfg(), GpuFacts(False, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed"), OBS_OK)


def test_no_gpus_configured_no_change():
    c = inv.defaults()
    assert g.plan(c, GpuFacts(False, "nvidia-smi not found"), OBS_OK) == ([], [])


def test_unsupported_board_is_a_warning_not_a_failure():
    gs = [gpu(i, limit=None, lo=None, hi=None) for i in range(6)]
    c = cfg()
    changes, warnings = g.plan(c, facts(*gs), g.Observed(unit_now=g.render_unit(c, tuple(gs)),
                                                         unit_enabled=True))
    assert changes == []
    assert len(warnings) == 6 and "power management not supported" in warnings[0]


def test_boot_unit_written_and_enabled():
    c = cfg(power_limit=[300, 300, 350, 350, 350, 350])
    changes, _ = g.plan(c, facts(*SIX), OBS_OK)
    unit = [ch for ch in changes if isinstance(ch, WriteFile)][0]
    assert unit.path == "/etc/systemd/system/llama-rig-gpu.service"
    text = unit.content
    assert "Type=oneshot" in text and "RemainAfterExit=yes" in text
    assert "Before=llama-server.service" in text and "WantedBy=multi-user.target" in text
    assert "ExecStart=/usr/bin/nvidia-smi -pm 1\n" in text
    assert "ExecStart=/usr/bin/nvidia-smi -i 0,1 -pl 300\n" in text
    assert "ExecStart=/usr/bin/nvidia-smi -i 2,3,4,5 -pl 350\n" in text
    assert commands(changes)[-2:] == ["systemctl daemon-reload",
                                      "systemctl enable llama-rig-gpu.service"]


def test_watts_override_sets_all_and_leaves_unit_alone():
    changes, _ = g.plan(cfg(), facts(*SIX), OBS_OK, watts=250, unit=False)
    assert commands(changes) == ["/usr/bin/nvidia-smi -i 0,1,2,3,4,5 -pl 250"]
    with pytest.raises(StepError, match="1000 W is outside"):
        g.plan(cfg(), facts(*SIX), OBS_OK, watts=1000, unit=False)


def test_group_by_value_formats_watts():
    assert g.group_by_value({0: 350.0, 1: 287.5, 2: 350.0}) == [("0,2", "350"), ("1", "287.5")]


def test_status_rows():
    rows = g.status_rows(facts(gpu(0, 280, used=20000)))
    assert rows == [[0, "NVIDIA GeForce RTX 3090", "280 W", "100–350 W", "21.5 W",
                     "20000 / 24576 MiB", "on"]]


# ------------------------------------------------------------------------------------------------
# Tier B rig with the fake nvidia-smi: 4 boards, 100-350 W (GPU 3: 150-300 W)

RIG_GPUS = [{}, {}, {}, {"power_min": 150, "power_max": 300, "power_default": 300}]


def _inventory(tmp_path, rig, **gpus_over) -> str:
    entry = rig.inventory_entry(gpus={"count": 4, "model": "NVIDIA GeForce RTX 3090",
                                      "power_limit": [280, 280, 250, 250], **gpus_over})
    p = tmp_path / "hosts.yaml"
    p.write_text(yaml.safe_dump({"hosts": {"rig": entry}}))
    return str(p)


def _app(path, *overrides):
    out = io.StringIO()
    app = App(inventory_path=path, overrides=list(overrides),
              env=Environment(stdout=out, stderr=out, isatty=False))
    return app, out


def _limits(rig) -> dict:
    r = rig.sh("nvidia-smi --query-gpu=index,power.limit,persistence_mode --format=csv,noheader,nounits")
    return {int(a): (float(b), c.strip()) for a, b, c in
            (line.split(",") for line in r.stdout.strip().splitlines())}


@pytest.mark.rig
def test_power_limits_on_rig(rig_factory, tmp_path):
    rig = rig_factory(gpus=RIG_GPUS)
    try:
        path = _inventory(tmp_path, rig)
        before = _limits(rig)
        assert before == {0: (350.0, "Disabled"), 1: (350.0, "Disabled"), 2: (350.0, "Disabled"),
                          3: (300.0, "Disabled")}

        # out of range for GPU 3 (150-300): an error naming the range, nothing set
        app, out = _app(path, "gpus.power_limit=[280, 280, 250, 320]")
        assert app.provision("rig", only="gpu") == 1
        text = out.getvalue()
        assert "GPU 3 (NVIDIA GeForce RTX 3090): 320 W is outside the allowed range 150–300 W" in text
        assert _limits(rig) == before
        assert rig.sh("test -e /etc/systemd/system/llama-rig-gpu.service", check=False).returncode == 1

        # in range: set, confirmed, boot unit enabled
        app, out = _app(path)
        assert app.provision("rig", only="gpu") == 0, out.getvalue()
        assert _limits(rig) == {0: (280.0, "Enabled"), 1: (280.0, "Enabled"), 2: (250.0, "Enabled"),
                                3: (250.0, "Enabled")}
        assert "power limit 280 W on GPU 0,1 (now 350 W)" in out.getvalue()
        assert "power limit 250 W on GPU 2,3 (now 300, 350 W)" in out.getvalue()
        assert rig.sh("systemctl is-enabled llama-rig-gpu.service").stdout.strip() == "enabled"
        verify = rig.sh("systemd-analyze verify /etc/systemd/system/llama-rig-gpu.service", check=False)
        assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

        # second run: nothing to do
        app, out = _app(path)
        assert app.provision("rig", only="gpu") == 0
        assert "gpu: ok (no change)" in out.getvalue()

        # "reboot": the state file is gone (limits back to default), the boot unit reapplies them
        rig.sh("rm -f /run/fake-nvidia-smi/state.json")
        assert _limits(rig)[0] == (350.0, "Disabled")
        rig.sh("systemctl restart llama-rig-gpu.service")
        assert _limits(rig) == {0: (280.0, "Enabled"), 1: (280.0, "Enabled"), 2: (250.0, "Enabled"),
                                3: (250.0, "Enabled")}

        # a real reboot of the box: /run is tmpfs, the enabled unit runs at boot
        rig_factory.reboot(rig)
        state = rig.sh("for i in $(seq 200); do s=$(systemctl is-active llama-rig-gpu.service); "
                       "[ \"$s\" = activating ] || break; sleep 0.1; done; echo $s", check=False)
        assert state.stdout.strip() == "active"
        assert _limits(rig)[3] == (250.0, "Enabled")

        # gpu.power --watts: all GPUs now, validated, the boot unit keeps the inventory's values
        unit_before = rig.sh("cat /etc/systemd/system/llama-rig-gpu.service").stdout
        app, out = _app(path)
        assert app.each_host("rig", lambda ctx: g.apply_now(ctx, 200.0), title="gpu.power") == 0
        assert {k: v[0] for k, v in _limits(rig).items()} == {0: 200.0, 1: 200.0, 2: 200.0, 3: 200.0}
        assert "200 W" in out.getvalue() and "memory used/total" in out.getvalue()
        assert rig.sh("cat /etc/systemd/system/llama-rig-gpu.service").stdout == unit_before
        app, out = _app(path)
        assert app.each_host("rig", lambda ctx: g.apply_now(ctx, 320.0), title="gpu.power") == 1
        assert "320 W is outside the allowed range 150–300 W" in out.getvalue()
        assert _limits(rig)[0][0] == 200.0

        # gpu.status table
        app, out = _app(path)
        assert app.each_host("rig", lambda ctx: bool(g.status_table(ctx)), title="gpu.status") == 0
        table = out.getvalue()
        assert "index  name" in table and "3      NVIDIA GeForce RTX 3090  200 W  150–300 W" in table

        # a missing GPU: the inventory says 5
        app, out = _app(path, "gpus.count=5", "gpus.power_limit=250")
        assert app.provision("rig", only="gpu") == 1
        assert "expected 5 GPUs (gpus.count) but nvidia-smi shows 4" in out.getvalue()

        # not root: rigadmin without sudo (connection.sudo false) -> the run lock (root-owned, it
        # fails closed) stops the run before anything, one clear line
        rig.sh("rm -f /run/fake-nvidia-smi/state.json")
        app, out = _app(path, "connection.user=rigadmin", "connection.sudo=false")
        assert app.provision("rig", only="gpu") == 1
        text = out.getvalue()
        assert "cannot take the run lock" in text and "nothing was changed" in text, text
        assert "connect as root or give rigadmin sudo" in text
        assert "Traceback" not in text
        assert _limits(rig)[0] == (350.0, "Disabled")
        # ... and with sudo it works
        app, out = _app(path, "connection.user=rigadmin")
        assert app.provision("rig", only="gpu") == 0, out.getvalue()
        assert _limits(rig)[0] == (280.0, "Enabled")
    finally:
        rig_factory.stop(rig)
