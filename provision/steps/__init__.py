"""The provisioning steps, in the order `invoke provision` runs them.

Adding a step = writing one module with a `Step` subclass and listing it here.
"""
from __future__ import annotations

from ..engine import Step


def all_steps() -> list[Step]:
    from .facts import FactsStep
    from .gpu import GpuStep
    from .llama import LlamaStep
    from .model import ModelStep
    from .opencode import OpencodeStep
    from .rpc import RpcStep
    from .service import ServiceStep
    from .system import SystemStep

    # the service needs the llama build and the verified model; opencode needs the service's URL
    return [FactsStep(), SystemStep(), GpuStep(), LlamaStep(), ModelStep(), RpcStep(), ServiceStep(), OpencodeStep()]


def step_names() -> list[str]:
    return [s.name for s in all_steps()]
