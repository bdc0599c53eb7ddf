"""The benchmark harness, run tiny, for correctness only: no time is asserted here.

200 readings go the whole way (simulated devices -> twin -> outbox -> QoS 1 -> PUBACK -> outbox
cleared) to a mosquitto_sub process; every one arrives and the outbox is empty after a clean stop.
The benchmarks themselves run with `python -m tests.benchmarks` (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import Metric
from benchmarks.scenarios import smoke


@pytest.mark.timeout(60)
def test_two_hundred_readings_end_to_end(broker, tmp_path: Path) -> None:
    result = smoke(broker, tmp_path, readings=200)
    assert result["exit_code"] == 0
    assert result["committed"] >= 200
    assert result["lost"] == 0, result
    assert result["received"] == result["committed"], result
    assert result["outbox_depth"] == 0, result


def test_summary_reports_median_and_spread() -> None:
    m = Metric("x", "1/s", values=[3.0, 1.0, 2.0], baseline=[4.0, 4.0])
    s = m.summary(m.values)
    assert s is not None and (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert m.ratio() == 0.5
