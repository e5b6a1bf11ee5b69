import argparse
import platform
import time

import torch

from letter_ext.bench.common import cpu_model

from letter.errors import LetterError
from letter.runs import check_output_path, write_json

from . import BENCHMARKS, DEFAULT_BENCHMARKS, count, module


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m letter.bench", description=__doc__ or "LETTER training benchmarks.")
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: {', '.join(DEFAULT_BENCHMARKS)}; also: scale)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--threads", type=count(), default=1, help="torch intra-op threads (default 1: stable timings)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: process CPU time (default; with one thread, robust to other load), wall: elapsed")
    for name in BENCHMARKS:
        module(name).add_arguments(p)
    args = p.parse_args(argv)
    if args.out:
        try:  # before the benchmarks run: never onto a run's or a dataset's file
            check_output_path(args.out, {})
        except LetterError as e:
            p.error(str(e))
    torch.set_num_threads(args.threads)
    results = {"machine": {"cpu": cpu_model(), "platform": platform.platform(),
                           "torch": torch.__version__, "threads": args.threads, "clock": args.clock,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")},
               "command": "python -m letter.bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    for name in args.names or DEFAULT_BENCHMARKS:
        mod = module(name)
        print(f"== {name}", flush=True)
        results[name] = mod.run(args)
        print(mod.summary(results[name]), flush=True)
        if args.out:  # written after every benchmark, so a later failure keeps the earlier results
            write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
