"""The README's demo runs end to end: broker, mapper, live telemetry, a desired value applied."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_shows_telemetry_and_an_applied_desired_value():
    """`scripts/demo.py --duration 5` prints live readings, the twin exchange, decisions and a clean stop."""
    result = subprocess.run([sys.executable, "scripts/demo.py", "--duration", "5"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]

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
