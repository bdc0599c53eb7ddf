"""Log lines for refused input are throttled per reason; the counters keep every refusal."""

from __future__ import annotations

from mapper.logs import Throttle, held_note


def test_throttle_lets_a_burst_through_then_says_how_many_it_held_back():
    now = [100.0]
    throttle = Throttle(burst=3, interval_s=60.0, clock=lambda: now[0])
    assert [throttle("malformed") for _ in range(5)] == [0, 0, 0, None, None]
    assert throttle("unknown") == 0  # another key has its own allowance
    now[0] += 59.0
    assert throttle("malformed") is None
    now[0] += 1.0  # a new window: the first line carries what was held back
    assert throttle("malformed") == 3
    assert throttle("malformed") == 0
    assert held_note(3) == " (3 more like this not logged)" and held_note(0) == ""

