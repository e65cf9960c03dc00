"""Package attributes imported on first use.

``store``, ``prefast``, ``prefast.data`` and ``prefast.freezeout`` name what they export in a
table instead of importing it, so ``python -m store --help``, ``prefast --help`` and a wrong
flag are answered without importing torch (seconds), and a Ctrl-C while a command starts
reaches its handler instead of interrupting an import. ``from store import open`` or
``from prefast import train`` imports the module then, as before. (Here, in ``store``: the
store imports nothing from prefast.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any


def exports(
    package: str, table: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps each module to the names
    the package takes from it. A subpackage or submodule (``prefast.models``) is imported on
    first use too, as an eager ``__init__`` would have made it an attribute."""
    where = {name: module for module, names in table.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        elif (
            name.isidentifier()
            and not name.startswith("__")
            and importlib.util.find_spec(f"{package}.{name}")
        ):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
