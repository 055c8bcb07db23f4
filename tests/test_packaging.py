"""`pip install .` (not editable) gives a working package: a wheel built from a copy of this
checkout (offline: --no-build-isolation, --no-index), installed into a fresh venv, ships the
top-level templates/ and baselines/ (as provision/_templates, provision/_baselines) and every
subpackage, and renders the units from the installed copy, far from any checkout."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, pkgutil, sys
import provision
from provision import inventory as inv, templates
from provision.bench import results
from provision.steps import service, gpu
mods = sorted(m.name for m in pkgutil.walk_packages(provision.__path__, "provision."))
bad = {}
for m in mods:
    if m.startswith("provision.remote."):
        continue  # scripts run on a rig (they read stdin at import); listed, not imported
    try:
        importlib.import_module(m)
    except Exception as e:
        bad[m] = repr(e)
cfg = inv.defaults()
model = "/var/lib/llama-rig/models/x/m-00001-of-00002.gguf"
print(json.dumps({
    "provision": provision.__file__, "templates": str(templates.templates_dir()),
    "baseline": str(results.DEFAULT_BASELINE), "baseline_ok": results.DEFAULT_BASELINE.is_file(),
    "modules": mods, "import_errors": bad,
    "unit": service.render_unit(cfg, model), "env": service.render_env(),
    "helper": service.render_helper(cfg),
    "gpu_unit": gpu.render_unit(cfg, ()),
}))
"""


def _copy_checkout(dst: Path) -> Path:
    src = dst / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("provision", "templates", "baselines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def test_wheel_ships_templates_and_baselines_and_renders_from_a_fresh_venv(tmp_path):
    src = _copy_checkout(tmp_path)
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = dist.glob("llama_rig-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for t in (ROOT / "templates").iterdir():
        assert f"provision/_templates/{t.name}" in names, t.name
    for b in (ROOT / "baselines").iterdir():
        assert f"provision/_baselines/{b.name}" in names, b.name
    # every package of the source tree is in the wheel (pyproject lists them by name)
    for init in (ROOT / "provision").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel: add its package to pyproject.toml"

    # a fresh venv: its own site-packages first; the dependencies (jinja2, fabric, ...) come from
    # this interpreter's site-packages through a plain path entry, which does NOT run that
    # folder's .pth files (so the editable llama-rig of a dev install cannot shadow the wheel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    Path(purelib, "zz-host-deps.pth").write_text("\n".join(deps) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(whl)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA_RIG_TEMPLATES")}
    r = subprocess.run([str(py), "-c", PROBE], cwd=away, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["provision"].startswith(purelib), got["provision"]
    assert got["templates"] == f"{purelib}/provision/_templates"
    assert got["baseline"].startswith(f"{purelib}/provision/_baselines/") and got["baseline_ok"]
    assert got["import_errors"] == {}
    src_mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                for p in (ROOT / "provision").rglob("*.py")} - {"provision"}
    assert src_mods <= set(got["modules"]), sorted(src_mods - set(got["modules"]))
    # the units, rendered from the wheel's own templates: the same text as from this checkout
    from provision import inventory as inv
    from provision.steps import gpu, service
    cfg = inv.defaults()
    model = "/var/lib/llama-rig/models/x/m-00001-of-00002.gguf"
    assert got["unit"] == service.render_unit(cfg, model)
    assert "ExecStart=/opt/llama-rig/llama.cpp/current/bin/llama-server -m " + model in got["unit"]
    assert "ProtectSystem=strict" in got["unit"]
    assert got["env"] == service.render_env() and got["helper"] == service.render_helper(cfg)
    assert got["gpu_unit"] == gpu.render_unit(cfg, ())
