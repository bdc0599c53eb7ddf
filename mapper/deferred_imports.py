"""Load on first use the stdlib modules a library imports at import time but a mapper seldom uses.

paho-mqtt imports `urllib.request` (and through it `http.client`, `email.parser`,
`email.feedparser`, `urllib.response`, `urllib.error`) for one thing: reading an `mqtt_proxy`
from the environment when PySocks is installed (`Client._get_proxy`); without PySocks it never
touches the module. Loading them costs the cost scenario's mapper 0.57 MiB of RssAnon (its
imports, with onnxruntime: 24.13 -> 23.56 MiB). A stand-in takes the module's place in
sys.modules (and as its package's attribute) and imports the real module at the first attribute
asked of it, then holds all of the real module's names: whoever uses it gets the real module,
only later. `import urllib.request` alone asks the stand-in nothing.

Must run before the modules that import them (mapper/entry.py). A module already imported is
left alone; `python -m mapper.precompile` imports the real one, so its bytecode is compiled.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

DEFERRED = ("urllib.request",)

_lock = threading.Lock()  # two threads asking at once load the module once


class _Deferred(types.ModuleType):
    """Stands in for a module not loaded yet: the first attribute asked of it loads the real one."""

    def __getattr__(self, name: str) -> object:  # only for names the stand-in does not hold yet
        with _lock:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)  # also sets the package's attribute to it
            vars(self).update(vars(real))  # a reference to the stand-in taken earlier reads these
        return getattr(real, name)


def defer_imports(names: tuple[str, ...] = DEFERRED) -> list[str]:
    """Put a stand-in in place of each module not imported yet; returns the names deferred."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)  # imports the package (urllib), not the module
        if spec is None:
            continue
        module = _Deferred(name)
        module.__spec__ = spec  # the import system reads it for a module already in sys.modules
        sys.modules[name] = module
        package, _, child = name.rpartition(".")
        if package:
            setattr(sys.modules[package], child, module)
        deferred.append(name)
    return deferred
