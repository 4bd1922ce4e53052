"""Public names of a package, imported from their module on first use (PEP 562).

A subpackage's `__init__` lists its public API without importing it, so `import nas.study.storage`
does not pull in torch or matplotlib through its package, and the packages need no import order.
"""

from __future__ import annotations

import importlib


def public(package: str, exports: dict[str, list[str]]):
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose public names live in `exports` (module -> names)."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__, sorted(home)
