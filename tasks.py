"""invoke tasks for llama-rig. Thin: parse flags, call provision.app. See `invoke --list`."""
from __future__ import annotations

import sys

# invoke turns .pyc writing off before it loads a tasks file (`--write-pyc` turns it back on), so
# every module imported from here on was compiled from source on EVERY run (~0.1-0.3 s of CPU per
# task from a checkout). llama-rig's library is an ordinary package: cache its bytecode, unless
# the user asked Python not to (-B, PYTHONDONTWRITEBYTECODE).
sys.dont_write_bytecode = bool(sys.flags.dont_write_bytecode)

from invoke import Collection, task  # noqa: E402
from invoke.exceptions import Exit  # noqa: E402

from provision import options as opt  # noqa: E402
from provision.app import App  # noqa: E402
from provision.cli import bad_input_is_exit_2  # noqa: E402
from provision.errors import UsageError  # noqa: E402
from provision.inventory import STEP_SECTIONS  # noqa: E402
from provision.steps import step_names  # noqa: E402

bad_input_is_exit_2()  # invoke's own parse errors (unknown flag, missing value) exit 2 as well

HOST_HELP = {
    "host": "host name(s) from hosts.yaml, comma-separated, or a group name",
    "all": "every host in the inventory",
    "inventory": "inventory file (default: hosts.yaml)",
    "set": "override an inventory key for this run: SECTION.KEY=VALUE (repeatable); SECTION is one "
           "of " + ", ".join(STEP_SECTIONS),
}


def _app(inventory: str, overrides) -> App:
    return App(inventory_path=inventory, overrides=list(overrides or []))


def _exit(status) -> None:
    if int(status) != 0:
        raise Exit(code=int(status))


def _options(build):
    """Read and check a task's options before any host is contacted: one line and exit 2."""
    try:
        return opt.parse(build)
    except UsageError as e:
        raise Exit(str(e), code=2) from None


def _each(inventory, set, host, all, fn, title: str, changes: bool = False) -> None:
    """fn(ctx) on each selected host; `changes`: it may change the rig (held under the run lock)."""
    _exit(_app(inventory, set).each_host(host, fn, title=title, all_hosts=all, changes=changes))


@task(auto_shortflags=False, iterable=["set"], help={
    **HOST_HELP,
    "check": "show the plan, change nothing",
    "diff": "show unified diffs of the files that change",
    "only": "run only these steps (comma-separated): " + ", ".join(step_names()),
    "skip": "skip these steps (comma-separated): " + ", ".join(step_names()),
    "parallel": f"hosts handled at once, {opt.PARALLEL[0]} to {opt.PARALLEL[1]} (default 4)",
    "lock": "reproduce this lock file (llama.cpp commit + flags, model sha + bytes); else each host's lock: key",
    "reboot": "reboot a host that needs it (a new NVIDIA driver), wait for SSH, and go on",
    "from": "copy verified shards and a matching build from this rig of the inventory (else hub / build)",
})
def provision(c, host=None, all=False, check=False, diff=False, only=None, skip=None,
              inventory="hosts.yaml", set=None, parallel=None, lock=None, reboot=False, from_=None):
    """Bring hosts to the state in hosts.yaml (idempotent; --check to preview)."""
    n = _options(lambda: opt.integer("--parallel", parallel, 4, *opt.PARALLEL))
    _exit(_app(inventory, set).provision(host, all, check=check, diff=diff, only=only, skip=skip,
                                         parallel=n, lock=lock, reboot=reboot, source=from_))


@task(auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def facts(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show what a host has: OS, CPU, RAM, disk, GPUs, driver, CUDA, nvcc."""
    _exit(_app(inventory, set).facts(host, all))



# -- llama.cpp: build / update / rollback / status --------------------------------------------


def _llama(inventory, set, host, all, fn_name: str, title: str, changes: bool) -> None:
    from provision import llama_tasks
    _each(inventory, set, host, all, getattr(llama_tasks, fn_name), title, changes=changes)


@task(name="build", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_build(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Build llama.cpp at llama_cpp.ref with the inventory's flags unless that build exists; switch."""
    _llama(inventory, set, host, all, "task_build", "llama.build", changes=True)


@task(name="update", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_update(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Fetch upstream, show new commits, build, switch, restart; roll back if unhealthy."""
    _llama(inventory, set, host, all, "task_update", "llama.update", changes=True)


@task(name="rollback", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_rollback(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Switch llama.cpp back to the previous kept build (and restart llama-server)."""
    _llama(inventory, set, host, all, "task_rollback", "llama.rollback", changes=True)


@task(name="status", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_status(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show the current llama.cpp build, commit, fingerprint, kept builds, disk and ccache."""
    _llama(inventory, set, host, all, "task_status", "llama.status", changes=False)


llama = Collection("llama")
for _t in (llama_build, llama_update, llama_rollback, llama_status):
    llama.add_task(_t)

@task(auto_shortflags=False, iterable=["set"], help={
    "host": "host name(s) from hosts.yaml, comma-separated, or a group name (default: every host)",
    "all": "every host in the inventory (the default)",
    "inventory": HOST_HELP["inventory"], "set": HOST_HELP["set"],
    "watch": "redraw the table every --interval seconds until Ctrl-C",
    "interval": "seconds between refreshes with --watch: 0.5 to 86400 (default 5)",
    "json": "print JSON (one object per host) for scripts"})
def status(c, host=None, all=False, watch=False, interval=None, json=False, inventory="hosts.yaml", set=None):
    """One row per host: service, health, build, model, drift from its lock, GPUs, requests, tokens/s."""
    from provision import fleet
    every = _options(lambda: opt.number("--interval", interval, *opt.INTERVAL))
    app = _app(inventory, set)
    _exit(app.guarded(lambda: fleet.run(app, host, all, watch=watch, interval=5.0 if every is None else every,
                                        as_json=json)))


ns = Collection(provision, facts, status)
ns.add_collection(llama)


# -- bench / tune -------------------------------------------------------------------------------


@task(auto_shortflags=False, iterable=["set"], help={
    **HOST_HELP,
    "depths": "comma-separated context depths (default 4096,8192,16384,32768,65536,131072,198000)",
    "reps": "repetitions per point (llama-bench -r, default 3)",
    "ttft": "measure TTFT through llama-server (--no-ttft: derive it from prefill t/s)",
    "service": "auto (stop llama-server only if its VRAM is needed), stop, or keep",
    "baseline": "baseline JSON to compare with (default: the seed's table), or none",
    "binary": "llama-bench path on the rig (default <prefix>/llama.cpp/current/bin/llama-bench)",
    "model": "model path on the rig (default: the service's shard 1, only once verified)",
    "results": "results folder on this machine (default results/)",
    "prompt": "prompt tokens per prefill test (-p, default 512)",
    "gen": "generated tokens per decode test (-n, default 128)",
})
def bench(c, host=None, all=False, depths=None, reps=3, ttft=True, service="auto", baseline=None,
          binary=None, model=None, results="results", prompt=512, gen=128, inventory="hosts.yaml", set=None):
    """Context sweep with llama-bench: prefill/decode t/s, TTFT, GPU power, tokens/kWh, charts."""
    from provision.bench import flags as bf, guard, results as br, sweep
    app = _app(inventory, set)

    def go():
        opts = sweep.BenchOptions(
            depths=bf.parse_depths(depths), reps=bf.parse_count(reps, "reps"), ttft=ttft,
            service=guard.parse_service_policy(service), binary=binary, model=model, results_root=results,
            n_prompt=bf.parse_count(prompt, "prompt"), n_gen=bf.parse_count(gen, "gen"),
            baseline=baseline or str(br.DEFAULT_BASELINE))
        return app.each_host(host, lambda ctx: sweep.run_bench(ctx, opts), title="bench",
                             all_hosts=all, parallel=1, changes=True, restores=True)
    _exit(app.guarded(go))


@task(auto_shortflags=False, iterable=["set"], help={
    **HOST_HELP,
    "power": "sweep GPU power limits instead: decode/prefill t/s, W and tokens/kWh per limit, the knee",
    "watts": "with --power: the limits to try, e.g. 250,275,300,350 (default: min..default limit in 6 steps)",
    "keep": "with --power: the knee keeps this share of the best decode t/s (default 0.95)",
    "depth": "batch: prompt length tuned for (pp<depth>, default 8192); --power: context depth (default 4096)",
    "reps": "separate llama-bench runs of every point (default 3; a winner needs 3)",
    "pairs": "ubatch/batch pairs to try, e.g. 512/2048,4096/4096 (default: 11 pairs from 512/2048 up)",
    "splits": "with several GPUs also try -ts variants and split modes (--no-splits: pairs only)",
    "apply": "write the winner into the host's entry in the inventory (only a gain beyond the noise)",
    "service": "auto (stop llama-server only if its VRAM is needed), stop, or keep",
    "binary": "llama-bench path on the rig",
    "model": "model path on the rig (default: the service's shard 1, only once verified)",
    "results": "results folder on this machine (default results/)",
})
def tune(c, host=None, all=False, power=False, watts=None, keep=None, depth=None, reps=3, pairs=None,
         splits=True, apply=False, service="auto", binary=None, model=None, results="results",
         inventory="hosts.yaml", set=None):
    """Sweep -ub/-b, -ts and split modes (or --power limits) vs the current flags; --apply writes a significant win."""
    from provision.bench import flags as bf, guard
    from provision.tune import options as o
    app = _app(inventory, set)

    def go():
        opts = o.TuneOptions(power=power, watts=o.parse_watts(watts), keep=o.parse_keep(keep),
                             depth=None if depth is None else bf.parse_count(depth, "depth", minimum=0),
                             reps=o.parse_reps(reps), pairs=o.parse_pairs(pairs), splits=splits,
                             apply=apply, service=guard.parse_service_policy(service), binary=binary,
                             model=model, results_root=results, inventory_path=inventory)
        o.check_mode(opts, watts=watts, keep=keep, pairs=pairs)

        def run(ctx):
            if power:
                from provision.tune.power import run_power_tune
                return bool(run_power_tune(ctx, opts)["applied"])
            from provision.tune.batch import run_batch_tune
            return bool(run_batch_tune(ctx, opts)["applied"])
        return app.each_host(host, run, title="tune", all_hosts=all, parallel=1, changes=True)
    _exit(app.guarded(go))


ns.add_task(bench)
ns.add_task(tune)


# -- gpu / service / opencode -------------------------------------------------------------------


@task(name="power", auto_shortflags=False, iterable=["set"],
      help={**HOST_HELP, "watts": f"set every GPU to this limit for now, {opt.WATTS[0]} to {opt.WATTS[1]} W"
                                  " and within each board's own range (boot unit unchanged)"})
def gpu_power(c, host=None, all=False, watts=None, inventory="hosts.yaml", set=None):
    """Apply persistence mode and power limits (inventory, or --watts N for all GPUs now)."""
    from provision.steps import gpu as g
    w = _options(lambda: opt.number("--watts", watts, *opt.WATTS))
    _each(inventory, set, host, all, lambda ctx: g.apply_now(ctx, w), "gpu.power", changes=True)


@task(name="status", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def gpu_status(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show each GPU: index, name, power limit and range, draw, memory used/total."""
    from provision.steps import gpu as g
    _each(inventory, set, host, all, lambda ctx: bool(g.status_table(ctx)), "gpu.status")


@task(name="status", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def service_status(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show llama-server: systemd state, /health, /props build_info, /v1/models id."""
    from provision.steps import service as s
    _each(inventory, set, host, all, s.status, "service.status")


@task(name="logs", auto_shortflags=False, iterable=["set"],
      help={**HOST_HELP, "n": f"how many journal lines, {opt.LOG_LINES[0]} to {opt.LOG_LINES[1]} (default 50)"})
def service_logs(c, host=None, all=False, n=None, inventory="hosts.yaml", set=None):
    """Show the last lines of llama-server's journal."""
    from provision.steps import service as s
    lines = _options(lambda: opt.integer("-n", n, 50, *opt.LOG_LINES))
    _each(inventory, set, host, all, lambda ctx: s.logs(ctx, lines), "service.logs")


@task(name="restart", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def service_restart(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Restart llama-server, wait for /health and test one chat completion."""
    from provision.steps import service as s
    _each(inventory, set, host, all, s.restart, "service.restart", changes=True)


@task(name="argv", auto_shortflags=False, iterable=["set"],
      help={**HOST_HELP, "model": "model shard 1 path on the rig (default: the model step's verified "
                                  "shard 1, read from the rig); with --model the rig is not contacted"})
def service_argv(c, host=None, all=False, model=None, inventory="hosts.yaml", set=None):
    """Print the rendered llama-server command line (the unit's ExecStart=)."""
    from provision.steps import service as s
    path = _options(lambda: opt.rig_path("--model", model))
    if path:  # nothing to read from the rig: render it here
        app = _app(inventory, set)

        def show() -> int:
            for h in app.hosts(host, all):
                app.console.line(s.argv_for(h.cfg, path))
            return 0
        _exit(app.guarded(show))
        return
    _each(inventory, set, host, all, lambda ctx: s.print_argv(ctx, None), "service.argv")


@task(name="config", auto_shortflags=False, iterable=["set"],
      help={**HOST_HELP, "local": "merge into this machine's opencode config instead of the rig's",
            "check": "show what would change, change nothing"})
def opencode_config(c, host=None, all=False, local=False, check=False, inventory="hosts.yaml", set=None):
    """Merge the llama-cpp provider into opencode.json (on the rig, or --local here)."""
    from provision.steps import opencode as o
    app = _app(inventory, set)
    if local:
        _exit(app.guarded(lambda: o.task_local(app, host, all, check)))
        return
    _each(inventory, set, host, all, lambda ctx: o.task_rig(ctx, check), "opencode.config",
          changes=not check)


gpu = Collection("gpu")
for _t in (gpu_power, gpu_status):
    gpu.add_task(_t)
service = Collection("service")
for _t in (service_status, service_logs, service_restart, service_argv):
    service.add_task(_t)
opencode = Collection("opencode")
opencode.add_task(opencode_config)
ns.add_collection(gpu)
ns.add_collection(service)
ns.add_collection(opencode)


# -- lock files ---------------------------------------------------------------------------------

LOCK_HELP = {"inventory": HOST_HELP["inventory"], "set": HOST_HELP["set"]}


@task(name="diff", auto_shortflags=False, iterable=["set"], help={
    **LOCK_HELP, "left": "a host (its lock is read live from the rig) or a lock file",
    "right": "the other host or lock file"})
def lock_diff(c, left, right, inventory="hosts.yaml", set=None):
    """Compare two hosts' locks (read live) or two lock files; exit 1 if they differ."""
    _exit(_app(inventory, set).lock_diff(left, right))


@task(name="show", auto_shortflags=False, iterable=["set"], help={
    **LOCK_HELP, "host": "a host (its lock is read live from the rig) or a lock file"})
def lock_show(c, host, inventory="hosts.yaml", set=None):
    """Print a host's lock as it would be written now (read live), or a lock file."""
    _exit(_app(inventory, set).lock_show(host))


lock = Collection("lock")
for _t in (lock_diff, lock_show):
    lock.add_task(_t)
ns.add_collection(lock)


# -- model: pull / verify / status --------------------------------------------------------------


@task(name="pull", auto_shortflags=False, iterable=["set"],
      help={**HOST_HELP, "check": "show what would be downloaded/verified, change nothing"})
def model_pull(c, host=None, all=False, check=False, inventory="hosts.yaml", set=None):
    """Resolve the pinned revision, download missing shards on the rig, verify every sha256."""
    _exit(_app(inventory, set).provision(host, all, check=check, only="model"))


@task(name="verify", auto_shortflags=False, iterable=["set"],
      help={**HOST_HELP, "full": "re-hash every shard, even those verified and unchanged since"})
def model_verify(c, host=None, all=False, full=False, inventory="hosts.yaml", set=None):
    """Hash the shards on the rig against lfs.sha256 (only changed ones unless --full)."""
    from provision.steps import model as m
    _each(inventory, set, host, all, lambda ctx: m.verify_action(ctx, full), "model.verify", changes=True)


@task(name="status", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def model_status(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show the model repo, pinned sha, files with size and verified state, disk free."""
    from provision.steps import model as m
    _each(inventory, set, host, all, m.status_action, "model.status")


@task(name="update", auto_shortflags=False, iterable=["set"], help={
    **HOST_HELP, "revision": "branch, tag or commit to move to (default: the branch the pin came from)",
    "check": "show the new commits, changed files and the plan; change nothing"})
def model_update(c, host=None, all=False, revision=None, check=False, inventory="hosts.yaml", set=None):
    """New hub commit: stage changed shards while the old model serves, verify, switch, restart; roll back if unhealthy."""
    from provision.model.update import UpdateOptions, task_update
    rev = _options(lambda: opt.revision("--revision", revision))
    app = _app(inventory, set)
    opts = UpdateOptions(revision=rev, check=check, inventory_path=inventory, lock_dir=str(app.lock_dir()))
    _exit(app.each_host(host, lambda ctx: task_update(ctx, opts), title="model.update", all_hosts=all,
                        parallel=1, changes=not check))


model = Collection("model")
for _t in (model_pull, model_verify, model_status, model_update):
    model.add_task(_t)
ns.add_collection(model)
