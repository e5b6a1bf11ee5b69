"""`letter embed`: item text embeddings."""
import click

from letter.cli.options import overwrite_option, refuse_ignored, settings_from_options, settings_options
from letter.embed import EmbedSettings


@click.command("embed")
@click.argument("data_path", type=click.Path())
@settings_options(EmbedSettings, check_ranges=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the dataset's folder).")
@click.option("--tag", default=None, help="Output name <Name>.emb-<tag>.npy (default: from the model).")
@click.option("--device", default="auto", show_default=True)
@overwrite_option
def embed_command(data_path, out_dir, tag, device, overwrite, **options):
    """Embed the item text of DATA_PATH into <Name>.emb-<tag>.npy (float32 [items, d]) + .json sidecar.
    Embeddings of the same tag already there are refused unless --overwrite."""
    from letter.data import load_dataset
    from letter.data.readers import dataset_dir
    from letter.embed import embed_dataset

    settings = settings_from_options(EmbedSettings, options)
    model, mode = settings.model, settings.mode
    if mode == "hash" or model == "hash":
        if model not in ("hash", "auto"):
            raise click.UsageError(f"--model {model} is not used by --mode hash (the hash encoder has no model)")
        refuse_ignored(["batch_size", "max_length", "dtype"], "is not used by the hash encoder")
        if mode != "hash":
            refuse_ignored(["mode"], "is not used by --model hash (the hash encoder)")
    else:
        refuse_ignored(["dim"], "applies to the hash encoder only (--model hash or --mode hash)")
    if mode != "mean-pool":
        refuse_ignored(["max_length"], "applies to --mode mean-pool only")
    dataset = load_dataset(data_path)
    if out_dir is None:
        out_dir = dataset_dir(data_path)
    path, emb = embed_dataset(dataset, out_dir, settings, tag=tag, device=device, overwrite=overwrite)
    click.echo(f"wrote {path} {list(emb.shape)}")
