"""A stand-in for NVIDIA's CUDA apt repo, built from NVIDIA's own PyPI wheels, served on the host
side of the rigs' network.

What a rig sees is what a real box sees from developer.download.nvidia.com/compute/cuda/repos/:
a flat, signed apt repo `…/repos/debian12/x86_64/` (InRelease, Release.gpg, Packages) with
  cuda-keyring 1.1-1          /usr/share/keyrings/cuda-archive-keyring.gpg (this repo's own test key)
                              + /etc/apt/sources.list.d/cuda-debian12-x86_64.list pointing here
  cuda-toolkit-13-0           a metapackage over the component packages, like NVIDIA's:
    cuda-nvcc-13-0            nvcc, ptxas, fatbinary, nvlink, cudafe++, bin2c (nvidia-cuda-nvcc)
    cuda-nvvm-13-0            cicc, libdevice, libnvvm (nvidia-nvvm)
    cuda-crt-13-0             crt/ headers (nvidia-cuda-crt)
    cuda-cudart-13-0 / -dev   libcudart, the runtime headers (nvidia-cuda-runtime)
    cuda-cccl-13-0            CUB / Thrust / libcu++ (nvidia-cuda-cccl)
    libcublas-13-0 / -dev     cuBLAS + cuBLASLt (nvidia-cublas)
    cuda-driver-dev-13-0      lib64/stubs/libcuda.so: NVIDIA ships this stub in no wheel, so it is
                              built here from cuda.h — every cu* entry point returns
                              CUDA_ERROR_STUB_LIBRARY (34), as NVIDIA's stub does
  laid out as NVIDIA's packages are: /usr/local/cuda-13.0/{bin,nvvm,targets/x86_64-linux/{include,
  lib}}, include -> and lib64 -> targets/x86_64-linux/…, /usr/local/cuda -> (update-alternatives)
  /usr/local/cuda-13.0; nvcc is NOT on PATH.
  nvidia-open, nvidia-driver-580-open   driver stand-ins: what a driver package does that a
                              container can show — /usr/bin/nvidia-smi (the fake one; it answers
                              only once the "module" is loaded, i.e. after a reboot: a boot-time
                              unit marks /run/nvidia-stand-in/loaded), reboot-required flag.

Caches (under /var/cache/llama-rig-tests/nvidia-repo/): the wheels (pip download, ~530 MB), the
built .debs (~1 GB, uncompressed data: quick to build and to unpack), the signing key. Per
session only the keyring .deb (it names this session's URL) and the signed index are made.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import CACHE_ROOT, WORK_ROOT, flocked
from .aptproxy import PROXY_ADDR

CUDA = "13.0"
SUFFIX = "13-0"
PREFIX = f"usr/local/cuda-{CUDA}"
TARGET = f"{PREFIX}/targets/x86_64-linux"
WHEELS = {  # PyPI project -> version (a coherent CUDA 13.0 Update 2 set)
    "nvidia-cuda-nvcc": "13.0.88",
    "nvidia-nvvm": "13.0.88",
    "nvidia-cuda-crt": "13.0.88",
    "nvidia-cuda-runtime": "13.0.96",
    "nvidia-cuda-cccl": "13.0.85",
    "nvidia-cublas": "13.1.0.3",
}
DRIVER_VERSION = "580.95.05"
DISTRO, ARCH = "debian12", "x86_64"
RECIPE = "v1"  # bump when the package recipes below change (rebuilds the cached .debs)
ROOT = CACHE_ROOT / "nvidia-repo"
FAKE_SMI = Path(__file__).with_name("fake_nvidia_smi.py")


def _log(msg: str) -> None:
    print(f"[nvidia-repo] {msg}", file=sys.stderr, flush=True)


def sh(argv, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


# --------------------------------------------------------------------------------------------
# wheels


def wheels_dir() -> Path:
    key = hashlib.sha256(json.dumps(WHEELS, sort_keys=True).encode()).hexdigest()[:12]
    return ROOT / f"wheels-{key}"


def download_wheels() -> tuple[Path, dict]:
    """pip download the wheels once (cached); returns (dir, {"bytes": .., "seconds": ..})."""
    d = wheels_dir()
    stamp = d / ".complete"
    if stamp.exists():
        return d, json.loads(stamp.read_text())
    with flocked(ROOT / "wheels.lock"):
        if stamp.exists():
            return d, json.loads(stamp.read_text())
        tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        _log(f"pip download {' '.join(f'{k}=={v}' for k, v in WHEELS.items())}")
        sh([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform",
            "manylinux_2_27_x86_64", "--platform", "manylinux2014_x86_64", "--platform",
            "manylinux_2_17_x86_64", "--platform", "manylinux2010_x86_64", "--platform",
            "manylinux_2_12_x86_64", "--python-version", "3.11", "-d", tmp,
            *[f"{k}=={v}" for k, v in WHEELS.items()]], timeout=1800)
        got = sorted(p.name for p in tmp.glob("*.whl"))
        if len(got) != len(WHEELS):
            raise RuntimeError(f"expected {len(WHEELS)} wheels, got {got}")
        info = {"bytes": sum(p.stat().st_size for p in tmp.glob("*.whl")),
                "seconds": round(time.monotonic() - t0, 1), "wheels": got}
        (tmp / ".complete").write_text(json.dumps(info) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
        _log(f"wheels: {info['bytes'] / 1e6:.0f} MB in {info['seconds']}s")
        return d, info


def _wheel(d: Path, project: str) -> Path:
    name = project.replace("-", "_")
    (w,) = [p for p in d.glob(f"{name}-{WHEELS[project]}-*.whl")]
    return w


# --------------------------------------------------------------------------------------------
# .deb building


class Tree:
    """A package's file tree in a temp dir, plus its control data."""

    def __init__(self, root: Path, name: str, version: str, arch: str = "amd64"):
        self.root, self.name, self.version, self.arch = root / name, name, version, arch
        self.root.mkdir(parents=True)
        self.depends: list[str] = []
        self.extra: dict[str, str] = {}
        self.scripts: dict[str, str] = {}
        self.conffiles: list[str] = []
        self.description = name

    def put(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)

    def link(self, rel: str, target: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)

    def from_wheel(self, whl: Path, mapping) -> None:
        """Copy wheel members: mapping(member) -> (dest rel path, mode) or None (skip)."""
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                dest = mapping(info.filename)
                if dest is None:
                    continue
                rel, mode = dest
                self.put(rel, z.read(info), mode)

    def build(self, out_dir: Path) -> Path:
        deb = self.root / "DEBIAN"
        deb.mkdir(exist_ok=True)
        size = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file() and not f.is_symlink()) // 1024
        ctl = [f"Package: {self.name}", f"Version: {self.version}", f"Architecture: {self.arch}",
               "Maintainer: llama-rig tests <tests@llama-rig.invalid>", f"Installed-Size: {size}",
               "Section: devel", "Priority: optional"]
        if self.depends:
            ctl.append("Depends: " + ", ".join(self.depends))
        ctl += [f"{k}: {v}" for k, v in self.extra.items()]
        ctl.append(f"Description: {self.description}")
        (deb / "control").write_text("\n".join(ctl) + "\n")
        for script, body in self.scripts.items():
            (deb / script).write_text(body)
            os.chmod(deb / script, 0o755)
        if self.conffiles:
            (deb / "conffiles").write_text("".join(f"{c}\n" for c in self.conffiles))
        out = out_dir / f"{self.name}_{self.version}_{self.arch}.deb"
        sh(["dpkg-deb", "--root-owner-group", "-Znone", "--build", self.root, out], timeout=600)
        return out


def _exe(rel: str) -> int:
    return 0o755 if "/bin/" in f"/{rel}" and not rel.endswith((".profile", ".stub")) else 0o644


def _cu13(member: str, prefix: str = "nvidia/cu13/") -> str | None:
    if not member.startswith(prefix) or "/.metadata/" in member:
        return None
    return member[len(prefix):]


def _map_to_cuda(member: str):
    rel = _cu13(member)
    if rel is None:
        return None
    if rel.startswith(("bin/", "nvvm/")):
        return f"{PREFIX}/{rel}", _exe(rel)
    if rel.startswith("include/"):
        return f"{TARGET}/{rel}", 0o644
    if rel == "lib/libnvvm.so.4":
        return f"{PREFIX}/nvvm/lib64/libnvvm.so.4", 0o644
    if rel.startswith("lib/"):
        return f"{TARGET}/{rel}", 0o644
    return None


def _only(pred):
    def m(member: str):
        rel = _cu13(member)
        return _map_to_cuda(member) if rel is not None and pred(rel) else None
    return m


def stub_libcuda(include_dir: Path, out: Path) -> None:
    """libcuda.so stub from cuda.h's entry points (each returns CUDA_ERROR_STUB_LIBRARY)."""
    pre = subprocess.run(["gcc", "-E", "-I", str(include_dir), "-x", "c", "-"], input="#include <cuda.h>\n",
                         capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"CUresult\s+(cu[A-Za-z0-9_]+)\s*\(", pre)))
    src = out.with_suffix(".c")
    src.write_text("".join(f"int {n}(void) {{ return 34; }}\n" for n in names))
    sh(["gcc", "-shared", "-fPIC", "-O1", "-o", out, src, "-Wl,-soname,libcuda.so.1"], timeout=300)
    src.unlink()


def build_debs(wheels: Path, out: Path) -> list[Path]:
    """The toolkit's component packages + metapackage and the driver stand-ins."""
    v = {k: f"{val}-1" for k, val in WHEELS.items()}
    tv = v["nvidia-cuda-nvcc"]
    WORK_ROOT.mkdir(parents=True, exist_ok=True)  # a fresh machine has none yet
    work = Path(tempfile.mkdtemp(prefix="nvrepo-", dir=WORK_ROOT))
    debs: list[Path] = []
    try:
        def pkg(name: str, version: str, description: str, depends=(), arch="amd64") -> Tree:
            t = Tree(work, name, version, arch)
            t.description = description
            t.depends = list(depends)
            return t

        t = pkg(f"cuda-nvcc-{SUFFIX}", tv, "CUDA nvcc (from the nvidia-cuda-nvcc wheel)",
                [f"cuda-crt-{SUFFIX}", f"cuda-nvvm-{SUFFIX}"])
        t.from_wheel(_wheel(wheels, "nvidia-cuda-nvcc"), _map_to_cuda)
        debs.append(t.build(out))

        t = pkg(f"cuda-nvvm-{SUFFIX}", v["nvidia-nvvm"], "CUDA NVVM: cicc, libdevice, libnvvm (nvidia-nvvm)")
        t.from_wheel(_wheel(wheels, "nvidia-nvvm"), _map_to_cuda)
        t.link(f"{PREFIX}/nvvm/lib64/libnvvm.so", "libnvvm.so.4")
        debs.append(t.build(out))

        t = pkg(f"cuda-crt-{SUFFIX}", v["nvidia-cuda-crt"], "CUDA crt headers (nvidia-cuda-crt)")
        t.from_wheel(_wheel(wheels, "nvidia-cuda-crt"), _map_to_cuda)
        debs.append(t.build(out))

        rt = _wheel(wheels, "nvidia-cuda-runtime")
        t = pkg(f"cuda-cudart-{SUFFIX}", v["nvidia-cuda-runtime"], "CUDA runtime library (nvidia-cuda-runtime)")
        t.from_wheel(rt, _only(lambda r: r.startswith("lib/libcudart.so")))
        t.link(f"{PREFIX}/include", "targets/x86_64-linux/include")
        t.link(f"{PREFIX}/lib64", "targets/x86_64-linux/lib")
        t.put(f"etc/ld.so.conf.d/cuda-{SUFFIX}.conf", f"/{TARGET}/lib\n".encode())
        t.put("DEBIAN/triggers", b"activate-noawait ldconfig\n")
        debs.append(t.build(out))

        t = pkg(f"cuda-cudart-dev-{SUFFIX}", v["nvidia-cuda-runtime"], "CUDA runtime headers and static libraries",
                [f"cuda-cudart-{SUFFIX}", f"cuda-cccl-{SUFFIX}"])
        t.from_wheel(rt, _only(lambda r: not r.startswith("lib/libcudart.so")))
        t.link(f"{TARGET}/lib/libcudart.so", "libcudart.so.13")
        debs.append(t.build(out))

        t = pkg(f"cuda-cccl-{SUFFIX}", v["nvidia-cuda-cccl"], "CUDA CCCL: CUB, Thrust, libcu++ (nvidia-cuda-cccl)")
        t.from_wheel(_wheel(wheels, "nvidia-cuda-cccl"), _map_to_cuda)
        debs.append(t.build(out))

        cb = _wheel(wheels, "nvidia-cublas")
        t = pkg(f"libcublas-{SUFFIX}", v["nvidia-cublas"], "cuBLAS and cuBLASLt (nvidia-cublas)")
        t.from_wheel(cb, _only(lambda r: r.startswith("lib/")))
        debs.append(t.build(out))
        t = pkg(f"libcublas-dev-{SUFFIX}", v["nvidia-cublas"], "cuBLAS headers", [f"libcublas-{SUFFIX}"])
        t.from_wheel(cb, _only(lambda r: r.startswith("include/")))
        for lib in ("libcublas", "libcublasLt", "libnvblas"):
            t.link(f"{TARGET}/lib/{lib}.so", f"{lib}.so.13")
        debs.append(t.build(out))

        t = pkg(f"cuda-driver-dev-{SUFFIX}", v["nvidia-cuda-runtime"],
                "libcuda.so stub for linking (built from cuda.h: every entry point returns CUDA_ERROR_STUB_LIBRARY)",
                [f"cuda-cudart-{SUFFIX}"])
        inc = work / "inc"
        with zipfile.ZipFile(rt) as z:
            for m in z.namelist():
                if m.startswith("nvidia/cu13/include/") and not m.endswith("/"):
                    (inc / m[len("nvidia/cu13/include/"):]).parent.mkdir(parents=True, exist_ok=True)
                    (inc / m[len("nvidia/cu13/include/"):]).write_bytes(z.read(m))
        (t.root / f"{TARGET}/lib/stubs").mkdir(parents=True)
        stub_libcuda(inc, t.root / f"{TARGET}/lib/stubs/libcuda.so")
        debs.append(t.build(out))

        comps = [f"cuda-nvcc-{SUFFIX}", f"cuda-nvvm-{SUFFIX}", f"cuda-crt-{SUFFIX}", f"cuda-cudart-{SUFFIX}",
                 f"cuda-cudart-dev-{SUFFIX}", f"cuda-cccl-{SUFFIX}", f"libcublas-{SUFFIX}",
                 f"libcublas-dev-{SUFFIX}", f"cuda-driver-dev-{SUFFIX}"]
        t = pkg(f"cuda-toolkit-{SUFFIX}", tv, f"CUDA Toolkit {CUDA} (stand-in built from NVIDIA's PyPI wheels)", comps)
        t.put(f"{PREFIX}/version.json", json.dumps({"cuda": {"name": "CUDA SDK", "version": tv.split('-')[0]},
                                                   "stand_in": "llama-rig tests"}, indent=2).encode())
        t.scripts["postinst"] = (
            "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
            f"  update-alternatives --install /usr/local/cuda cuda /usr/local/cuda-{CUDA} 130\n"
            f"  update-alternatives --install /usr/local/cuda-13 cuda-13 /usr/local/cuda-{CUDA} 130\nfi\n")
        t.scripts["prerm"] = (
            "#!/bin/sh\nset -e\nif [ \"$1\" = remove ]; then\n"
            f"  update-alternatives --remove cuda /usr/local/cuda-{CUDA}\n"
            f"  update-alternatives --remove cuda-13 /usr/local/cuda-{CUDA}\nfi\n")
        debs.append(t.build(out))

        for name, other in (("nvidia-open", f"nvidia-driver-{DRIVER_VERSION.split('.')[0]}-open"),
                            (f"nvidia-driver-{DRIVER_VERSION.split('.')[0]}-open", "nvidia-open")):
            debs.append(driver_package(work, name, other).build(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return debs


NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


def driver_package(work: Path, name: str, conflicts: str) -> Tree:
    t = Tree(work, name, f"{DRIVER_VERSION}-1")
    t.description = ("NVIDIA driver stand-in for container tests: nvidia-smi (a fake that answers once "
                     "the module is 'loaded' at boot), a boot unit, the reboot-required flag")
    t.extra["Conflicts"] = conflicts
    t.extra["Provides"] = "nvidia-driver"
    t.put("usr/lib/nvidia-stand-in/nvidia-smi.py", FAKE_SMI.read_bytes(), 0o755)
    t.put("usr/bin/nvidia-smi", (
        "#!/bin/sh\n# stand-in: the kernel module is 'loaded' only after a boot (see nvidia-stand-in-load.service)\n"
        "if [ ! -e /run/nvidia-stand-in/loaded ]; then\n"
        f"  echo \"{NO_DRIVER}\"\n  exit 9\nfi\n"
        "exec /usr/lib/nvidia-stand-in/nvidia-smi.py \"$@\"\n").encode(), 0o755)
    t.put("usr/lib/systemd/system/nvidia-stand-in-load.service", (
        "[Unit]\nDescription=Load the NVIDIA kernel module (stand-in: marks it loaded)\n"
        "DefaultDependencies=no\nAfter=local-fs.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=/bin/sh -c 'mkdir -p /run/nvidia-stand-in && touch /run/nvidia-stand-in/loaded'\n\n"
        "[Install]\nWantedBy=multi-user.target\n").encode())
    t.scripts["postinst"] = (
        "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
        "  systemctl enable nvidia-stand-in-load.service >/dev/null 2>&1 || true\n"
        "  touch /var/run/reboot-required\n"
        f"  grep -qx {name} /var/run/reboot-required.pkgs 2>/dev/null || echo {name} >> /var/run/reboot-required.pkgs\n"
        "fi\n")
    t.scripts["prerm"] = (
        "#!/bin/sh\nset -e\nif [ \"$1\" = remove ]; then\n"
        "  systemctl disable nvidia-stand-in-load.service >/dev/null 2>&1 || true\nfi\n")
    return t


def debs_dir() -> tuple[Path, dict]:
    """The cached .debs (built once per recipe + wheel set) and a Packages file for them."""
    wdir, winfo = download_wheels()
    key = hashlib.sha256((RECIPE + wdir.name + FAKE_SMI.read_text()).encode()).hexdigest()[:12]
    d = ROOT / f"debs-{key}"
    stamp = d / ".complete"
    if stamp.exists():
        return d, json.loads(stamp.read_text())
    with flocked(ROOT / "debs.lock"):
        if stamp.exists():
            return d, json.loads(stamp.read_text())
        tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        debs = build_debs(wdir, tmp)
        pk = sh(["apt-ftparchive", "packages", "."], cwd=tmp, timeout=900).stdout
        (tmp / "Packages.part").write_text(pk)
        info = {"wheels": winfo, "debs": [p.name for p in debs],
                "deb_bytes": sum(p.stat().st_size for p in debs),
                "build_seconds": round(time.monotonic() - t0, 1)}
        (tmp / ".complete").write_text(json.dumps(info) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
        _log(f"built {len(debs)} .debs ({info['deb_bytes'] / 1e6:.0f} MB) in {info['build_seconds']}s")
        return d, info


# --------------------------------------------------------------------------------------------
# signing key


def _stop_agent(home: Path) -> None:
    """gpg starts a gpg-agent for this home; it would outlive the tests."""
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)


def signing_key() -> tuple[Path, str]:
    """(GNUPGHOME, fingerprint) of the repo's test key (made once, cached)."""
    home = ROOT / "gnupg"
    fpr_file = ROOT / "gnupg.fpr"
    with flocked(ROOT / "gnupg.lock"):
        if not fpr_file.exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True, mode=0o700)
            params = ("%no-protection\nKey-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\n"
                      "Name-Real: llama-rig stand-in CUDA repo\nName-Email: cuda-repo@llama-rig.invalid\n"
                      "Expire-Date: 0\n%commit\n")
            subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet", "--gen-key"], input=params,
                           text=True, check=True, capture_output=True)
            out = sh(["gpg", "--homedir", home, "--batch", "--with-colons", "--list-secret-keys"]).stdout
            fpr = next(ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:"))
            fpr_file.write_text(fpr + "\n")
            _stop_agent(home)
        return home, fpr_file.read_text().strip()


# --------------------------------------------------------------------------------------------
# the served repo (per session)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@dataclass
class NvidiaRepo:
    base_url: str  # system.cuda_repo
    fingerprint: str  # system.cuda_repo_key
    root: Path
    info: dict
    httpd: http.server.ThreadingHTTPServer | None = None

    toolkit = f"cuda-toolkit-{SUFFIX}"
    cuda_version = CUDA
    driver = "nvidia-open"

    @property
    def repo_url(self) -> str:
        return f"{self.base_url}/{DISTRO}/{ARCH}/"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        shutil.rmtree(self.root, ignore_errors=True)


def keyring_deb(work: Path, key_bytes: bytes, repo_url: str) -> Path:
    t = Tree(work, "cuda-keyring", "1.1-1", arch="all")
    t.description = "keyring and apt source of the llama-rig stand-in CUDA repo"
    t.put("usr/share/keyrings/cuda-archive-keyring.gpg", key_bytes)
    lst = f"etc/apt/sources.list.d/cuda-{DISTRO}-{ARCH}.list"
    t.put(lst, f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {repo_url} /\n".encode())
    t.conffiles.append(f"/{lst}")
    return t.build(work)


def serve(host: str = PROXY_ADDR) -> NvidiaRepo:
    """Build (or reuse) the packages, make this session's signed index and keyring, serve it on
    `host` (default the apt proxy's address, which every rig reaches; rigs go there DIRECT)."""
    debs, info = debs_dir()
    home, fpr = signing_key()
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="nvidia-repo-", dir=WORK_ROOT))
    os.chmod(root, 0o755)
    httpd = http.server.ThreadingHTTPServer((host, 0), functools.partial(_Quiet, directory=str(root)))
    httpd.daemon_threads = True
    base = f"http://{host}:{httpd.server_address[1]}/repos"
    repo = NvidiaRepo(base, fpr, root, info, httpd)
    try:
        d = root / "repos" / DISTRO / ARCH
        d.mkdir(parents=True)
        for name in info["debs"]:
            os.symlink(debs / name, d / name)
        key = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export", fpr],
                             capture_output=True, check=True).stdout
        work = Path(tempfile.mkdtemp(prefix="keyring-", dir=WORK_ROOT))
        try:
            kd = keyring_deb(work, key, repo.repo_url)
            shutil.copy(kd, d / "cuda-keyring_1.1-1_all.deb")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        extra = sh(["apt-ftparchive", "packages", "cuda-keyring_1.1-1_all.deb"], cwd=d).stdout
        extra = re.sub(r"^Filename: (?!\./)", "Filename: ./", extra, flags=re.M)
        (d / "Packages").write_text((debs / "Packages.part").read_text() + extra)
        sh(["gzip", "-k9", "Packages"], cwd=d)
        rel = sh(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=llama-rig stand-in",
                  "-o", "APT::FTPArchive::Release::Label=NVIDIA CUDA (stand-in)",
                  "-o", "APT::FTPArchive::Release::Architectures=amd64 all", "release", "."], cwd=d).stdout
        (d / "Release").write_text(rel)
        g = ["gpg", "--homedir", home, "--batch", "--yes", "--local-user", fpr]
        sh([*g, "--clearsign", "-o", d / "InRelease", d / "Release"])
        sh([*g, "--armor", "--detach-sign", "-o", d / "Release.gpg", d / "Release"])
        _stop_agent(home)
        threading.Thread(target=httpd.serve_forever, daemon=True, name="nvidia-repo").start()
    except BaseException:
        repo.stop()
        raise
    return repo
