"""`letter embed`: item text embeddings."""
import click

from letter.cli.options import settings_from_options, settings_options
from letter.embed import EmbedSettings


@click.command("embed")
@click.argument("data_path", type=click.Path())
@settings_options(EmbedSettings, check_ranges=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the dataset's folder).")
@click.option("--tag", default=None, help="Output name <Name>.emb-<tag>.npy (default: from the model).")
@click.option("--device", default="auto", show_default=True)
def embed_command(data_path, out_dir, tag, device, **options):
    """Embed the item text of DATA_PATH into <Name>.emb-<tag>.npy (float32 [items, d]) + .json sidecar."""
    from letter.data import load_dataset
    from letter.data.readers import dataset_dir
    from letter.embed import embed_dataset

    settings = settings_from_options(EmbedSettings, options)
    dataset = load_dataset(data_path)
    if out_dir is None:
        out_dir = dataset_dir(data_path)
    path, emb = embed_dataset(dataset, out_dir, settings, tag=tag, device=device)
    click.echo(f"wrote {path} {list(emb.shape)}")
