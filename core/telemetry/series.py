"""Counters, histograms and gauges cheap enough to update on every request.

prometheus_client's own metric objects take a lock and several Python calls per update
(~1.2 µs a counter, ~2.6 µs a histogram here: ~15 µs a request for the gateway's dozen
updates). The gateway updates everything from its one event loop thread, so a plain dict
entry per label set does (~0.1 µs), and prometheus_client reads them at scrape time through
a collector and writes the exposition. Under `--workers N` (multiprocess mode) the values
must live in prometheus_client's shared files, so there each series hands its updates to a
prometheus_client metric instead: same calls, same names, the library's multiprocess code.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class CounterSeries:
    """A counter family: a running total per label values. With a `divisor` it counts whole
    units (nano-dollars) and shows them divided (dollars): the total stays exact however many
    charges it adds up, and becomes a float once, at scrape time."""

    __slots__ = ("_children", "_shared", "divisor", "doc", "label_names", "name", "values")

    def __init__(self, name: str, doc: str, label_names: Labels, shared: bool, divisor: int = 1):
        self.name, self.doc, self.label_names, self.divisor = name, doc, label_names, divisor
        self.values: dict[Labels, float] = {}
        self._shared = Counter(name, doc, label_names, registry=None) if shared else None
        self._children: dict[Labels, Any] = {}

    def inc(self, labels: Labels, amount: float = 1) -> None:
        if self._shared is None:
            values = self.values
            values[labels] = values.get(labels, 0) + amount
            return
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._shared.labels(*labels) if labels else self._shared
        child.inc(amount / self.divisor)

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.label_names)
        divisor = self.divisor
        for labels, value in self.values.items():
            family.add_metric(labels, value / divisor if divisor != 1 else value)
        return family


class HistogramSeries:
    """A histogram family: per label values, the count in each bucket and the sum."""

    __slots__ = ("_children", "_shared", "bounds", "counts", "doc", "label_names", "name", "sums")

    def __init__(self, name: str, doc: str, label_names: Labels, bounds: tuple[float, ...], shared: bool):
        self.name, self.doc, self.label_names, self.bounds = name, doc, label_names, bounds
        self.counts: dict[Labels, list[int]] = {}  # per bucket, not cumulative; the last is +Inf
        self.sums: dict[Labels, float] = {}
        self._shared = Histogram(name, doc, label_names, registry=None, buckets=bounds) if shared else None
        self._children: dict[Labels, Any] = {}

    def observe(self, labels: Labels, value: float) -> None:
        if self._shared is None:
            counts = self.counts.get(labels)
            if counts is None:
                counts = self.counts[labels] = [0] * (len(self.bounds) + 1)
                self.sums[labels] = 0.0
            counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
            self.sums[labels] += value
            return
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._shared.labels(*labels) if labels else self._shared
        child.observe(value)

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        for labels, counts in self.counts.items():
            family.add_metric(labels, list(zip(bounds, itertools.accumulate(counts), strict=True)), self.sums[labels])
        return family


class GaugeSeries:
    """A gauge without labels; summed over the live workers in multiprocess mode."""

    __slots__ = ("_shared", "doc", "name", "value")

    def __init__(self, name: str, doc: str, shared: bool):
        self.name, self.doc = name, doc
        self.value = 0.0
        self._shared = Gauge(name, doc, registry=None, multiprocess_mode="livesum") if shared else None

    def add(self, amount: float) -> None:
        self.value += amount
        if self._shared is not None:
            self._shared.inc(amount)

    def set(self, value: float) -> None:
        self.value = value
        if self._shared is not None:
            self._shared.set(value)

    def collect(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.doc, value=self.value)


Series = CounterSeries | HistogramSeries | GaugeSeries


class SeriesCollector(Collector):
    """Hands the series' values to prometheus_client at scrape time (single process)."""

    def __init__(self, series: list[Series]):
        self.series = series

    def collect(self) -> Iterator[Any]:
        for one in self.series:
            yield one.collect()
