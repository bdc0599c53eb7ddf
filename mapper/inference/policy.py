"""The early-exit decision rule as pure functions (numpy only, no I/O).

A window is decided at the edge when the first exit is confident enough:

* ``max_prob``: the largest softmax probability is >= threshold (the model card's rule);
* ``entropy``: the normalised entropy H(p) / log(K) is <= threshold (DDNN's rule; 0 means
  certain, 1 means uniform). Its threshold is not interchangeable with max_prob's.

A share of confidently decided windows is offloaded anyway (an audit), so the accuracy of
the edge exit can be measured without bias; the random choice uses an injected RNG.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np

Score = Literal["max_prob", "entropy"]
SCORES: tuple[str, ...] = ("max_prob", "entropy")


class Rng(Protocol):
    def random(self) -> float: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def max_prob(probabilities: np.ndarray) -> float:
    return float(np.max(probabilities))


def normalised_entropy(probabilities: np.ndarray) -> float:
    """H(p) / log(K) in [0, 1]; 0 for a one-hot p, 1 for the uniform distribution."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    k = p.size
    if k < 2:
        return 0.0
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    return min(1.0, max(0.0, h / math.log(k)))


def score_value(probabilities: np.ndarray, score: Score) -> float:
    """The number the threshold is compared with (see the module docstring for direction)."""
    if score == "max_prob":
        return max_prob(probabilities)
    if score == "entropy":
        return normalised_entropy(probabilities)
    raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")


def should_exit(probabilities: np.ndarray, threshold: float, score: Score = "max_prob") -> bool:
    """True when the window is decided at the edge."""
    value = score_value(probabilities, score)
    return value >= threshold if score == "max_prob" else value <= threshold


def should_audit(rng: Rng, share: float) -> bool:
    """True for about `share` of calls: offload a confidently decided window anyway."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return rng.random() < share
