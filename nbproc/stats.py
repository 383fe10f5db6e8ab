"""Bounded-memory timing statistics for the run engine.

The Go reference keeps a timestamp per item for the whole run, so its memory grows with every
record; a stream that runs for a week would eventually exhaust the processor. Here every timing
series is summarised by :class:`Sampler`: exact streaming min / max / weighted mean over all
samples it was given, and a fixed-size uniform reservoir (Vitter's algorithm R) for the median.
Memory per sampler is constant (``reservoir`` floats), whatever the number of items.

Accuracy: min, max and mean are exact *over the samples*; the median is the exact median of a
uniform random subset of at most ``reservoir`` samples (default 2048), so its rank error is about
``1/sqrt(2048)`` ~ 2% of the samples (the reported value lies between the 48th and 52nd
percentile with high probability). What a "sample" is (one per batch, not one per item) is
decided by the engine and documented there.
"""

from __future__ import annotations

import random
import threading

DEFAULT_RESERVOIR = 2048


class Sampler:
    """Streaming summary of integer nanosecond samples; thread-safe, O(1) memory."""

    __slots__ = ("_lock", "_res", "_size", "_seen", "_rng", "min", "max", "_wsum", "_weight")

    def __init__(self, reservoir: int = DEFAULT_RESERVOIR, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._res: list[int] = []
        self._size = reservoir
        self._seen = 0
        # A private generator: the user's random.seed() must not change our sampling and ours
        # must not consume their random stream.
        self._rng = random.Random(seed)
        self.min = 0
        self.max = 0
        self._wsum = 0
        self._weight = 0

    def add(self, value: int, weight: int = 1) -> None:
        """One sample ``value`` that stands for ``weight`` items (the mean is item-weighted)."""
        value = max(0, int(value))
        with self._lock:
            if self._seen == 0 or value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
            self._wsum += value * weight
            self._weight += weight
            self._seen += 1
            if len(self._res) < self._size:
                self._res.append(value)
            else:
                j = self._rng.randrange(self._seen)
                if j < self._size:
                    self._res[j] = value

    @property
    def count(self) -> int:
        return self._seen

    def summary(self) -> tuple[int, int, int, int]:
        """``(min, max, mean, median)`` as ints; all zero before the first sample."""
        with self._lock:
            if not self._seen:
                return (0, 0, 0, 0)
            res = sorted(self._res)
            mean = self._wsum // self._weight if self._weight else 0
            return (self.min, self.max, int(mean), int(res[len(res) // 2]))


class OriginSampler:
    """Summary of ``end - t0`` for many ``t0`` that all share one (later) ``end``.

    WaitAndPush loads everything at once, so each sampled item's total time is
    ``load_end - t0``; storing the ``t0`` would be unbounded, but ``end - t0`` is monotone in
    ``t0``, so a Sampler over ``t0`` gives the same min/max/mean/median once ``end`` is known.
    """

    def __init__(self) -> None:
        self._t0 = Sampler()

    def add(self, t0: int, weight: int = 1) -> None:
        self._t0.add(t0, weight)

    @property
    def count(self) -> int:
        return self._t0.count

    def summary(self, end: int) -> tuple[int, int, int, int]:
        """``(min, max, mean, median)`` of ``end - t0``: exact min/max/mean, sampled median."""
        lo, hi, mean, med = self._t0.summary()
        if not self._t0.count:
            return (0, 0, 0, 0)
        return (max(0, end - hi), max(0, end - lo), max(0, end - mean), max(0, end - med))
