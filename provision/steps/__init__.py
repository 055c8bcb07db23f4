"""The provisioning steps, in the order `invoke provision` runs them.

Adding a step = writing one module with a `Step` subclass and listing it here.
"""
from __future__ import annotations

from ..engine import Step


def all_steps() -> list[Step]:
    from .facts import FactsStep
    from .llama import LlamaStep
    from .system import SystemStep

    steps: list[Step] = [FactsStep(), SystemStep(), LlamaStep()]
    return steps


def step_names() -> list[str]:
    return [s.name for s in all_steps()]
