"""Fault kinds of a cheap temperature + humidity sensor (DHT11/DHT22 style), in plain Python.

One module, no third-party imports, used twice:

* ``models/build_sensor_faults.py`` injects these faults into a real recorded room series to
  make the labelled training/validation/test data of the ``sensor_faults`` model;
* a simulated device driver can perturb its readings with the same fault kinds, one reading at
  a time, through :class:`FaultState`.

A reading is a pair ``(temperature_c, humidity_pct)``.  A fault *event* lasts ``length``
readings and is one of:

``spike``
    ``length`` (1-2) readings offset by ``+/-amplitude`` on one channel or both.
``stuck``
    the sensor repeats the last good reading (the one just before the event) for ``length``
    readings (both channels frozen), then returns to the true values.
``drift``
    a slow excursion: an offset that rises linearly to ``peak`` (signed) at the middle of the
    event and falls back to 0 at its end (a triangle), on one channel or both.
``noise``
    a noise burst: independent Gaussian noise of standard deviation ``sigma`` per channel on
    every reading of the event.

Magnitudes are drawn log-uniformly between the bounds in :data:`RANGES`, so small (subtle)
faults are as common per decade as large ones.  :func:`sample_params` draws one event's
parameters; :func:`inject` applies an event to a copy of a series; :class:`FaultState`
applies it reading by reading.  ``rng`` is anything with ``random()``, ``randint()``,
``choice()``, ``uniform()`` and ``gauss()`` (a :class:`random.Random`).
"""

from __future__ import annotations

import math

KINDS = ("spike", "stuck", "drift", "noise")
CHANNELS = ("temperature", "humidity", "both")

# Parameter ranges per kind: (low, high), inclusive; magnitudes are log-uniform between them.
# Temperature in degrees C, humidity in %RH, lengths in readings.
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "spike": {"length": (1, 2), "amplitude_t": (0.5, 4.0), "amplitude_h": (2.0, 15.0)},
    "stuck": {"length": (3, 12)},
    "drift": {"length": (8, 20), "peak_t": (0.5, 3.0), "peak_h": (2.0, 8.0)},
    "noise": {"length": (4, 12), "sigma_t": (0.15, 0.8), "sigma_h": (0.5, 3.0)},
}
# A window of readings is labelled with an event's kind when it holds at least this many of
# the event's readings (fewer: the window is ambiguous and left out of the data set); a drift
# window must moreover hold the excursion's peak (reading ``start + (length - 1) // 2``).
MIN_OVERLAP = {"spike": 1, "stuck": 3, "drift": 4, "noise": 3}


def _log_uniform(rng, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def sample_params(kind: str, rng) -> dict:
    """Draw the parameters of one fault event of ``kind`` from :data:`RANGES`."""
    if kind not in RANGES:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {KINDS}")
    r = RANGES[kind]
    params: dict = {"length": rng.randint(int(r["length"][0]), int(r["length"][1]))}
    if kind == "stuck":
        return params
    params["channels"] = rng.choice(CHANNELS)
    for key in r:
        if key != "length":
            value = _log_uniform(rng, *r[key])
            if kind != "noise":
                value *= rng.choice((-1.0, 1.0))
            params[key] = value
    return params


class FaultState:
    """One fault event, applied to the readings that follow, one at a time.

    ``last`` is the last good reading before the event (needed by ``stuck``).  Call
    :meth:`apply` with each true reading; it returns the faulty reading while the event lasts
    and the true reading afterwards (``done`` is then True).
    """

    def __init__(self, kind: str, rng, last: tuple[float, float] | None = None, **params):
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {KINDS}")
        if "length" not in params:
            params = {**sample_params(kind, rng), **params}
        self.kind, self.rng, self.params = kind, rng, params
        self.length = int(params["length"])
        self.last = last
        self.index = 0  # readings of the event applied so far

    @property
    def done(self) -> bool:
        return self.index >= self.length

    def _on(self, channel: str) -> bool:
        return self.params.get("channels", "both") in (channel, "both")

    def apply(self, temperature: float, humidity: float) -> tuple[float, float]:
        if self.done:
            self.last = (temperature, humidity)
            return temperature, humidity
        i, p = self.index, self.params
        self.index += 1
        t, h = temperature, humidity
        if self.kind == "spike":
            if self._on("temperature"):
                t += p["amplitude_t"]
            if self._on("humidity"):
                h += p["amplitude_h"]
        elif self.kind == "stuck":
            if self.last is None:  # nothing to hold yet: hold this reading
                self.last = (temperature, humidity)
            return self.last
        elif self.kind == "drift":
            shape = 1.0 - abs(2.0 * (i + 1) / (self.length + 1) - 1.0)  # 0 -> 1 -> 0
            if self._on("temperature"):
                t += p["peak_t"] * shape
            if self._on("humidity"):
                h += p["peak_h"] * shape
        elif self.kind == "noise":
            if self._on("temperature"):
                t += self.rng.gauss(0.0, p["sigma_t"])
            if self._on("humidity"):
                h += self.rng.gauss(0.0, p["sigma_h"])
        return t, min(100.0, max(0.0, h))


def inject(series, kind: str, rng, start: int = 0, **params) -> list[tuple[float, float]]:
    """Return a copy of ``series`` (a sequence of (temperature, humidity)) with one fault
    event of ``kind`` starting at reading ``start``.

    Parameters not given are drawn with :func:`sample_params`.  The event covers readings
    ``start .. start + length - 1`` (cut at the end of the series).
    """
    out = [(float(t), float(h)) for t, h in series]
    last = out[start - 1] if start > 0 else None
    state = FaultState(kind, rng, last=last, **params)
    for i in range(start, min(len(out), start + state.length)):
        out[i] = state.apply(*out[i])
    return out


def quantise(reading: tuple[float, float], step: float = 0.1) -> tuple[float, float]:
    """Round a reading to the sensor's resolution (DHT22: 0.1 C and 0.1 %RH; DHT11: 1)."""
    t, h = reading
    return round(round(t / step) * step, 10), round(round(h / step) * step, 10)
