"""Entry point of the `letter` command."""
import click

from letter import __version__
from letter.errors import LetterError


class LetterGroup(click.Group):
    """Turns LetterError (bad input the user can fix) into a one-line click error, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LetterError as e:
            raise click.ClickException(str(e)) from e
        except EOFError as e:  # click would print a bare "Aborted!" for it
            raise click.ClickException(f"unexpected end of a file or of the input ({e or 'EOFError'})") from e


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
    from letter_ext.bench import run_benchmarks

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
