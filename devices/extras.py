"""The command that installs one of the mapper's extras (`pi`, `ml`, `kubeedge`) into this
installation, for the errors that need one, and which of the modules one brings are missing.

The mapper is installed from its source tree (a checkout; /opt/mapper/src on a Pi, docs/raspberry-pi.md),
not from PyPI: `pip install 'mapper[ml]'`, the advice these errors gave, installs whatever PyPI
has under that name, into whichever environment that `pip` belongs to. pip records where it
installed a package from (`direct_url.json`), so the command names this interpreter's pip and that
source tree.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys


def install_extra(extra: str) -> str:
    """`[sudo ]PYTHON -m pip install [-e ]'SOURCE[extra]'` for this installation; without a recorded
    source tree, the same run in the mapper's source tree (`'.[extra]'`)."""
    import json
    import sysconfig
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    source, editable = None, False
    for found in metadata.distributions(name="mapper"):  # (a checkout's mapper.egg-info records none)
        try:
            recorded = found.read_text("direct_url.json")
            info = json.loads(recorded) if recorded else {}
            url = urlparse(info.get("url", ""))
        except (ValueError, OSError, AttributeError):
            continue
        if url.scheme == "file" and url.path:
            source, editable = unquote(url.path), bool(info.get("dir_info", {}).get("editable"))
            break
    sudo = "" if os.access(sysconfig.get_paths()["purelib"], os.W_OK) else "sudo "
    command = f"{sudo}{shlex.quote(sys.executable)} -m pip install {'-e ' if editable else ''}"
    if source is None:
        return f"{command}'.[{extra}]' in the mapper's source tree"
    return command + shlex.quote(f"{source}[{extra}]")


def missing_modules(*names: str) -> list[str]:
    """Those of the modules `names` this Python cannot import, found without importing them (a Pi's
    libraries probe the board when imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # its package missing, a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing
