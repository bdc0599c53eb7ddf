"""The README's demo runs end to end: broker, mapper, live telemetry, a desired value applied."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_shows_telemetry_and_an_applied_desired_value():
    """`scripts/demo.py --duration 5` prints live readings, the twin exchange, decisions and a clean stop."""
    # Its own process group: if it hangs, its broker, mapper and worker go down with it.
    demo = subprocess.Popen([sys.executable, "scripts/demo.py", "--duration", "5"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate()
    assert demo.returncode == 0, err[-2000:]

    def shows(text: str) -> None:
        assert text in out, f"{text!r} is not in the demo's output:\n{out[-3000:]}"

    shows("data   room-sensor.temperature = ")
    shows("twin   fan-relay.power: desired=true reported=true")
    shows("fan-relay: the desired value reached the driver and came back as reported")
    shows("data   fan-relay.power = True")
    shows("outbox: 0 message(s)")
    # Inference: windows decided on the Pi, and uncertain ones answered by the worker the demo runs.
    shows("infer  room-sensor-faulty-sensor-faults: ")
    shows("(edge exit, confidence ")
    shows("(cloud exit, confidence ")
    # The latest decision is also in the twin, as the pipeline's derived device.
    shows("default/room-sensor-faulty-sensor-faults  model=")
    shows("protocol=derived")
    shows("demo stopped")
