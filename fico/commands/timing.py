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

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..benchmarks.spans import SpanProbe

#: the widest interquartile range, relative to the median, at which a ratio is still read
READABLE_SPREAD = 0.2


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and extremes of repeated measurements (seconds or ratios).

    A measurement that could not be read (no valid round: a machine so busy that a longer
    run took less time than a shorter one, or no repeats at all) is a Spread too, with
    ``reason`` saying why, None for every number and ``n`` 0: commands print and store it as
    unreadable instead of failing.

    >>> Spread.of([]).show(" ms")
    'unreadable (no measurements)'
    >>> Spread.ratio([1.0, 2.0], [0.0, -1.0]).reason
    'no round gave both times above zero'
    """

    median: float | None
    q1: float | None
    q3: float | None
    low: float | None
    high: float | None
    n: int
    #: why the measurement cannot be read (None: it can)
    reason: str | None = None

    @classmethod
    def of(cls, values: list[float], empty: str = "no measurements") -> "Spread":
        """The spread of ``values``; non-finite values are dropped, and with none left the
        Spread is unreadable for the reason ``empty``."""
        values = sorted(v for v in values if math.isfinite(v))
        if not values:
            return cls.unreadable(empty)
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))

    @classmethod
    def unreadable(cls, reason: str) -> "Spread":
        return cls(None, None, None, None, None, 0, reason)

    @classmethod
    def ratio(cls, numerators: list[float], denominators: list[float]) -> "Spread":
        """The spread of ``numerators[i] / denominators[i]`` over interleaved rounds i; a round
        where either time is not above zero has no ratio."""
        return cls.of([a / b for a, b in zip(numerators, denominators) if a > 0 and b > 0],  # NaN > 0 is False
                      empty="no round gave both times above zero")

    @classmethod
    def from_dict(cls, data: dict) -> "Spread":
        """A Spread stored with :meth:`as_dict` (files written before ``reason`` existed too)."""
        return cls(**{key: data.get(key) for key in ("median", "q1", "q3", "low", "high")}, n=data.get("n", 0),
                   reason=data.get("reason"))

    @property
    def relative_iqr(self) -> float:
        if self.median is None:
            return float("inf")
        return (self.q3 - self.q1) / self.median if self.median else float("inf")

    @property
    def readable(self) -> bool:
        """Whether the spread is narrow enough to read the median as the value."""
        return self.median is not None and self.relative_iqr <= READABLE_SPREAD

    def scaled(self, factor: float) -> "Spread":
        if self.median is None:
            return self
        return Spread(self.median * factor, self.q1 * factor, self.q3 * factor, self.low * factor,
                      self.high * factor, self.n, self.reason)

    def show(self, unit: str = "", digits: int = 1) -> str:
        """``12.3 ms (IQR 11.9-12.8, n=7)``, or ``unreadable (why)``."""
        if self.median is None:
            return f"unreadable ({self.reason})"
        return (f"{self.median:.{digits}f}{unit} (IQR {self.q1:.{digits}f}-{self.q3:.{digits}f}, n={self.n})")

    def as_dict(self) -> dict:
        return asdict(self)


def ratio_text(ratio: Spread) -> str:
    """A speedup for the terminal, with its spread, and a warning when it cannot be read."""
    if ratio.median is None:
        return f"unreadable ({ratio.reason})"
    text = f"{ratio.median:.2f}x (IQR {ratio.q1:.2f}-{ratio.q3:.2f})"
    if not ratio.readable:
        text += (f"; spread too wide to read a ratio (IQR {100 * ratio.relative_iqr:.0f}% of the median): "
                 "more repeats or a quieter machine")
    return text


class WorkTime(SpanProbe):
    """A :attr:`fico.ReductionRun.work_probe`: the seconds spent inside spans of fico's work
    (forming signals and running stages; an accelerator is synchronised around each span)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    @contextlib.contextmanager
    def measure(self):
        sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds += time.perf_counter() - start
