"""Training-stability metric of OLMo-2: the spike score.

OLMo 2 (Team OLMo, "2 OLMo 2 Furious", 2024, §3.2 "Spike score"): "the percentage of values in a time series
that are at least seven standard deviations away from a rolling average of the last 1,000 values"; they compute
it on the training loss and on the gradient's L2 norm. Read literally, and as done here:
- a value x_t is a spike when |x_t − m_t| ≥ 7·s_t, on either side, with m_t and s_t the mean and standard
  deviation of the `window` values before it (x_{t−window} … x_{t−1}; the value itself is not in its own
  window, or a large spike would raise the bar it is judged against). The paper does not say which standard
  deviation: we take the sample one (n − 1), as pandas' `rolling(window).std()`;
- values with fewer than `window` predecessors have no rolling average and are never spikes (`min_history`
  lowers that for short runs); a non-finite value (a NaN/inf loss) always counts as a spike and is left out of
  later windows;
- the score is 100 · (number of spikes) / (number of values in the whole series), in percent.
"""

from __future__ import annotations

import math
from typing import Sequence

OLMO2_WINDOW = 1000
OLMO2_SIGMAS = 7.0


def _is_spike(value: float, history: list[float], sigmas: float) -> bool:
    if not math.isfinite(value):
        return True
    n = len(history)
    mean = sum(history) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in history) / (n - 1)) if n > 1 else 0.0
    return abs(value - mean) >= sigmas * sd if sd > 0 else False


def spike_flags(values: Sequence[float], window: int = OLMO2_WINDOW, sigmas: float = OLMO2_SIGMAS,
                min_history: int | None = None) -> list[bool]:
    """For each value of the series, whether it is a spike (module docstring); min_history defaults to window."""
    meter = SpikeMeter(window, sigmas, min_history)
    for v in values:
        meter.add(v)
    return list(meter.spikes)


def spike_score(values: Sequence[float], window: int = OLMO2_WINDOW, sigmas: float = OLMO2_SIGMAS,
                min_history: int | None = None) -> float:
    """OLMo-2's spike score of a whole series, in percent (0 for an empty series)."""
    flags = spike_flags(values, window, sigmas, min_history)
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


class SpikeMeter:
    """The spike score of a series that grows one value per step (the trainer's loss and gradient norm)."""

    def __init__(self, window: int = OLMO2_WINDOW, sigmas: float = OLMO2_SIGMAS, min_history: int | None = None):
        if window < 2:
            raise ValueError(f"spike score window must be >= 2, got {window}")
        self.window, self.sigmas = window, sigmas
        self.min_history = window if min_history is None else max(2, min(min_history, window))
        self._finite: list[float] = []  # the finite values so far (windows are drawn from these)
        self.spikes: list[bool] = []

    def add(self, value: float) -> float:
        """Record one value; returns the spike score (percent) of the series so far, this value included."""
        history = self._finite[-self.window:]
        spike = not math.isfinite(value) or (len(history) >= self.min_history
                                             and _is_spike(value, history, self.sigmas))
        if math.isfinite(value):
            self._finite.append(value)
        self.spikes.append(spike)
        return 100.0 * sum(self.spikes) / len(self.spikes)

    @property
    def last_was_spike(self) -> bool:
        return bool(self.spikes and self.spikes[-1])
