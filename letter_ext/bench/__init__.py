"""Kernel benchmarks: `python -m letter_ext.bench [OP ...]` or `letter bench kernels`.

Each op's module has run(device, quick) -> rows; every row times the torch-eager baseline and each
available backend in the same run and reports their ratio.
"""
import importlib

import torch

from .common import machine_info, print_table, write_json

OPS = ["residual_quantize", "constrained_beam_step", "dot_product_cross_entropy"]


def run_benchmarks(ops=None, *, quick: bool = False, out: str | None = None, device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    selected = ops or OPS
    unknown = [o for o in selected if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {OPS}")
    results = {"machine": machine_info(dev), "results": {}}
    for op in selected:
        module = importlib.import_module(f"letter_ext.bench.{op}")
        rows = module.run(dev, quick=quick)
        results["results"][op] = rows
        columns = list(dict.fromkeys(k for row in rows for k in row))
        print_table(f"{op} on {dev}", rows, columns)
    if out:
        write_json(out, results)
        print(f"\nwrote {out}")
    return results
