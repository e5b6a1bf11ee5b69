"""`letter data ...`: synthetic data, format conversion, statistics."""
import json

import click

from letter.data.readers import FORMATS


@click.group("data")
def data():
    """Prepare and inspect datasets (LETTER folder format: <Name>.inter.json + <Name>.item.json)."""


@data.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--users", type=click.IntRange(min=1), default=3000, show_default=True, help="Number of users.")
@click.option("--items", type=click.IntRange(min=4), default=1000, show_default=True, help="Number of items.")
@click.option("--categories", type=click.IntRange(min=1), default=20, show_default=True,
              help="Latent item categories (<= items/4).")
@click.option("--min-length", type=click.IntRange(min=3), default=5, show_default=True, help="Shortest history.")
@click.option("--max-length", type=click.IntRange(min=3), default=20, show_default=True,
              help="Longest history (>= --min-length).")
@click.option("--seed", default=0, show_default=True)
@click.option("--name", default="Synth", show_default=True, help="File prefix <Name>.inter.json.")
def synth(out_dir, users, items, categories, min_length, max_length, seed, name):
    """Write the seeded synthetic dataset (latent categories, sequential histories) to OUT_DIR."""
    from letter.data import make_synthetic, write_letter
    from letter.data.stats import dataset_stats
    from letter.errors import LetterError

    try:
        ds = make_synthetic(users, items, categories, min_length, max_length, seed=seed, name=name)
    except ValueError as e:  # name the options, not the function's arguments
        message = str(e)
        for arg, flag in (("num_categories", "--categories"), ("num_items", "--items"),
                          ("min_length", "--min-length"), ("max_length", "--max-length")):
            message = message.replace(arg, flag)
        raise LetterError(message) from e
    write_letter(ds, out_dir)
    s = dataset_stats(ds)
    click.echo(f"wrote {out_dir}/{name}.inter.json, {name}.item.json: {s['users']} users, {s['items']} items, "
               f"{s['interactions']} interactions")


@data.command("convert")
@click.argument("src", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True)
@click.option("--kcore", type=click.IntRange(min=1), default=5, show_default=True, help="k-core filter for raw Amazon dumps.")
@click.option("--name", default=None, help="Dataset name (default: from the file/folder name).")
def convert(src, out_dir, fmt, kcore, name):
    """Read SRC (LETTER folder, P5 sequential_data.txt, raw Amazon dump) and write a LETTER folder.

    Items are renumbered 0..N-1 (numeric ids keep their order, others sort as text)."""
    from letter.data import load_dataset, write_letter

    ds = load_dataset(src, format=fmt, k=kcore, name=name)
    write_letter(ds, out_dir)
    click.echo(f"wrote {out_dir}/{ds.name}.inter.json: {ds.num_users} users, {ds.num_items} items")


@data.command("stats")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(path, fmt, as_json):
    """Users, items, interactions, sparsity and history-length percentiles of PATH."""
    from letter.data import load_dataset
    from letter.data.stats import dataset_stats

    s = dataset_stats(load_dataset(path, format=fmt))
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    for key, value in s.items():
        if key == "length_percentiles":
            value = "  ".join(f"{p}={v:g}" for p, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.6f}" if key == "sparsity" else f"{value:.2f}"
        click.echo(f"{key:28s} {value}")
