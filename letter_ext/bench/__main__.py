import argparse

from . import OPS, run_benchmarks

parser = argparse.ArgumentParser(prog="python -m letter_ext.bench", description="Benchmark letter_ext kernels.")
parser.add_argument("ops", nargs="*", help=f"ops to run (default: all of {OPS})")
parser.add_argument("--quick", action="store_true", help="small shapes only")
parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
parser.add_argument("--out", default=None, help="write results as JSON here")
args = parser.parse_args()
run_benchmarks(args.ops or None, quick=args.quick, out=args.out, device=args.device)
