"""`letter train-rec`, `letter evaluate`, `letter recommend`: the generative recommender (TIGER, or
LC-Rec with --model lcrec --base-model PATH)."""
import json

import click

from letter.cli.options import config_file_option, preset_option, settings_from_options, settings_options
from letter.rec.config import RecConfig
from letter.rec.evaluation import EvaluateSettings


index_version_option = click.option(
    "--index-version", type=click.IntRange(min=0), default=None,
    help="Index version of the run to use (default: the newest; 0: the training index).")
allow_other_data_option = click.option(
    "--allow-other-data", is_flag=True,
    help="Use a dataset whose content differs from the one the run was trained on (refused otherwise; the "
         "training dataset grown by appending items needs no flag; a cold split of the run's catalog, or the catalog "
         "of its split, is refused: the items are numbered otherwise).")
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace the run already in --out (refused otherwise; see --resume).")
max_new_share_option = click.option(
    "--max-new-share", type=click.FloatRange(0, 1), default=None,
    help="At most this share of each list from items added after training (floor(share*K)), enforced inside "
         "the constrained search (default: no limit).")


@click.command("train-rec")
@click.option("--data", "data_path", required=True, type=click.Path(), help="Dataset folder or file (any letter.data format).")
@click.option("--index", "codes", required=True, type=click.Path(),
              help="Item codes: an authors'-format <Name>.index.json, a codes .npy, or a tokenizer run folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@overwrite_option
@click.option("--stop-after", type=click.IntRange(min=1), default=None, help="Return after N epochs of this call (resume later).")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Also checkpoint inside an epoch every M minutes (long epochs: a killed run loses at most M).")
@settings_options(RecConfig)
@config_file_option
@preset_option
def train_rec_cmd(data_path, codes, out_dir, resume, overwrite, stop_after, checkpoint_minutes, config_file, preset,
                  **options):
    """Train TIGER (default) or LC-Rec (--model lcrec --base-model LOCAL_LLM_FOLDER: LoRA on a causal LM,
    needs pip install -e .[llm]) on item identifiers. Works under torchrun (gloo on CPU, nccl on GPU).

    Model selection: NDCG@10 on the whole validation split (--valid-users N: a sample, with its
    standard error); a validation counts as better only by more than --min-delta (default: one
    standard error), within it the lower validation loss wins; no stop before --stop-from of the
    cosine schedule. Every epoch prints the validation's cost (valid_s)."""
    from letter.rec import train_rec

    config = settings_from_options(RecConfig, options, config_file, preset)
    summary = train_rec(config, data_path, codes, out_dir, resume=resume, overwrite=overwrite, stop_after=stop_after,
                        checkpoint_minutes=checkpoint_minutes)
    click.echo(json.dumps(summary, indent=2))


@click.command("evaluate")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False), help="A train-rec run folder (TIGER or LC-Rec).")
@settings_options(EvaluateSettings, check_ranges=True)
@click.option("--data", "data_path", default=None, type=click.Path(), help="Dataset path (default: the run's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the results JSON here.")
@index_version_option
@max_new_share_option
@click.option("--cold", is_flag=True,
              help="Cold-split report: cold-target and warm-target test users, before and after the added items, "
                   "with popularity (+ content KNN with --text-emb, SASRec with --cf).")
@click.option("--text-emb", type=click.Path(dir_okay=False), default=None,
              help="--cold: [items, d] text embeddings of the split's items for the content-KNN baseline (refused "
                   "when its sidecar records other items).")
@click.option("--cf", "cf_dir", type=click.Path(file_okay=False), default=None,
              help="--cold: a train-cf run folder on the split for the SASRec baseline.")
@click.option("--warm-users", type=click.IntRange(min=0), default=0, show_default=True,
              help="--cold: evaluate a fixed sample of this many warm-target users (0 = all; cold-target: all).")
@allow_other_data_option
def evaluate_cmd(run_dir, data_path, device, out, index_version, max_new_share, cold, text_emb, cf_dir, warm_users,
                 allow_other_data, **options):
    """Recall/NDCG@5,10 with trie-constrained beam search over all items; prints JSON.

    Uses the newest index version of the run (items added with `letter add-items`) unless
    --index-version N (0: the index it was trained with)."""
    settings = settings_from_options(EvaluateSettings, options)
    if cold:
        from letter.rec.cold import cold_table, evaluate_cold

        plain = (settings.split, settings.max_users, settings.decoder, settings.exclude_history) == \
            ("test", 0, "fused", False)
        if not plain or index_version is not None:
            raise click.UsageError("--cold evaluates the test users of both index versions with the fused decoder; "
                                   "drop --split/--max-users/--decoder/--index-version/--exclude-history")
        result = evaluate_cold(run_dir, data=data_path, text_emb=text_emb, cf_dir=cf_dir, max_new_share=max_new_share,
                               num_beams=settings.num_beams, batch_size=settings.batch_size, warm_users=warm_users,
                               device=device, out=out, show_progress=True, allow_other_data=allow_other_data)
        click.echo(cold_table(result))
        return
    if text_emb or cf_dir or warm_users:
        raise click.UsageError("--text-emb, --cf and --warm-users belong to --cold")
    from letter.rec import evaluate

    result = evaluate(run_dir, settings=settings, data=data_path, device=device, out=out, show_progress=True,
                      index_version=index_version, max_new_share=max_new_share, allow_other_data=allow_other_data)
    click.echo(json.dumps(result, indent=2))


@click.command("recommend")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False), help="A train-rec run folder (TIGER or LC-Rec).")
@click.option("--history", default=None, help="Comma-separated item ids (as in the dataset files), oldest first.")
@click.option("--histories", "histories_file", default=None, type=click.Path(dir_okay=False),
              help="A file of histories, one per line (comma-separated item ids): writes JSONL to --out.")
@click.option("--users", default=None,
              help="'all' (every user of the dataset) or comma-separated user ids; each user's whole sequence is "
                   "the history: writes JSONL to --out.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="JSONL output of --histories / --users: one line per history with its items.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of identifiers to generate.")
@click.option("--beams", type=click.IntRange(min=1), default=None,
              help="Beam width of the search, >= k (default: max(k, 20)); the k identifiers are its first k.")
@click.option("--exclude-history", is_flag=True, help="Never recommend an item of the history.")
@click.option("--exclude", default="", help="Comma-separated item ids never to recommend (with --history).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Histories per batched beam search (--histories / --users).")
@click.option("--data", "data_path", default=None, type=click.Path(), help="Dataset path (default: the run's).")
@click.option("--device", default="cpu", show_default=True)
@index_version_option
@max_new_share_option
@allow_other_data_option
def recommend_cmd(run_dir, history, histories_file, users, out, k, beams, exclude_history, exclude, batch_size,
                  data_path, device, index_version, max_new_share, allow_other_data):
    """Print the top-k recommended items (rank, id, score, title) for a history, or write them as JSONL
    for a file of histories or the dataset's users (batched, with a progress bar). Items sharing an
    identifier share its rank, so a list can have more than k lines."""
    from letter.rec.recommend import DEFAULT_BEAMS, RunRecommender, read_histories_file, recommend, recommend_jsonl

    if sum(x is not None for x in (history, histories_file, users)) != 1:
        raise click.UsageError("give exactly one of --history, --histories FILE, --users")
    if history is None and not out:
        raise click.UsageError("--histories / --users write JSONL: give --out FILE")
    if history is None and exclude:
        raise click.UsageError("--exclude applies to --history only")
    explicit_batch = click.get_current_context().get_parameter_source("batch_size") != click.core.ParameterSource.DEFAULT
    if history is not None and (out or explicit_batch):
        raise click.UsageError("--out and --batch-size apply to --histories / --users only (--history prints its list)")
    if beams is not None and beams < k:
        raise click.UsageError(f"--beams must be >= -k ({k}), got {beams}")
    if history is not None:
        ids = [h.strip() for h in history.split(",") if h.strip()]
        items = recommend(run_dir, ids, k, data=data_path, device=device, beams=beams, exclude_history=exclude_history,
                          exclude=[e.strip() for e in exclude.split(",") if e.strip()], index_version=index_version,
                          max_new_share=max_new_share, allow_other_data=allow_other_data)
        for rec in items:  # items sharing an identifier share its rank (and may give more than k lines)
            click.echo(f"{rec['rank']:3d}  {rec['item_id']:>10}  {rec['score']:9.4f}  {rec['title'] or ''}")
        return
    from letter.runs import check_output_path

    check_output_path(out, {"run_dir": run_dir, "data": data_path, "histories_file": histories_file})
    rows = None
    if histories_file is not None:
        rows = [({"line": n}, h) for n, h in enumerate(read_histories_file(histories_file), 1)]
    run = RunRecommender(run_dir, data=data_path, device=device, beams=beams or max(k, DEFAULT_BEAMS),
                         index_version=index_version, max_new_share=max_new_share, allow_other_data=allow_other_data)
    if rows is None:
        dataset = run.rec.dataset
        wanted = dataset.user_ids if users.strip() == "all" else [u.strip() for u in users.split(",") if u.strip()]
        where = {u: i for i, u in enumerate(dataset.user_ids)}
        unknown = [u for u in wanted if u not in where]
        if unknown or not wanted:
            raise click.UsageError(f"--users: unknown user id(s) {', '.join(unknown[:5])}" if unknown
                                   else "--users: give 'all' or user ids")
        rows = [({"user": u}, [dataset.item_ids[i] for i in dataset.sequences[where[u]]]) for u in wanted]
    count = recommend_jsonl(run, rows, out, k, exclude_history=exclude_history, batch_size=batch_size)
    click.echo(f"wrote {count} recommendation lists to {out}")


@click.command("add-items")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False), help="A train-rec run folder.")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(file_okay=False),
              help="The train-tokenizer run that made the run's identifiers.")
@click.option("--embeddings", required=True, type=click.Path(dir_okay=False),
              help="Text embeddings .npy: [items, d] rows of the whole catalog (refused when its sidecar, as "
                   "`letter embed` writes it, records other items), or rows of the next items to add.")
@click.option("--data", "data_path", default=None, type=click.Path(),
              help="Dataset path (default: the run's): the training dataset or it grown by appending items.")
def add_items_cmd(run_dir, tokenizer_dir, embeddings, data_path):
    """Make new items recommendable without retraining: the dataset's items that the run's newest
    index lacks (catalog order) get identifiers from the tokenizer (`letter tokenize`'s rules: with
    the tokenizer run's --unique the catalog's identifiers stay taken, without it a new item may
    share one) and are written as a new index version,
    atomically. Adding when nothing is missing is a no-op. The dataset is the one the run was
    trained on, or it with items appended to its item file (new ids that sort after the old ones
    in the catalog's order, without interactions); other data is refused."""
    from letter.rec.index_versions import add_items

    record = add_items(run_dir, tokenizer_dir, embeddings, data=data_path)
    if not record["added"]:
        click.echo(record["message"])
        return
    click.echo(f"{run_dir}: index version {record['version']}: {record['added']} items added "
               f"({record['indexed_items']} indexed, {record['identifiers_shared_with_catalog']} identifiers shared "
               "with earlier items)")
