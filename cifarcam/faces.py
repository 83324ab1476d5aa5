"""A stage package's face: the names other stages (and the jobs) may use, each loaded from its
module on first use (PEP 562). Importing a package so costs nothing until a name is used:
``jobs.cam --help`` reads ``cifarcam.cam``'s settings without loading torch."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_face(package: str, exports: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``, whose public names are
    ``exports`` (module within the package -> the names it defines)."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # found once; later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__, sorted(home)
