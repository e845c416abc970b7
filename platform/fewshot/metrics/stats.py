"""Means with 95% confidence intervals over seeds: how the ablation and the tuning report
state a quality claim.

For n runs with sample mean m and sample standard deviation s (n - 1 in the denominator),
the 95% interval of the mean is m +/- t_{0.975, n-1} * s / sqrt(n) (Student's t, since the
number of seeds is small). Math layer: no ray, no mlflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    mean: float
    half_width: float  # the interval is mean +/- half_width (NaN with fewer than 2 values)
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def overlaps(self, other: "MeanCI") -> bool:
        return not (self.high < other.low or other.high < self.low)

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"12.3 ± 1.4"`` (figures in points when ``scale`` is 100)."""
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.half_width):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def mean_ci95(values: Iterable[float]) -> MeanCI:
    """Mean and 95% t-interval half width of the finite ``values``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return MeanCI(float("nan"), float("nan"), 0)
    if n == 1:
        return MeanCI(float(x[0]), float("nan"), 1)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    return MeanCI(float(x.mean()), float(stats.t.ppf(0.975, n - 1)) * sem, n)
