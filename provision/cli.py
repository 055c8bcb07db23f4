"""The command line's exit contract for invoke's own errors.

invoke exits 1 when it cannot parse a task's arguments (an unknown flag, a flag without its value,
an unknown task, a missing positional argument). For llama-rig that is bad input: exit 2, like
every other refusal before a host is contacted. tasks.py calls bad_input_is_exit_2() when invoke
loads it -- which happens before invoke parses the task arguments -- so `invoke provision --hots x`
prints invoke's one line and exits 2. A word where a flag with a number default wants a number
(`--reps abc`) is one line too -- invoke itself would end in a ValueError traceback. (A mistake in
invoke's own flags before the task name, `invoke --bogus`, is seen before tasks.py is loaded and
stays invoke's exit 1.)
"""
from __future__ import annotations


def bad_input_is_exit_2() -> None:
    from invoke.exceptions import Exit, ParseError
    from invoke.parser import Argument
    from invoke.program import Program

    if getattr(Program, "_llama_rig_exit_2", False):
        return

    def wrap(method):
        def parse(self, *a, **kw):
            try:
                return method(self, *a, **kw)
            except ParseError as e:
                raise Exit(str(e), code=2) from None
        parse.__name__ = method.__name__
        parse.__doc__ = method.__doc__
        return parse

    set_value = Argument.set_value

    def checked_set_value(self, value, cast=True):
        try:
            return set_value(self, value, cast)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(self.kind, f"a {self.kind.__name__}")
            flag = ("-" if len(self.name) == 1 else "--") + self.name.replace("_", "-")
            shown = value if len(str(value)) <= 60 else str(value)[:60] + "…"
            raise ParseError(f"command line: {flag}: must be {what}, got {shown!r}") from None

    Argument.set_value = checked_set_value
    Program.parse_tasks = wrap(Program.parse_tasks)
    Program.parse_cleanup = wrap(Program.parse_cleanup)  # `invoke --help no-such-task`
    Program._llama_rig_exit_2 = True
