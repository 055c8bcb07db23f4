"""The provisioning steps, in the order `invoke provision` runs them.

Adding a step = writing one module with a `Step` subclass and listing it in STEPS.
"""
from __future__ import annotations

import importlib

from ..engine import Change, Context, Step

# name -> (module, class); the service needs the llama build and the verified model; opencode
# needs the service's URL
STEPS = {
    "facts": ("facts", "FactsStep"),
    "system": ("system", "SystemStep"),
    "gpu": ("gpu", "GpuStep"),
    "llama": ("llama", "LlamaStep"),
    "model": ("model", "ModelStep"),
    "rpc": ("rpc", "RpcStep"),
    "service": ("service", "ServiceStep"),
    "opencode": ("opencode", "OpencodeStep"),
}


class NotSelected(Step):
    """A step this run does not run (--only/--skip): its name only, its module not even imported
    (a run of a few steps starts faster). The engine reports it skipped and never plans it."""

    def __init__(self, name: str):
        self.name = name
        self.title = name

    def plan(self, ctx: Context) -> list[Change]:
        raise AssertionError(f"step {self.name} was not selected")


def load(name: str) -> Step:
    module, cls = STEPS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


def all_steps(only: list[str] | None = None, skip: list[str] | None = None) -> list[Step]:
    """Every step, in order; with `only`/`skip` the ones that will not run are `NotSelected`."""
    return [load(n) if (not only or n in only) and not (skip and n in skip) else NotSelected(n)
            for n in STEPS]


def step_names() -> list[str]:
    return list(STEPS)
