"""Library benchmarks: training-speed measurements of the LETTER components, each comparing the
arms it names in the same process (alternating, medians and ratios), results as JSON.

    python -m letter.bench [NAME ...] [--out results.json] [--device cpu] [--threads 1]

NAME: tokenizer_epoch (train_tokenizer epoch vs the bare MLP autoencoder epoch),
rec_throughput (TIGER training samples/s: padded vs trimmed vs trimmed+bucketed batches) and
rec_components (dropout and ranking-loss alternatives, Bernoulli share of a step); scale (each
stage's cost and peak memory at 10k / 100k / 1M items, run only when named: letter.bench.scale).
The kernel benchmarks of letter_ext are `python -m letter_ext.bench`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import time
import types

BENCHMARKS = ("tokenizer_epoch", "rec_throughput", "rec_components", "scale")
DEFAULT_BENCHMARKS = BENCHMARKS[:3]  # `scale` (an hour or more at 1M items) runs only when named
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def count(minimum: int = 1):
    """An argparse type: an integer >= minimum, so that a bad count is a usage error, not a crash
    inside a benchmark."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def clock(name: str):
    """The timer of --clock: 'cpu' (this process's CPU time: with one thread it is the work done,
    little disturbed by other processes on a shared machine) or 'wall'."""
    return CLOCKS[name]


@contextlib.contextmanager
def module_clock(mod, name: str):
    """Make `mod`'s own timings (time.perf_counter calls) use the --clock timer while inside."""
    saved = mod.time
    mod.time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    mod.time.perf_counter = clock(name)
    try:
        yield
    finally:
        mod.time = saved


def module(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"letter.bench.{name}")
