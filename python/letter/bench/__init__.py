"""Library benchmarks: training-speed measurements of the LETTER components, each comparing the
arms it names in the same process (alternating, medians and ratios), results as JSON.

    python -m letter.bench [NAME ...] [--out results.json] [--device cpu] [--threads 1]

NAME: tokenizer_epoch (train_tokenizer epoch vs the bare MLP autoencoder epoch) and
rec_throughput (TIGER training samples/s: padded vs trimmed vs trimmed+bucketed batches).
The kernel benchmarks of letter_ext are `python -m letter_ext.bench`.
"""
from __future__ import annotations

import importlib

BENCHMARKS = ("tokenizer_epoch", "rec_throughput")


def module(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"letter.bench.{name}")
