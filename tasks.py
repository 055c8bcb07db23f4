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


ns = Collection(provision, facts)
