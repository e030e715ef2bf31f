"""Training-stability metric of OLMo-2 (Team OLMo 2024, §3): the spike score.

A step "spikes" when its value (gradient norm or loss) exceeds the mean of the preceding `window` values by
more than 7 standard deviations; the spike score at a step is the fraction of spikes among the last
`window` steps. OLMo-2 uses a window of 1000 steps.
"""

from __future__ import annotations

import math


class SpikeMeter:
    def __init__(self, window: int = 1000, sigmas: float = 7.0, min_history: int = 10):
        self.window, self.sigmas, self.min_history = window, sigmas, min_history
        self.values: list[float] = []
        self.spikes: list[bool] = []

    def add(self, value: float) -> float:
        """Record one step's value; returns the spike score over the trailing window (this step included)."""
        history = self.values[-self.window:]
        spike = False
        if len(history) >= self.min_history and math.isfinite(value):
            mean = sum(history) / len(history)
            std = math.sqrt(sum((v - mean) ** 2 for v in history) / len(history))
            spike = value > mean + self.sigmas * std
        elif not math.isfinite(value):
            spike = True
        self.values.append(value)
        self.spikes.append(spike)
        recent = self.spikes[-self.window:]
        return sum(recent) / len(recent)

    @property
    def last_was_spike(self) -> bool:
        return bool(self.spikes and self.spikes[-1])
