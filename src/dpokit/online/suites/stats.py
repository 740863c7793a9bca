"""The suites' standard errors: the mean of per-item values and its standard error (sample sd / sqrt(n))."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of the finite values; NaN where there are too few (0 for the mean, 1 for the error)."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
