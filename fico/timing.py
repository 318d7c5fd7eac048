"""Timings a reader can trust: medians with their spread, and ratios from interleaved pairs.

Every timing fico prints is the median of repeated runs with its interquartile range. A
speedup is read from runs interleaved with the baseline (round i of one configuration
against round i of the other, so a slow moment of the machine hits both), as the median of
those paired ratios; when the ratios' interquartile range is wider than
``READABLE_SPREAD`` of their median, the ratio is flagged as unreadable.

>>> s = Spread.of([1.0, 2.0, 3.0, 4.0, 5.0])
>>> s.median, s.q1, s.q3
(3.0, 2.0, 4.0)
>>> ratio = Spread.ratio([2.0, 2.1, 1.9], [1.0, 1.0, 1.0]); round(ratio.median, 2), ratio.readable
(2.0, True)
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

#: the widest interquartile range, relative to the median, at which a ratio is still read
READABLE_SPREAD = 0.2


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and extremes of repeated measurements (seconds or ratios)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        values = sorted(values)
        if not values:
            raise ValueError("no measurements")
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))

    @classmethod
    def ratio(cls, numerators: list[float], denominators: list[float]) -> "Spread":
        """The spread of ``numerators[i] / denominators[i]`` over interleaved rounds i."""
        return cls.of([a / b for a, b in zip(numerators, denominators) if b > 0])

    @property
    def relative_iqr(self) -> float:
        return (self.q3 - self.q1) / self.median if self.median else float("inf")

    @property
    def readable(self) -> bool:
        """Whether the spread is narrow enough to read the median as the value."""
        return self.relative_iqr <= READABLE_SPREAD

    def scaled(self, factor: float) -> "Spread":
        return Spread(self.median * factor, self.q1 * factor, self.q3 * factor, self.low * factor,
                      self.high * factor, self.n)

    def show(self, unit: str = "", digits: int = 1) -> str:
        """``12.3 ms (IQR 11.9-12.8, n=7)``."""
        return (f"{self.median:.{digits}f}{unit} (IQR {self.q1:.{digits}f}-{self.q3:.{digits}f}, n={self.n})")

    def as_dict(self) -> dict:
        return asdict(self)


def ratio_text(ratio: Spread) -> str:
    """A speedup for the terminal, with its spread, and a warning when it cannot be read."""
    text = f"{ratio.median:.2f}x (IQR {ratio.q1:.2f}-{ratio.q3:.2f})"
    if not ratio.readable:
        text += (f"; spread too wide to read a ratio (IQR {100 * ratio.relative_iqr:.0f}% of the median): "
                 "more repeats or a quieter machine")
    return text
