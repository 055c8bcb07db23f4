"""invoke tasks for llama-rig. Thin: parse flags, call provision.app. See `invoke --list`."""
from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit

from provision.app import App

HOST_HELP = {
    "host": "host name(s) from hosts.yaml, comma-separated, or a group name",
    "all": "every host in the inventory",
    "inventory": "inventory file (default: hosts.yaml)",
    "set": "override an inventory key for this run: SECTION.KEY=VALUE (repeatable)",
}


def _app(inventory: str, overrides) -> App:
    return App(inventory_path=inventory, overrides=list(overrides or []))


def _exit(status) -> None:
    if int(status) != 0:
        raise Exit(code=int(status))


@task(auto_shortflags=False, iterable=["set"], help={
    **HOST_HELP,
    "check": "show the plan, change nothing",
    "diff": "show unified diffs of the files that change",
    "only": "run only these steps (comma-separated)",
    "skip": "skip these steps (comma-separated)",
    "parallel": "hosts handled at once (default 4)",
})
def provision(c, host=None, all=False, check=False, diff=False, only=None, skip=None,
              inventory="hosts.yaml", set=None, parallel=4):
    """Bring hosts to the state in hosts.yaml (idempotent; --check to preview)."""
    _exit(_app(inventory, set).provision(host, all, check=check, diff=diff, only=only, skip=skip,
                                         parallel=int(parallel)))


@task(auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def facts(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show what a host has: OS, CPU, RAM, disk, GPUs, driver, CUDA, nvcc."""
    _exit(_app(inventory, set).facts(host, all))



# -- llama.cpp: build / update / rollback / status --------------------------------------------


def _llama(inventory, set, host, all, fn_name: str, title: str) -> None:
    from provision.steps import llama as llama_step
    _exit(_app(inventory, set).each_host(host, getattr(llama_step, fn_name), title=title,
                                         all_hosts=all))


@task(name="build", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_build(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Build llama.cpp at llama_cpp.ref with the inventory's flags unless that build exists; switch."""
    _llama(inventory, set, host, all, "task_build", "llama.build")


@task(name="update", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_update(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Fetch upstream, show new commits, build, switch, restart; roll back if unhealthy."""
    _llama(inventory, set, host, all, "task_update", "llama.update")


@task(name="rollback", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_rollback(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Switch llama.cpp back to the previous kept build (and restart llama-server)."""
    _llama(inventory, set, host, all, "task_rollback", "llama.rollback")


@task(name="status", auto_shortflags=False, iterable=["set"], help=HOST_HELP)
def llama_status(c, host=None, all=False, inventory="hosts.yaml", set=None):
    """Show the current llama.cpp build, commit, fingerprint, kept builds, disk and ccache."""
    _llama(inventory, set, host, all, "task_status", "llama.status")


llama = Collection("llama")
for _t in (llama_build, llama_update, llama_rollback, llama_status):
    llama.add_task(_t)

ns = Collection(provision, facts)
ns.add_collection(llama)
