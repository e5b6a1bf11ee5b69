"""`letter train-tokenizer` and `letter tokenize` (cold start)."""
import os

import click
import numpy as np

from letter.cli.options import (config_file_option, given_options, preset_option, refuse_ignored,
                                settings_from_options, settings_options)
from letter.errors import LetterError
from letter.runs import load_npy
from letter.tokenizer.config import TokenizerConfig


def _codebook_sizes(levels: int | None, size: int | None, current: list[int]) -> list[int]:
    """--levels L and --codebook-size N: shorthands for --codebook-sizes N,N,... (L entries)."""
    if levels is None and size is None:
        return current
    if levels is not None and levels < 1:
        raise LetterError(f"--levels must be >= 1, got {levels}")
    if size is not None and size < 2:
        raise LetterError(f"--codebook-size must be >= 2, got {size}")
    if size is None and len(set(current)) > 1:
        raise LetterError("--levels with per-level --codebook-sizes: give --codebook-size N or --codebook-sizes N1,N2,...")
    return [size if size is not None else current[0]] * (levels if levels is not None else len(current))


@click.command("train-tokenizer")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Dataset folder.")
@click.option("--text-emb", type=click.Path(exists=True, dir_okay=False), help="[items, dim] .npy (default: the one <Name>.emb-*.npy in --data).")
@click.option("--cf-emb", type=click.Path(exists=True, dir_okay=False), help="[items, d] .npy (default: the one <Name>.cf-*.npy in --data; none -> alpha 0).")
@settings_options(TokenizerConfig)
@click.option("--levels", type=int, help="Shorthand: this many levels of --codebook-size codes.")
@click.option("--codebook-size", type=int, help="Shorthand: every level gets N codes.")
@config_file_option
@preset_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run folder (default: runs/tokenizer-<Name>).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's checkpoint.pt (an error without one).")
@click.option("--overwrite", is_flag=True, help="Replace the tokenizer run already in --out (refused otherwise).")
def train_tokenizer_cmd(data_dir, text_emb, cf_emb, config_file, preset, levels, codebook_size, out_dir, resume,
                        overwrite, **options):
    """Train the LETTER tokenizer (RQ-VAE + collaborative and diversity regularization) and write
    <Name>.index.json, codes.npy, model, report.json/.md and curves into the run folder.

    On a cold split (--data holds cold_split.json, `letter data cold-split`) only the warm items'
    rows of the embeddings are used: codes cover items 0..W-1, cold items come later with
    `letter add-items`."""
    from letter.tokenizer.inputs import prepare_tokenizer_inputs

    if options.get("codebook_sizes") is not None:
        refuse_ignored(["levels", "codebook_size"], "is a shorthand for --codebook-sizes; give one of them")
    config = settings_from_options(TokenizerConfig, options, config_file, preset)
    if config.method == "rqkmeans":  # no training: nothing to resume, no collaborative term
        refuse_ignored(["resume"], "does not apply to --method rqkmeans (nothing is trained; a rerun with "
                                   "--overwrite refits identically)")
        refuse_ignored(["cf_emb"], "is not used by --method rqkmeans (text embeddings only)")
    config = config.replace(codebook_sizes=_codebook_sizes(levels, codebook_size, config.codebook_sizes))
    # alpha given here is kept (an error without CF embeddings); alpha from defaults or a file falls back to 0
    inputs = prepare_tokenizer_inputs(data_dir, config, text_emb, cf_emb, alpha_fallback=not given_options("alpha"),
                                      log=click.echo)
    out_dir = out_dir or os.path.join("runs", f"tokenizer-{inputs.name}")
    report = inputs.train(out_dir, resume=resume, overwrite=overwrite)
    if report:  # empty on non-zero torchrun ranks
        used = ", ".join(str(s["used"]) for s in report["level_stats"])
        click.echo(
            f"{out_dir}: {report['items']} items, collision {report['collision_rate_before']:.4f} -> "
            f"{report['collision_rate_after']:.4f}, codes used per level {used}; see report.md"
        )


@click.command("tokenize")
@click.option("--tokenizer", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A train-tokenizer run folder.")
@click.option("--embeddings", required=True, type=click.Path(exists=True, dir_okay=False), help="[n, text_dim] .npy of new items.")
@click.option("--out", type=click.Path(dir_okay=False), help="Output .index.json or .npy (default: <embeddings>.index.json).")
def tokenize_cmd(run_dir, embeddings, out):
    """Assign identifiers to unseen (cold-start) items with a trained tokenizer and the run's
    collision rules: new items sharing an identifier are re-assigned among themselves; with the
    run's --unique they also avoid every catalog identifier and each other's, without it a new
    item may share a catalog item's identifier (as catalog items may share one; the count is
    printed). Row i of --embeddings -> key "i"."""
    from letter.data import write_index_json
    from letter.runs import check_output_path, save_npy
    from letter.tokenizer import load_tokenizer

    out = out or os.path.splitext(embeddings)[0] + ".index.json"
    check_output_path(out, {"embeddings": embeddings, "tokenizer": run_dir})
    tok = load_tokenizer(run_dir)
    try:
        codes = tok.encode(load_npy(embeddings, "embeddings"))
    except LetterError as e:  # wrong width, NaN rows...: name the file
        raise LetterError(f"--embeddings {embeddings}: {e}") from None
    if out.endswith(".npy"):
        save_npy(out, codes)
    else:
        write_index_json(out, codes)
    taken = {tuple(c) for c in tok.catalog_codes.tolist()} if tok.catalog_codes is not None else set()
    clash = sum(tuple(c) in taken for c in codes.tolist())
    click.echo(f"{out}: {len(codes)} items, {len(np.unique(codes, axis=0))} distinct identifiers, "
               f"{clash} shared with catalog items")
