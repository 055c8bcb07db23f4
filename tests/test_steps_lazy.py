"""A run of a few steps imports only those steps (start-up time of a no-op `provision --only`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provision.engine import select_steps
from provision.errors import UsageError
from provision.steps import NotSelected, all_steps, step_names

ROOT = Path(__file__).resolve().parents[1]


def test_unselected_steps_are_names_only():
    steps = all_steps(["facts", "gpu"])
    assert [s.name for s in steps] == step_names() == ["facts", "system", "gpu", "llama", "model", "rpc",
                                                       "service", "opencode"]
    assert [type(s).__name__ for s in steps] == ["FactsStep", "NotSelected", "GpuStep", "NotSelected",
                                                 "NotSelected", "NotSelected", "NotSelected", "NotSelected"]
    assert [type(s).__name__ for s in all_steps(skip=["model"])][3:5] == ["LlamaStep", "NotSelected"]
    with pytest.raises(AssertionError):
        NotSelected("llama").plan(None)
    with pytest.raises(UsageError, match="unknown step 'gpuu' \\(did you mean 'gpu'\\?\\)"):
        select_steps(all_steps(["gpuu"]), ["gpuu"], None)


def test_a_no_op_of_three_steps_does_not_import_the_others():
    code = ("import sys; from provision.steps import all_steps; all_steps(['facts', 'system', 'gpu']); "
            "print(sorted(m for m in sys.modules if m.startswith('provision.steps.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['provision.steps.facts', 'provision.steps.gpu', 'provision.steps.system']"
