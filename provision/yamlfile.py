"""YAML files a person writes (hosts.yaml, lock files): parsed safely -- plain data only, a
key given twice refused, nesting and size bounded -- and every problem one line naming the file,
line and column (InventoryError, exit status 2)."""
from __future__ import annotations

from typing import Any

import yaml

from . import values
from .errors import InventoryError
from .values import cut

MAX_FILE_BYTES = 1 << 20  # an inventory (or a lock file) is at most 1 MiB
MAX_DEPTH = 64  # nesting levels of YAML collections


class _Loader(yaml.SafeLoader):
    """SafeLoader that

    * refuses a key given twice in one mapping (plain YAML keeps the last one, so a second `rig:`
      entry would silently replace the first) -- but only keys written out: a merge key
      (`<<: *defaults`) followed by one of the merged keys is an override, as YAML means it;
    * refuses collections nested deeper than MAX_DEPTH (PyYAML composes recursively: 2,000 levels
      would end in a RecursionError).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:
                    continue  # unhashable: the base class says so, with the place
                if dup:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {cut(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses int() of more than 4,300 digits
            raise yaml.constructor.ConstructorError(
                None, None, "integer too long", node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def parse_yaml(text: str, fname: str) -> Any:
    """YAML text -> data (safe: plain data only), every problem one line `fname: line L, column C:
    ...` (InventoryError)."""
    if len(text) > MAX_FILE_BYTES:
        raise InventoryError(f"{fname}: {len(text) / (1 << 20):.1f} MiB is too large "
                             f"(at most {MAX_FILE_BYTES >> 20} MiB)")
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InventoryError(f"{fname}: {loc}YAML syntax error: {values.clip(problem)}") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4,300 digits
        raise InventoryError(f"{fname}: YAML value not usable: {values.clip(str(e), 120)}") from None
    except RecursionError:
        raise InventoryError(f"{fname}: YAML nested too deeply") from None
