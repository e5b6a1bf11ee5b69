"""`letter train-rec`, `letter evaluate`, `letter recommend`: the generative recommender (TIGER, or
LC-Rec with --model lcrec --base-model PATH)."""
import json

import click

from letter.cli.options import config_file_option, preset_option, settings_from_options, settings_options
from letter.rec.config import RecConfig


@click.command("train-rec")
@click.option("--data", "data_path", required=True, type=click.Path(), help="Dataset folder or file (any letter.data format).")
@click.option("--index", "codes", required=True, type=click.Path(),
              help="Item codes: an authors'-format <Name>.index.json, a codes .npy, or a tokenizer run folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, help="Return after N epochs of this call (resume later).")
@settings_options(RecConfig)
@config_file_option
@preset_option
def train_rec_cmd(data_path, codes, out_dir, resume, stop_after, config_file, preset, **options):
    """Train TIGER (default) or LC-Rec (--model lcrec --base-model LOCAL_LLM_FOLDER: LoRA on a causal LM,
    needs pip install -e .[llm]) on item identifiers. Works under torchrun (gloo on CPU, nccl on GPU).

    Model selection: NDCG@10 on the whole validation split (--valid-users N: a sample, with its
    standard error); a validation counts as better only by more than --min-delta (default: one
    standard error), within it the lower validation loss wins; no stop before --stop-from of the
    cosine schedule. Every epoch prints the validation's cost (valid_s)."""
    from letter.rec import train_rec

    config = settings_from_options(RecConfig, options, config_file, preset)
    summary = train_rec(config, data_path, codes, out_dir, resume=resume, stop_after=stop_after)
    click.echo(json.dumps(summary, indent=2))


@click.command("evaluate")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False), help="A train-rec run folder (TIGER or LC-Rec).")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True)
@click.option("--data", "data_path", default=None, type=click.Path(), help="Dataset path (default: the run's).")
@click.option("--beams", type=click.IntRange(min=10), default=20, show_default=True,
              help="Beam width K (top-K list per user; >= 10 for the @10 metrics).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Users per beam search batch.")
@click.option("--max-users", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate a fixed random sample of users (0 = all).")
@click.option("--decoder", type=click.Choice(["fused", "hf"]), default="fused", show_default=True,
              help="fused: the beam step op; hf: the HF-style prefix_allowed_tokens_fn baseline.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the results JSON here.")
def evaluate_cmd(run_dir, split, data_path, beams, batch_size, max_users, decoder, device, out):
    """Recall/NDCG@5,10 with trie-constrained beam search over all items; prints JSON."""
    from letter.rec import evaluate

    result = evaluate(run_dir, split, data=data_path, num_beams=beams, batch_size=batch_size, max_users=max_users,
                      decoder=decoder, device=device, out=out, show_progress=True)
    click.echo(json.dumps(result, indent=2))


@click.command("recommend")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False), help="A train-rec run folder (TIGER or LC-Rec).")
@click.option("--history", required=True, help="Comma-separated item ids (as in the dataset files), oldest first.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of identifiers to generate.")
@click.option("--data", "data_path", default=None, type=click.Path(), help="Dataset path (default: the run's).")
@click.option("--device", default="cpu", show_default=True)
def recommend_cmd(run_dir, history, k, data_path, device):
    """Print the top-k recommended items (id, score, title) for a history."""
    from letter.rec import recommend

    items = recommend(run_dir, [h.strip() for h in history.split(",") if h.strip()], k, data=data_path, device=device)
    for rank, rec in enumerate(items, 1):
        click.echo(f"{rank:3d}  {rec['item_id']:>10}  {rec['score']:9.4f}  {rec['title']}")
