"""`letter compare`: several identifier sets, the same recommender, one table."""
import dataclasses

import click

from letter.errors import LetterError
from letter.rec.config import RecConfig


def _rec_options(command):
    """One --option per RecConfig field; given ones override --config, which overrides the defaults."""
    for f in reversed(dataclasses.fields(RecConfig)):
        help_ = f"RecConfig.{f.name} (default {f.default})"
        if f.name == "seed":
            help_ = f"First recommender seed; run i of a set uses seed + i (default {f.default})."
        command = click.option("--" + f.name.replace("_", "-"), f.name, type=type(f.default), default=None,
                               help=help_)(command)
    return command


@click.command("compare")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Dataset folder or file (any letter.data format).")
@click.option("--set", "sets", multiple=True, required=True, metavar="LABEL=PATH",
              help="An identifier set: a tokenizer run folder, <Name>.index.json or codes .npy (repeat; the first "
                   "is the reference of the differences).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (compare.md/.json/.png, runs/<label>/seed-<s>/); rerun to resume.")
@click.option("--seeds", default=3, show_default=True, help="Recommender seeds per set.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/JSON of RecConfig fields.")
@click.option("--beams", default=20, show_default=True, help="Beam width of the test evaluation (>= 10).")
@click.option("--test-users", default=0, show_default=True,
              help="Evaluate a fixed random sample of test users, the same for every run (0 = all).")
@click.option("--sample-seed", default=0, show_default=True, help="Seed of that sample and of the bootstrap.")
@click.option("--bootstrap", default=2000, show_default=True, help="Paired bootstrap resamples.")
@_rec_options
def compare_cmd(data_path, sets, out_dir, seeds, config_file, beams, test_users, sample_seed, bootstrap, **overrides):
    """Train the same TIGER on each identifier set for several seeds and compare them on the same
    test users: mean ± std per metric, paired bootstrap intervals of the difference to the first
    set, identifier diagnostics; writes compare.md / compare.json / compare.png."""
    from letter.compare import compare
    from letter.utils import read_mapping_file

    try:
        values = read_mapping_file(config_file) if config_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = RecConfig.from_dict(values)
        compare(data_path, list(sets), out_dir, config, seeds=seeds, num_beams=beams, test_users=test_users,
                sample_seed=sample_seed, bootstrap=bootstrap, log=click.echo)
    except LetterError as e:  # also clean when run outside the `letter` group
        raise click.ClickException(str(e)) from e
    with open(f"{out_dir}/compare.md") as f:
        click.echo(f.read())
