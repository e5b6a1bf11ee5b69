"""`letter train-cf`: SASRec collaborative item embeddings."""
import dataclasses
import click

from letter.cf.train import CFConfig

_DEFAULTS = CFConfig()


def _opt(name, help_text, **kwargs):
    return click.option(f"--{name.replace('_', '-')}", name, default=getattr(_DEFAULTS, name), show_default=True,
                        help=help_text, **kwargs)


@click.command("train-cf")
@click.argument("data_path", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the dataset's folder).")
@_opt("dim", "Hidden size = exported embedding size.")
@_opt("blocks", "Self-attention blocks.")
@_opt("heads", "Attention heads.")
@_opt("dropout", "Dropout rate.")
@_opt("max_len", "Longest history the model sees (also the split's history cut).")
@_opt("loss", "ce: full-softmax cross-entropy; bce: one sampled negative per target.",
      type=click.Choice(["ce", "bce"]))
@_opt("lr", "Adam learning rate.")
@_opt("weight_decay", "Adam weight decay.")
@_opt("batch_size", "Training windows per step (global, over all processes).")
@_opt("epochs", "Most epochs.")
@_opt("patience", "Stop after this many epochs without a better valid NDCG@10.")
@_opt("eval_batch_size", "Users per evaluation batch.")
@click.option("--mask-history", is_flag=True, help="Exclude history items from the ranking (default: not excluded).")
@_opt("seed", "Random seed.")
@click.option("--resume", is_flag=True, help="Continue from <Name>.cf-sasrec<d>.ckpt.pt in the output folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
def train_cf_command(data_path, out_dir, resume, device, **options):
    """Train SASRec on DATA_PATH's leave-one-out split; export <Name>.cf-sasrec<d>.npy.

    Also writes <Name>.cf-sasrec<d>.json (valid/test Recall/NDCG@5,10, popularity baseline,
    per-epoch history) and a checkpoint for --resume. Multi-process: torchrun --nproc-per-node N
    $(which letter) train-cf ... (gloo on CPU, nccl on GPU)."""
    from letter.cf.train import train_cf
    from letter.data import load_dataset
    from letter.data.readers import dataset_dir

    cfg = CFConfig(**{f.name: options[f.name] for f in dataclasses.fields(CFConfig)})
    dataset = load_dataset(data_path)
    if out_dir is None:
        out_dir = dataset_dir(data_path)
    train_cf(dataset, out_dir, cfg, resume=resume, device=device, log=click.echo)
