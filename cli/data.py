"""`letter data ...`: synthetic data, format conversion, statistics."""
import json

import click

from letter.cli.errors import LetterGroup
from letter.cli.options import overwrite_option, refuse_ignored, settings_from_options, settings_options
from letter.data.readers import FORMATS
from letter.data.synth import SyntheticSettings
from letter.errors import LetterError


@click.group("data", cls=LetterGroup)
def data():
    """Prepare and inspect datasets (LETTER folder format: <Name>.inter.json + <Name>.item.json)."""


@data.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@settings_options(SyntheticSettings, check_ranges=True)
@click.option("--name", default="Synth", show_default=True, help="File prefix <Name>.inter.json.")
@overwrite_option
def synth(out_dir, name, overwrite, **options):
    """Write the seeded synthetic dataset (latent categories, sequential histories) to OUT_DIR."""
    from letter.data import make_synthetic, write_letter
    from letter.data.readers import prepare_dataset_output
    from letter.data.stats import dataset_stats

    ds = make_synthetic(settings_from_options(SyntheticSettings, options), name=name)
    prepare_dataset_output(out_dir, name, overwrite=overwrite)
    write_letter(ds, out_dir)
    s = dataset_stats(ds)
    click.echo(f"wrote {out_dir}/{name}.inter.json, {name}.item.json: {s['users']} users, {s['items']} items, "
               f"{s['interactions']} interactions")


@data.command("synth-catalog")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--items", type=click.IntRange(min=1000), required=True, help="Catalog size (e.g. 10000 to 1000000).")
@click.option("--users", type=click.IntRange(min=1), default=None, help="Number of users [default: --items].")
@click.option("--zipf", type=click.FloatRange(0, 5), default=1.0, show_default=True,
              help="Popularity exponent (item of rank r drawn with weight r^-zipf).")
@click.option("--mean-length", type=click.FloatRange(5, 100, min_open=True), default=8.5, show_default=True,
              help="Mean history length (5-core minimum 5, geometric tail, at most 100).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--name", default="Catalog", show_default=True, help="File prefix <Name>.inter.json.")
@overwrite_option
def synth_catalog(out_dir, items, users, zipf, mean_length, seed, name, overwrite):
    """Write a seeded large synthetic catalog to OUT_DIR, streamed in bounded memory.

    Zipf-like popularity, Amazon-5-core-like history lengths, latent categories of 500 items with
    item text; memory grows by a few numpy bytes per item, not with the users (see
    letter.data.catalog)."""
    from letter.data.catalog import write_catalog
    from letter.data.readers import prepare_dataset_output

    prepare_dataset_output(out_dir, name, overwrite=overwrite)
    s = write_catalog(out_dir, items, users, seed=seed, name=name, zipf=zipf, mean_length=mean_length)
    click.echo(f"wrote {out_dir}/{name}.inter.json, {name}.item.json: {s['users']} users, {s['items']} items, "
               f"{s['interactions']} interactions")


@data.command("convert")
@click.argument("src", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True)
@click.option("--kcore", type=click.IntRange(min=1), default=5, show_default=True, help="k-core filter for raw Amazon dumps.")
@click.option("--name", default=None, help="Dataset name (default: from the file/folder name).")
@overwrite_option
def convert(src, out_dir, fmt, kcore, name, overwrite):
    """Read SRC (LETTER folder, P5 sequential_data.txt, raw Amazon dump) and write a LETTER folder.

    Items are renumbered 0..N-1 (numeric ids keep their order, others sort as text). A cold split
    is refused: convert the dataset it was split from."""
    from letter.data import load_dataset, write_letter
    from letter.data.cold import SPLIT_FILE, read_cold_split
    from letter.data.readers import detect_format, prepare_dataset_output, source_files

    detected = detect_format(src) if fmt == "auto" else fmt
    if detected != "amazon":
        refuse_ignored(["kcore"], f"applies to raw Amazon dumps only (SRC is a {detected} dataset)")
    if read_cold_split(src) is not None:  # renumbering would scatter its cold ids; the copy would lose the record
        raise LetterError(f"SRC {src}: a cold split ({SPLIT_FILE}); convert the dataset it was split from, then split "
                          "that with `letter data cold-split`")
    ds = load_dataset(src, format=fmt, k=kcore, name=name)
    prepare_dataset_output(out_dir, ds.name, overwrite=overwrite, inputs={"SRC": source_files(src, fmt)})
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


@data.command("cold-split")
@click.argument("data_path", type=click.Path())
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Share of the catalog withheld as cold items.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the cold-item draw.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Split folder to write.")
@click.option("--embeddings", multiple=True, type=click.Path(dir_okay=False),
              help="A catalog-aligned [items, d] .npy (e.g. text embeddings) to copy into the split in its item "
                   "order (repeatable).")
@overwrite_option
def cold_split_cmd(data_path, fraction, seed, out_dir, embeddings, overwrite):
    """Withhold a seeded share of the items from all training (cold-start evaluation).

    Cold items are drawn uniformly (numpy default_rng(seed)), renumbered after the warm items and
    removed from every sequence except as a user's last (test) item; users left with < 3 items are
    dropped. OUT gets a LETTER folder plus cold_split.json, which train-cf, train-tokenizer and
    train-rec read to refuse (or skip) cold items; `letter evaluate --cold` reports cold-target and
    warm-target users separately. A cold split is refused: split the dataset it was split from."""
    from letter.data import load_dataset
    from letter.data.cold import write_cold_split

    record = write_cold_split(load_dataset(data_path), out_dir, fraction, seed, list(embeddings), overwrite=overwrite)
    users = record["users"]
    click.echo(f"wrote {out_dir}: {record['warm_items']} warm + {len(record['cold_items'])} cold items; test users "
               f"{users['cold_target']} cold-target, {users['warm_target']} warm-target ({users['dropped']} dropped, "
               f"{record['cold_interactions_removed']} cold interactions removed from histories)")
