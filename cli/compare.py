"""`letter compare`: several identifier sets, the same recommender, one table."""
import click

from letter.cli.errors import letter_message
from letter.cli.options import config_file_option, preset_option, settings_from_options, settings_options
from letter.errors import LetterError
from letter.rec.config import RecConfig


@click.command("compare")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Dataset folder or file (any letter.data format).")
@click.option("--set", "sets", multiple=True, required=True, metavar="LABEL=PATH",
              help="An identifier set: a tokenizer run folder, <Name>.index.json or codes .npy (repeat; the first "
                   "is the reference of the differences). A PATH with {seed} names one set per seed (e.g. "
                   "runs/tok-s{seed}: one tokenizer run per recommender seed).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (compare.md/.json/.png, runs/<label>/seed-<s>/); rerun to resume.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Recommender seeds per set (run i uses --seed + i).")
@click.option("--beams", "num_beams", default=20, show_default=True,
              help="Beam width of the test evaluation (>= 10).")
@click.option("--test-users", default=0, show_default=True, type=click.IntRange(min=0),
              help="Evaluate a fixed random sample of test users, the same for every run (0 = all).")
@click.option("--sample-seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seed of that sample and of the bootstrap.")
@click.option("--bootstrap", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Paired bootstrap resamples.")
@click.option("--exclude-history", is_flag=True,
              help="Also evaluate every run with each user's history items excluded from the search (as SASRec's "
                   "--mask-history); both protocols side by side.")
@settings_options(RecConfig)
@config_file_option
@preset_option
def compare_cmd(data_path, sets, out_dir, seeds, config_file, preset, num_beams, test_users, sample_seed, bootstrap,
                exclude_history, **options):
    """Train the same recommender (TIGER, or LC-Rec with --model lcrec) on each identifier set for
    several seeds and compare them on the same test users: mean ± std per metric, paired bootstrap
    intervals of the difference to the first set, identifier diagnostics; writes compare.md /
    compare.json / compare.png."""
    from letter.compare import compare

    try:
        # --seed is the first seed; run i uses seed + i
        config = settings_from_options(RecConfig, options, config_file, preset)
        compare(data_path, list(sets), out_dir, config, seeds=seeds, num_beams=num_beams, test_users=test_users,
                sample_seed=sample_seed, bootstrap=bootstrap, exclude_history=exclude_history,
                log=click.echo)
    except LetterError as e:  # also clean when run outside the `letter` group
        raise click.ClickException(letter_message(e, click.get_current_context().command)) from e
    with open(f"{out_dir}/compare.md") as f:
        click.echo(f.read())
