"""Entry point of the `letter` command."""
import click

from letter import __version__
from letter.cli.errors import LetterGroup


@click.group(cls=LetterGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="letter")
def main():
    """LETTER: learnable item tokenization for generative recommendation.

    Data flows one way, with files between stages so each stage can run alone:
    data -> embed -> train-cf -> train-tokenizer -> train-rec -> evaluate.
    """


@main.group(cls=LetterGroup)
def bench():
    """Benchmarks: kernels, and the HTTP server under load (print a table, write JSON)."""


@bench.command("kernels")
@click.option("--op", "ops", multiple=True, help="Op(s) to benchmark (default: all).")
@click.option("--quick", is_flag=True, help="Small shapes only (a smoke run).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON output file.")
def bench_kernels(ops, quick, out):
    """Benchmark the letter_ext kernels against torch-eager baselines."""
    from letter_ext.bench import OPS, run_benchmarks

    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise click.BadParameter(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}", param_hint="--op")
    if out:
        from letter.runs import check_output_path

        check_output_path(out, {})  # before the benchmarks run: never onto a run's or a dataset's file
    run_benchmarks(list(ops) or None, quick=quick, out=out)


from letter.cli.cf import train_cf_command  # noqa: E402
from letter.cli.data import data  # noqa: E402  (stage commands live in their own modules)
from letter.cli.embed import embed_command  # noqa: E402

main.add_command(data)
main.add_command(embed_command)
main.add_command(train_cf_command)

from letter.cli.tokenizer import tokenize_cmd, train_tokenizer_cmd  # noqa: E402

main.add_command(train_tokenizer_cmd)
main.add_command(tokenize_cmd)

from letter.cli.pipeline import config, pipeline  # noqa: E402

main.add_command(pipeline)
main.add_command(config)

from letter.cli.rec import add_items_cmd, evaluate_cmd, recommend_cmd, train_rec_cmd  # noqa: E402

main.add_command(train_rec_cmd)
main.add_command(add_items_cmd)
main.add_command(evaluate_cmd)
main.add_command(recommend_cmd)

from letter.cli.compare import compare_cmd  # noqa: E402

main.add_command(compare_cmd)

from letter.cli.serve import bench_serve_cmd, serve_cmd  # noqa: E402

main.add_command(serve_cmd)
bench.add_command(bench_serve_cmd)

if __name__ == "__main__":
    main()
