"""Unit tests for the llama step: flag mapping, fingerprints, version parsing, names, plan as data."""
from __future__ import annotations

import json

import pytest

from provision import inventory as inv
from provision import llama_build as lb
from provision.engine import Call
from provision import llama_tasks as lt
from provision.steps import llama as ls

SHA = "4341dc8bc0123456789abcdef0123456789abcde"
SHA2 = "abcdef0123456789abcdef0123456789abcdef01"
NEW_TREE = lb.TreeFacts("GGML_CUDA_FA_QUANTS",
                        frozenset({"llama-server", "llama-bench", "llama-fit-params", "ggml-rpc-server"}),
                        6895, False, "4341dc8bc")
OLD_TREE = lb.TreeFacts("GGML_CUDA_FA_ALL_QUANTS",
                        frozenset({"llama-server", "llama-bench", "rpc-server"}), 5000, False, "4341dc8")


def cfg(**llama) -> dict:
    data = {"hosts": {"rig": {"connection": {"type": "local"}, "llama_cpp": llama}}}
    return inv.from_data(data).hosts["rig"].cfg


def dvals(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        if a.startswith("-D"):
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


# -- flag mapping ---------------------------------------------------------------------------------


def test_new_tree_gets_fa_quants_all():
    args = lb.cmake_args(cfg(), NEW_TREE, ["86"])
    d = dvals(args)
    assert d["GGML_CUDA_FA_QUANTS"] == "all"
    assert "GGML_CUDA_FA_ALL_QUANTS" not in d
    assert d["GGML_CUDA"] == "ON"
    assert d["CMAKE_CUDA_ARCHITECTURES"] == "86"
    assert d["BUILD_SHARED_LIBS"] == "OFF"
    assert d["LLAMA_BUILD_TESTS"] == "OFF" and d["LLAMA_BUILD_EXAMPLES"] == "OFF"
    assert d["GGML_CCACHE"] == "ON"
    assert d["GGML_NATIVE"] == "ON"
    assert d["LLAMA_USE_PREBUILT_UI"] == "ON"
    assert d["GGML_RPC"] == "OFF"
    assert args[:2] == ["-G", "Ninja"]


def test_old_tree_gets_fa_all_quants_on():
    d = dvals(lb.cmake_args(cfg(), OLD_TREE, ["86"]))
    assert d["GGML_CUDA_FA_ALL_QUANTS"] == "ON"
    assert "GGML_CUDA_FA_QUANTS" not in d


def test_fa_all_quants_off_passes_neither():
    d = dvals(lb.cmake_args(cfg(fa_all_quants=False), NEW_TREE, ["86"]))
    assert "GGML_CUDA_FA_QUANTS" not in d and "GGML_CUDA_FA_ALL_QUANTS" not in d


def test_cuda_off_has_no_fa_or_arch_flags():
    d = dvals(lb.cmake_args(cfg(cuda=False), NEW_TREE, []))
    assert d["GGML_CUDA"] == "OFF"
    assert not [k for k in d if "FA" in k or "ARCHITECTURES" in k]


def test_cuda_on_without_archs_is_an_error():
    with pytest.raises(lb.BuildConfigError, match="cuda_architectures"):
        lb.cmake_args(cfg(), NEW_TREE, [])


@pytest.mark.parametrize("override,caps,expect", [
    ("auto", ["8.6"], ["86"]),
    ("auto", ["8.6", "8.6", "8.6"], ["86"]),
    ("auto", ["9.0", "8.6", "8.9", "8.6"], ["86", "89", "90"]),
    ("auto", ["12.0", "9.0"], ["90", "120"]),
    ("auto", [None, "8.6"], ["86"]),
    (["75", "86"], ["9.0"], ["75", "86"]),
    (["86"], ["9.0", "8.6"], ["86"]),
    (["90a"], [], ["90a"]),
    ("auto", [], []),
])
def test_gpu_archs(override, caps, expect):
    assert lb.gpu_archs(override, caps) == expect


def test_arch_override_from_inventory():
    c = cfg(cuda_architectures=["80", "86"])
    w = ls.want(c, SHA, NEW_TREE, ["9.0"], "12.2.0", "12.8")
    assert dvals(w.args)["CMAKE_CUDA_ARCHITECTURES"] == "80;86"
    assert ls.want(cfg(), SHA, NEW_TREE, ["9.0", "8.6"], "12.2.0", "12.8").archs == ["86", "90"]


def test_rpc_uses_the_target_the_tree_has():
    t_new, _ = lb.build_targets(cfg(rpc=True), NEW_TREE)
    t_old, missing = lb.build_targets(cfg(rpc=True), OLD_TREE)
    assert "ggml-rpc-server" in t_new and "rpc-server" not in t_new
    assert "rpc-server" in t_old and "ggml-rpc-server" not in t_old
    assert missing == ["llama-fit-params"]  # the old tree has none
    assert dvals(lb.cmake_args(cfg(rpc=True), NEW_TREE, ["86"]))["GGML_RPC"] == "ON"


def test_rpc_without_any_rpc_target_is_an_error():
    tree = lb.TreeFacts("GGML_CUDA_FA_QUANTS", frozenset({"llama-server"}), 1)
    with pytest.raises(lb.BuildConfigError, match="rpc"):
        lb.build_targets(cfg(rpc=True), tree)


def test_targets_default_and_missing_server():
    t, missing = lb.build_targets(cfg(), NEW_TREE)
    assert t == ["llama-server", "llama-bench", "llama-fit-params"] and missing == []
    t, _ = lb.build_targets(cfg(targets=["llama-bench"]), NEW_TREE)
    assert t[0] == "llama-server"  # always built: the service needs it
    with pytest.raises(lb.BuildConfigError, match="llama-server"):
        lb.build_targets(cfg(), lb.TreeFacts(None, frozenset({"llama-bench"}), 1))


def test_prebuilt_ui_native_and_extra_options():
    c = cfg(prebuilt_ui=False, native=False,
            cmake_options={"GGML_CUDA_FORCE_MMQ": True, "CMAKE_CUDA_COMPILER": "/usr/local/cuda/bin/nvcc"})
    args = lb.cmake_args(c, NEW_TREE, ["86"])
    d = dvals(args)
    assert d["LLAMA_USE_PREBUILT_UI"] == "OFF"
    assert d["GGML_NATIVE"] == "OFF"
    assert d["GGML_CUDA_FORCE_MMQ"] == "ON"
    assert d["CMAKE_CUDA_COMPILER"] == "/usr/local/cuda/bin/nvcc"
    assert args[-2:] == ["-DGGML_CUDA_FORCE_MMQ=ON", "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"]


@pytest.mark.parametrize("bad", ["A B", "-DX", "X;rm -rf /", "", "1ABC"])
def test_bad_cmake_option_names_rejected(bad):
    # the inventory refuses these when it loads (tests/catalog); this is the second fence
    c = cfg()
    c["llama_cpp"]["cmake_options"] = {bad: "1"}
    with pytest.raises(lb.BuildConfigError, match="not a CMake variable"):
        lb.cmake_args(c, NEW_TREE, ["86"])


def test_cmake_option_with_type_suffix_ok():
    assert "-DFOO:BOOL=ON" in lb.cmake_args(cfg(cmake_options={"FOO:BOOL": "ON"}), NEW_TREE, ["86"])


def test_shallow_clone_passes_build_number_and_commit():
    tree = lb.TreeFacts("GGML_CUDA_FA_QUANTS", NEW_TREE.targets, 1, True, "4341dc8")
    w = ls.want(cfg(ref="b6895"), SHA, tree, ["8.6"], "12.2.0", "12.8", ref="b6895")
    d = dvals(w.args)
    assert d["LLAMA_BUILD_NUMBER"] == "6895" and d["LLAMA_BUILD_COMMIT"] == SHA[:9]
    assert w.name.startswith("b6895-4341dc8-")
    full = ls.want(cfg(), SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8")
    assert "LLAMA_BUILD_NUMBER" not in dvals(full.args)


def test_describe():
    assert lb.describe(cfg(), NEW_TREE, ["86"]) == "CUDA 86, FA all quants"
    assert lb.describe(cfg(cuda=False, rpc=True), NEW_TREE, []) == "CPU only, RPC"


# -- tree facts -----------------------------------------------------------------------------------


def test_parse_tree_new_and_old():
    out = ("@@fa\noption(GGML_CUDA_FA_ALL_QUANTS\nset   (GGML_CUDA_FA_QUANTS\n"
           "@@targets\nset(TARGET llama-server)\nset(TARGET ggml-rpc-server)\n"
           "    add_executable(${TARGET} main.cpp)\nadd_executable(llama-fit-params main.cpp)\n"
           "@@count\n6895\n@@shallow\nfalse\n@@short\n4341dc8\n")
    t = lb.parse_tree(out)
    assert t.fa_flag == "GGML_CUDA_FA_QUANTS"
    assert t.targets == {"llama-server", "ggml-rpc-server", "llama-fit-params"}
    assert (t.commit_count, t.shallow, t.short_commit, t.rpc_target) == (6895, False, "4341dc8",
                                                                        "ggml-rpc-server")
    old = lb.parse_tree("@@fa\noption(GGML_CUDA_FA_ALL_QUANTS\n@@targets\nset(TARGET rpc-server)\n"
                        "@@count\n12\n@@shallow\ntrue\n@@short\n")
    assert old.fa_flag == "GGML_CUDA_FA_ALL_QUANTS" and old.rpc_target == "rpc-server"
    assert old.shallow and old.short_commit is None
    assert lb.parse_tree("").fa_flag is None


# -- fingerprints / names ---------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive():
    args = lb.cmake_args(cfg(), NEW_TREE, ["86"])
    base = lb.fingerprint(SHA, args, "12.2.0", "12.8", ["86"], ["llama-server"])
    assert base == lb.fingerprint(SHA, list(args), "12.2.0", "12.8", ["86"], ["llama-server"])
    assert len(base) == 64
    variants = [
        lb.fingerprint(SHA2, args, "12.2.0", "12.8", ["86"], ["llama-server"]),
        lb.fingerprint(SHA, args + ["-DX=1"], "12.2.0", "12.8", ["86"], ["llama-server"]),
        lb.fingerprint(SHA, lb.cmake_args(cfg(native=False), NEW_TREE, ["86"]), "12.2.0", "12.8",
                       ["86"], ["llama-server"]),
        lb.fingerprint(SHA, args, "13.2.0", "12.8", ["86"], ["llama-server"]),
        lb.fingerprint(SHA, args, "12.2.0", "13.0", ["86"], ["llama-server"]),
        lb.fingerprint(SHA, args, "12.2.0", "12.8", ["90"], ["llama-server"]),
        lb.fingerprint(SHA, args, "12.2.0", "12.8", ["86"], ["llama-server", "llama-bench"]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_want_fingerprint_changes_with_any_flag():
    base = ls.want(cfg(), SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8").fingerprint
    for over in ({"fa_all_quants": False}, {"rpc": True}, {"prebuilt_ui": False}, {"native": False},
                 {"cmake_options": {"GGML_CUDA_FORCE_MMQ": "ON"}}, {"cuda_architectures": ["89"]}):
        assert ls.want(cfg(**over), SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8").fingerprint != base, over
    # cuda off: nvcc no longer matters
    a = ls.want(cfg(cuda=False), SHA, NEW_TREE, [], "12.2.0", "12.8")
    b = ls.want(cfg(cuda=False), SHA, NEW_TREE, [], "12.2.0", None)
    assert a.fingerprint == b.fingerprint
    # jobs and keep_builds do not change the binaries
    assert ls.want(cfg(jobs=3, keep_builds=7), SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8").fingerprint == base


def test_build_dir_name():
    fp = "deadbeefcafe" + "0" * 52
    assert lb.build_dir_name(6895, SHA, fp) == "b6895-4341dc8-deadbeef"
    assert lb.build_dir_name(None, SHA, fp) == "b0-4341dc8-deadbeef"


# -- version / help ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,expect", [
    ("version: 6895 (4341dc8bc)\nbuilt with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu\n",
     (6895, "4341dc8bc")),
    ("version: 0.5.0-dev (build 6895, commit 4341dc8bc)\nbuilt with GNU 12.2.0 for Linux x86_64\n",
     (6895, "4341dc8bc")),
    ("ggml_cuda_init: found 1 CUDA devices:\n  Device 0: NVIDIA H100\nversion: 0.5.0 (build 7001, commit abcdef0)\n",
     (7001, "abcdef0")),
    ("version: 0.5.0-dev (build 0, commit unknown)\n", (0, "unknown")),
])
def test_parse_version(text, expect):
    assert lb.parse_version(text) == expect


@pytest.mark.parametrize("garbage", ["", "error: unknown argument --version", "version: dev\n",
                                     "llama-server: not found"])
def test_parse_version_garbage(garbage):
    with pytest.raises(ValueError, match="cannot parse"):
        lb.parse_version(garbage)


def test_version_matches():
    assert lb.version_matches((6895, "4341dc8bc"), 6895, SHA)
    assert not lb.version_matches((6894, "4341dc8bc"), 6895, SHA)
    assert not lb.version_matches((6895, "abcdef0"), 6895, SHA)
    assert not lb.version_matches((0, "unknown"), 0, SHA)


def test_server_flags_and_help():
    c = cfg()
    c["server"]["tensor_split"] = [0.9, 1]
    c["server"]["extra_args"] = ["--metrics", "--rpc", "h1:50052", "--ctx-checkpoints=4", "-1"]
    flags = lb.server_flags(c)
    for f in ["-m", "--host", "--port", "-ngl", "-c", "-ctk", "-ctv", "--parallel", "--split-mode",
              "-ts", "--no-warmup", "--temp", "--top-p", "--top-k", "--min-p", "--jinja", "--alias",
              "--metrics", "--no-slots", "--rpc", "--ctx-checkpoints"]:
        assert f in flags
    c["server"]["slots"] = True
    assert "--no-slots" not in lb.server_flags(c)
    assert "-1" not in flags and "h1:50052" not in flags
    help_text = "\n".join(f"{f}, --x-{i}  something" for i, f in enumerate(flags) if f != "--rpc")
    assert lb.missing_flags(help_text, flags) == ["--rpc"]
    # a prefix is not a match: --top is not --top-p
    assert lb.missing_flags("--top-p N", ["--top"]) == ["--top"]


# -- refs, progress, ccache, prune ------------------------------------------------------------


def test_ref_kinds_and_ls_remote():
    assert lb.ref_kind(SHA) == "commit"
    assert lb.ref_kind("b6895") == "tag" and lb.ref_kind("v0.5.0") == "tag"
    assert lb.ref_kind("master") == "branch" and lb.ref_kind("4341dc8") == "short"
    out = (f"{SHA}\trefs/heads/b6895\n{SHA2}\trefs/tags/b6895\n"
           f"{'1' * 40}\trefs/tags/b6895^{{}}\n{'2' * 40}\trefs/heads/master\n")
    assert lb.parse_ls_remote(out, "b6895") == "1" * 40  # the peeled tag
    assert lb.parse_ls_remote(out, "master") == "2" * 40
    assert lb.parse_ls_remote(out, "nope") is None
    assert lb.local_rev("master") == ["refs/remotes/origin/master", "refs/tags/master"]


def test_ninja_progress_and_compiles():
    assert lb.ninja_progress("[12/345] Building CXX object common/CMakeFiles/x.o") == (12, 345, "Building CXX object common/CMakeFiles/x.o")
    assert lb.is_compile("Building CUDA object ggml/src/ggml-cuda/fattn.cu.o")
    assert not lb.is_compile("Linking CXX executable bin/llama-server")
    assert lb.ninja_progress("FAILED: foo.o") is None


def test_ccache_stats():
    before = lb.parse_ccache_stats("direct_cache_hit\t3\npreprocessed_cache_hit\t1\ncache_miss\t10\n")
    after = lb.parse_ccache_stats("direct_cache_hit\t200\npreprocessed_cache_hit\t1\ncache_miss\t12\n")
    assert lb.stats_delta(before, after) == {"hits": 197, "misses": 2}


def test_prune_keeps_current_and_previous():
    builds = [lb.BuildInfo(f"b{i}", f"fp{i}", SHA, i, float(i)) for i in range(6)]
    assert lb.prune(builds, 3, "b5", "b4") == ["b2", "b1", "b0"]
    assert lb.prune(builds, 1, "b5", "b0") == ["b4", "b3", "b2", "b1"]
    assert lb.prune(builds, 2, "b1", "b0") == ["b3", "b2"]  # rolled back: old ones stay


# -- plan as data ---------------------------------------------------------------------------------


def _view(current=None, builds=()):
    v = ls.RigView(current=current, src_url="git://x/llama.cpp")
    for name, fp in builds:
        v.builds[name] = lb.BuildInfo(name, fp, SHA, 6895, 1.0)
    return v


def test_plan_same_fingerprint_no_change():
    c = cfg()
    w = ls.want(c, SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8")
    assert ls.plan(c, _view(w.name, [(w.name, w.fingerprint)]), w, SHA) == []


def test_plan_new_build_described():
    c = cfg()
    w = ls.want(c, SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8")
    ch = ls.plan(c, _view("b1-old-x", [("b1-old-x", "other")]), w, SHA)
    assert len(ch) == 1 and isinstance(ch[0], Call)
    assert ch[0].description == (f"build llama.cpp b6895-4341dc8 (CUDA 86, FA all quants) → builds/{w.name}")
    assert ch[0].data["action"] == "build" and ch[0].data["fingerprint"] == w.fingerprint
    assert ch[0].notify == ("llama-server.restart",)


def test_plan_flag_change_means_new_build():
    c, c2 = cfg(), cfg(cmake_options={"GGML_CUDA_FORCE_MMQ": "ON"})
    w = ls.want(c, SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8")
    w2 = ls.want(c2, SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8")
    ch = ls.plan(c2, _view(w.name, [(w.name, w.fingerprint)]), w2, SHA)
    assert ch[0].data["action"] == "build" and ch[0].data["name"] == w2.name != w.name


def test_plan_existing_build_not_current_is_a_switch():
    c = cfg()
    w = ls.want(c, SHA, NEW_TREE, ["8.6"], "12.2.0", "12.8")
    ch = ls.plan(c, _view("b2-other", [(w.name, w.fingerprint), ("b2-other", "x")]), w, SHA)
    assert ch[0].data == {"action": "switch", "commit": SHA, "name": w.name, "fingerprint": w.fingerprint}
    assert ch[0].description.startswith("switch llama.cpp current")


def test_plan_commit_not_fetched_yet():
    ch = ls.plan(cfg(), _view(), None, SHA2)
    assert ch[0].data["action"] == "build" and "fetch and build" in ch[0].description
    assert SHA2[:7] in ch[0].description


def test_parse_view():
    info = {"fingerprint": "f" * 64, "commit": SHA, "build_number": 7, "built_at": 5}
    out = ("@@current\nbuilds/b7-4341dc8-ffffffff\n@@src\ngit://h/llama.cpp\n@@builds\n"
           f"@@b b7-4341dc8-ffffffff\n{json.dumps(info, indent=2)}\n\n@@b broken\n{{not json\n")
    v = ls.parse_view(out)
    assert v.current == "b7-4341dc8-ffffffff" and v.src_url == "git://h/llama.cpp"
    assert list(v.builds) == ["b7-4341dc8-ffffffff"]
    assert v.with_fingerprint("f" * 64).build_number == 7
    empty = ls.parse_view("@@current\n@@src\n@@builds\n")
    assert empty.current is None and empty.src_url is None and not empty.builds


def test_previous_build():
    v = _view("b3", [("b1", "1"), ("b2", "2"), ("b3", "3")])
    v.builds["b1"].built_at, v.builds["b2"].built_at, v.builds["b3"].built_at = 1, 2, 3
    assert lt.previous_build(v, "b1") == "b1"
    assert lt.previous_build(v, "gone") == "b2"
    assert lt.previous_build(_view("b3", [("b3", "3")]), None) is None


# -- the real tree (the upstream fixture: llama.cpp as vendored in llama-cpp-python) -------------


def test_tree_script_on_the_real_tree(llama_upstream):
    import subprocess
    out = subprocess.run(["bash", "-c", lb.tree_script(str(llama_upstream.path), llama_upstream.head())],
                         capture_output=True, text=True, check=True).stdout
    t = lb.parse_tree(out)
    assert t.fa_flag == "GGML_CUDA_FA_QUANTS"  # this tree is new enough: FA_QUANTS=all
    assert {"llama-server", "llama-bench", "llama-fit-params", "ggml-rpc-server"} <= t.targets
    assert t.rpc_target == "ggml-rpc-server"
    assert t.commit_count == llama_upstream.commit_count() and not t.shallow
    assert llama_upstream.head().startswith(t.short_commit)
    args = lb.cmake_args(cfg(rpc=True), t, ["90"])
    assert "-DGGML_CUDA_FA_QUANTS=all" in args and "-DGGML_RPC=ON" in args


def test_plain_progress_every_ten_percent():
    import io

    from provision.console import Console, Environment
    from provision.engine import Context
    host = inv.from_data({"hosts": {"rig": {"connection": {"type": "local"}}}}).hosts["rig"]
    buf = io.StringIO()
    ctx = Context(host, None, Console(Environment(buf, io.StringIO(), False)))
    p = ls.Progress(ctx, "build b1-x-y")
    for i in range(1, 201):
        p(f"[{i}/200] {'Building CXX object a.o' if i < 200 else 'Linking CXX executable bin/llama-server'}")
    p("some compiler warning")
    p.close()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[rig] llama: build b1-x-y: [1/200] 0%"
    assert lines[-1] == "[rig] llama: build b1-x-y: [200/200] 100%"
    assert len(lines) == 11 and p.compiled == 199


# -- llama.update: restart, health, automatic rollback (service hooks faked) --------------------


class _FakeLlama:
    """Stands in for ls.Llama: records switches; the build 'b2' is what ensure() produces."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.switched: list[str] = []
        self.lc = {"ref": "master"}
        _FakeLlama.last = self

    def view(self):
        v = ls.RigView(current=self.switched[-1] if self.switched else "b1", src_url="x")
        for n, t in (("b1", 1.0), ("b2", 2.0)):
            v.builds[n] = lb.BuildInfo(n, "fp" + n, SHA if n == "b1" else SHA2, 1, t)
        return v

    def sync(self, view):
        return SHA2

    def git(self, args, **kw):
        from provision.target import Result
        return Result(args, 0, "1\n" if "rev-list" in args else "abcdef0 a change\n", "")

    def ensure(self, view=None, sha=None):
        self.switched.append("b2")
        return ls.Outcome("b2", SHA2, built=True, switched=True, previous="b1")

    def switch(self, name):
        self.switched.append(name)

    def record(self, current, previous):
        self.recorded = (current, previous)


def _update_ctx(monkeypatch, healthy):
    import io

    from provision.console import Console, Environment
    from provision.engine import Context
    from provision.errors import StepError
    host = inv.from_data({"hosts": {"rig": {"connection": {"type": "local"}}}}).hosts["rig"]
    out = io.StringIO()
    ctx = Context(host, None, Console(Environment(out, out, False)))
    restarts: list[str] = []

    def restart(c):
        restarts.append(_FakeLlama.last.switched[-1])
        if not healthy(restarts[-1]):
            raise StepError(f"{restarts[-1]}: /health never returned 200")

    monkeypatch.setattr(lt, "Llama", _FakeLlama)
    monkeypatch.setattr(lt, "unit_installed", lambda c: True)
    monkeypatch.setattr(lt, "restart_and_wait", restart)
    return ctx, out, restarts


def test_update_restarts_and_stays_when_healthy(monkeypatch):
    ctx, out, restarts = _update_ctx(monkeypatch, lambda b: True)
    assert lt.task_update(ctx) is True
    assert restarts == ["b2"] and _FakeLlama.last.switched == ["b2"]
    assert "1 new commit(s)" in out.getvalue() and "abcdef0 a change" in out.getvalue()


def test_update_rolls_back_when_unhealthy(monkeypatch):
    from provision.errors import StepError
    ctx, out, restarts = _update_ctx(monkeypatch, lambda b: b != "b2")
    with pytest.raises(StepError, match="failed its health check; rolled back to b1"):
        lt.task_update(ctx)
    assert restarts == ["b2", "b1"]  # restarted on the new build, then again on the old one
    assert _FakeLlama.last.switched == ["b2", "b1"] and _FakeLlama.last.recorded == ("b1", "b2")
