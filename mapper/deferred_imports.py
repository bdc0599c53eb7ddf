"""Load on first use the stdlib modules a library imports at import time but a mapper seldom uses.

* paho-mqtt imports `urllib.request` (and through it `http.client`, `email.parser`,
  `email.feedparser`, `urllib.response`, `urllib.error`) for one thing: reading an `mqtt_proxy`
  from the environment when PySocks is installed (`Client._get_proxy`); without PySocks it never
  touches the module. Loading them costs the cost scenario's mapper 0.57 MiB of RssAnon (its
  imports, with onnxruntime: 24.13 -> 23.56 MiB).
* importlib.metadata (the driver entry points; pydantic's plugin loader) imports `csv`, for a
  distribution's RECORD file, and through importlib.resources `tempfile`, to extract a resource
  from a zip; reading entry points needs neither (0.14 MiB more with onnxruntime, 0.17 without).

A stand-in takes each module's place in sys.modules (and as its package's attribute) and imports
the real module at the first attribute asked of it, then holds all of the real module's names:
whoever uses it gets the real module, only later. `import urllib.request` alone asks the
stand-in nothing.

Not importlib.util.LazyLoader: on Python 3.11 its module is not safe when two threads touch it first
(one sees it half-loaded: CPython gh-114763, fixed in 3.12.3 and 3.13), and the mapper has threads.

Must run before the modules that import them (mapper/entry.py). A module already imported is
left alone; `python -m mapper.precompile` imports the real one, so its bytecode is compiled.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

DEFERRED = ("urllib.request", "csv", "tempfile")

# Taking the stand-in out of sys.modules, once. The import itself runs outside it: importlib's
# own lock for the module makes a second thread wait for the first one's import, and loading one
# module may load another deferred one (urllib.request imports tempfile).
_lock = threading.Lock()


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
        # What the import system reads of a module already in sys.modules, and tools that walk
        # sys.modules read of each (inspect.getmodule: __file__): the real module's, no load.
        module.__spec__, module.__loader__, module.__package__ = spec, spec.loader, spec.parent
        module.__file__ = spec.origin
        sys.modules[name] = module
        package, _, child = name.rpartition(".")
        if package:
            setattr(sys.modules[package], child, module)
        deferred.append(name)
    return deferred
