"""Package exports imported on first use (PEP 562), so that light entry points such as `ayt --help`
can import a package's argument parser without loading torch through its `__init__`."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any]]:
    """(`__all__`, `__getattr__`) for `package` from {submodule: (names it exports, ...)}."""
    sources = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in sources:
            return getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(sources), __getattr__
