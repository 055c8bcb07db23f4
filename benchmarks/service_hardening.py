#!/usr/bin/env python3
"""`systemd-analyze security llama-server.service` before/after the unit's hardening, on a Tier B rig.

Boots one rig (real systemd 252, Debian 12), installs tests/fake_llama_server.py as the `current`
build and a stand-in model, provisions `--only gpu,service` with the shipped inventory's server
settings, and records:

  * after:  the unit the service step installed, LIVE (`systemd-analyze security
    llama-server.service` while it serves, 401 without / 200 with the key the rig made);
  * before: the unit as the template rendered it before the hardening (`--before-rev`, default the
    commit before issue 14's hardening), analysed on the same rig with `--offline=true`.

    python3 benchmarks/service_hardening.py --out benchmarks/service-hardening

Writes before.txt / after.txt (the full command output), before.service / after.service and
summary.json into --out; prints the two overall exposure figures. Exit 0 when after <= 4.0.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from provision import inventory as inv  # noqa: E402
from provision.app import App  # noqa: E402
from provision.console import Environment  # noqa: E402

OVERALL = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\w+)")


def render_old_unit(rev: str, cfg: dict, model: str) -> str:
    """The unit as `templates/llama-server.service.j2` at `rev` renders it (same values)."""
    import jinja2

    from provision import templates
    from provision.steps import service
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:templates/llama-server.service.j2"],
                         capture_output=True, text=True, check=True).stdout
    d = Path(tempfile.mkdtemp(prefix="old-unit-"))
    (d / "llama-server.service.j2").write_text(old)
    env = templates.environment.__wrapped__(str(d))  # same filters/finalize, the old file
    assert isinstance(env, jinja2.Environment)
    s, p = cfg["server"], cfg["paths"]
    return env.get_template("llama-server.service.j2").render(
        alias=s["alias"], model_path=model, gpu_unit=service.GPU_UNIT, user=p["service_user"],
        group=p["service_user"], workdir=service.user_home(cfg), env_file=service.ENV_PATH,
        argv=[a for a in service.server_argv(cfg, model, service.binary_path(cfg))],
        health_argv=[service.helper_path(cfg), service.health_url(cfg), str(s["start_timeout"])],
        start_timeout=s["start_timeout"], restart_sec=10, limit_nofile=65536,
        start_limit_interval=max(600, s["start_timeout"] * 3), start_limit_burst=5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "service-hardening"))
    ap.add_argument("--before-rev", default="8a4fa4d",
                    help="a commit whose templates/llama-server.service.j2 is the unhardened unit")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from tests.rigs.nspawn import standalone_rig
    from tests.test_service_rig import MODEL, exposure, http, install_fake
    from provision.steps import model as model_step

    with standalone_rig("service-hardening-") as (nr, tmp):
        rig = nr.rig
        install_fake(rig)
        model_step.shard1_path = lambda ctx: MODEL  # the stand-in model (no hub here)
        server = dict(inv.load(ROOT / "hosts.yaml").hosts["rig"].cfg["server"])
        server.update(port=8080, ctx_size=4096, alias="tiny", start_timeout=60)
        server = {k: v for k, v in server.items() if v is not None}
        path = tmp / "hosts.yaml"
        path.write_text(yaml.safe_dump({"hosts": {"rig": rig.inventory_entry(
            gpus={"count": 6, "power_limit": 300}, server=server)}}))
        buf = io.StringIO()
        rc = int(App(str(path), env=Environment(buf, buf, False)).provision("rig", only="gpu,service"))
        if rc != 0:
            print(buf.getvalue(), file=sys.stderr)
            return 1
        cfg = inv.load(path).hosts["rig"].cfg
        rig_key = rig.sh("cat /etc/llama-rig/api-key").stdout.strip()
        served = {"no_key": http(rig, "/v1/models"), "key": http(rig, "/v1/models", rig_key),
                  "health": http(rig, "/health")}
        after_level, after_text = exposure(rig)
        after_unit = rig.sh("cat /etc/systemd/system/llama-server.service").stdout
        before_unit = render_old_unit(a.before_rev, cfg, MODEL)
        rig.sh("mkdir -p /root/before && cat > /root/before/llama-server.service <<'EOF'\n"
               + before_unit + "EOF")
        r = rig.sh("cd /root/before && systemd-analyze security --no-pager --offline=true "
                   "./llama-server.service", check=False)
        m = OVERALL.search(r.stdout)
        before_level = float(m.group(1)) if m else None
        r2 = rig.sh("cp /etc/systemd/system/llama-server.service /root/after.service && cd /root && "
                    "mkdir -p after && mv after.service after/llama-server.service && cd after && "
                    "systemd-analyze security --no-pager --offline=true ./llama-server.service", check=False)
        m2 = OVERALL.search(r2.stdout)
        version = rig.sh("systemctl --version | head -1").stdout.strip()
        (out / "before.service").write_text(before_unit)
        (out / "after.service").write_text(after_unit)
        (out / "before.txt").write_text(f"# {version}; rev {a.before_rev}, systemd-analyze security "
                                        f"--offline=true (on the rig)\n" + r.stdout)
        (out / "after.txt").write_text(f"# {version}; the served unit, live: systemd-analyze security "
                                       f"llama-server.service (on the rig)\n" + after_text)
        summary = {"systemd": version, "before_rev": a.before_rev, "before": before_level,
                   "before_word": m.group(2) if m else None, "after_live": after_level,
                   "after_offline": float(m2.group(1)) if m2 else None,
                   "after_word": OVERALL.search(after_text).group(2), "served": served,
                   "ratio_after_over_before": round(after_level / before_level, 3) if before_level else None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        ok = after_level <= 4.0 and served == {"no_key": 401, "key": 200, "health": 200}
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
