"""mapper/deferred_imports.py: a running mapper never loads urllib.request (and http.client, which it
imports) that paho imports for a proxy it reads only with PySocks, nor csv and tempfile that
importlib.metadata imports; whoever uses one gets the real module."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import write_devices
from mapper_proc import MapperProcess

REPO = Path(__file__).resolve().parents[1]


def imported(log: str) -> set[str]:
    """The modules a process imported, from its `-X importtime` lines (PYTHONPROFILEIMPORTTIME)."""
    return {line.rsplit("|", 1)[1].strip() for line in log.splitlines() if line.startswith("import time:")}


def test_mapper_run_never_loads_urllib_request(broker, tmp_path: Path) -> None:
    """`python -m mapper run` on a plain mqtt:// broker: connected, publishing, and none of
    urllib.request, http.client, csv and tempfile imported (paho and importlib.metadata are), nor
    prometheus_client without `metrics:`."""
    devices = write_devices(tmp_path / "dev", ["lamp"], cycle=100)
    with MapperProcess(tmp_path, devices, broker, env={"PYTHONPROFILEIMPORTTIME": "1"}) as mapper, \
            broker.client("app") as app:
        app.subscribe("mapper/test-node/default/lamp/count")
        mapper.wait_log("connected to mqtt://")
        assert app.next_message(timeout=10).topic == "mapper/test-node/default/lamp/count"
        assert mapper.stop() == 0
    modules = imported(mapper.log())
    assert {"paho.mqtt.client", "urllib.parse", "importlib.metadata"} <= modules
    assert not {"urllib.request", "http.client", "csv", "tempfile"} & modules
    assert "prometheus_client" not in modules  # (the `metrics` extra: only with `metrics:` in the config)


def test_the_first_use_loads_the_real_module() -> None:
    """Every way of using the module gets the real one: the package's attribute, `from ... import`,
    a reference to the stand-in taken before (as paho's `import urllib.request` binds the package)."""
    check = """
        import sys
        from mapper.deferred_imports import defer_imports
        assert defer_imports() == ["urllib.request", "csv", "tempfile"]
        import urllib.request
        early = sys.modules["urllib.request"]
        assert "http.client" not in sys.modules
        assert isinstance(urllib.request.getproxies(), dict)  # loads it
        assert "http.client" in sys.modules
        real = sys.modules["urllib.request"]
        assert real is not early and urllib.request is real
        from urllib.request import Request
        assert Request is real.Request and early.Request is real.Request and early.urlopen is real.urlopen
        import tempfile
        with tempfile.TemporaryDirectory() as directory:  # a stand-in of a top-level module
            assert type(sys.modules["tempfile"]).__name__ == "module" and directory
        assert defer_imports() == []  # imported: left alone
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(check)], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env=os.environ)
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr
