"""`letter train-cf`: collaborative item embeddings (SASRec or LightGCN)."""
import click

from letter.cf.config import CFConfig
from letter.cli.options import config_file_option, settings_from_options, settings_options


@click.command("train-cf")
@click.argument("data_path", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: the dataset's folder).")
@settings_options(CFConfig)
@config_file_option
@click.option("--resume", is_flag=True, help="Continue from <Name>.cf-<model><d>.ckpt.pt in the output folder "
                                            "(an error without one).")
@click.option("--overwrite", is_flag=True, help="Replace finished outputs of the same name in the output folder.")
def train_cf_command(data_path, out_dir, config_file, resume, overwrite, **options):
    """Train a CF model (--model sasrec or lightgcn) on DATA_PATH's leave-one-out split; export its
    item embeddings as <Name>.cf-<model><d>.npy (what train-tokenizer --cf-emb reads).

    Also writes <Name>.cf-<model><d>.json (valid/test Recall/NDCG@5,10, popularity baseline,
    per-epoch history) and a checkpoint for --resume. Multi-process: torchrun --nproc-per-node N
    $(which letter) train-cf ... (gloo on CPU, nccl on GPU)."""
    from letter.cf.train import train_cf
    from letter.data import load_dataset
    from letter.data.readers import dataset_dir

    cfg = settings_from_options(CFConfig, options, config_file)
    dataset = load_dataset(data_path)
    if out_dir is None:
        out_dir = dataset_dir(data_path)
    train_cf(dataset, out_dir, cfg, resume=resume, log=click.echo, overwrite=overwrite)
