"""`letter pipeline` and `letter config show`."""
import os

import click

from letter.cli.errors import LetterGroup
from letter.cli.options import preset_option


@click.command("pipeline")
@click.option("--data", "data_path", type=click.Path(exists=True), default=None,
              help="Dataset (LETTER folder, P5 file or raw Amazon folder).")
@click.option("--synthetic", is_flag=True, help="Use the built-in synthetic dataset (and its CPU-sized preset).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML or JSON file overriding any setting (see `letter config show`).")
@preset_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (one subfolder per stage).")
@click.option("--from", "from_stage", default=None,
              type=click.Choice(["prepare", "embed", "cf", "tokenizer", "rec", "evaluate"]),
              help="Rerun from this stage even if its outputs are up to date.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def pipeline(data_path, synthetic, config_file, preset, out, from_stage, device):
    """Run prepare -> embed -> train-cf -> train-tokenizer -> train-rec -> evaluate and write a report.

    Stages whose outputs exist and match the config are skipped, so rerunning the same command
    resumes after a crash or Ctrl-C. Ends with the metric table (Popularity, SASRec, LETTER-TIGER;
    LETTER-LC-Rec with rec.model lcrec) and writes OUT/report.md, OUT/report.json and PNG plots.
    """
    from letter.config import effective_config
    from letter.pipeline import Pipeline
    from letter.pipeline_report import format_table
    from letter.devices import resolve_device

    if bool(data_path) == bool(synthetic):
        raise click.UsageError("give exactly one of --data DIR or --synthetic")
    cfg = effective_config(config_file, synthetic=synthetic, preset=preset)
    resolve_device(device)  # a device this torch lacks fails here, before any stage writes
    source = {"synthetic": True} if synthetic else {"data": os.path.abspath(data_path)}
    report = Pipeline(out=out, config=cfg, source=source, device=device, log=click.echo).run(from_stage)
    click.echo("\n" + format_table(report["metrics"]))
    click.echo(f"\nreport: {os.path.join(out, 'report.md')}")


@click.group("config", cls=LetterGroup)
def config():
    """Pipeline configuration."""


@config.command("show")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML/JSON overrides.")
@click.option("--synthetic", is_flag=True, help="Include the synthetic dataset's CPU preset.")
@preset_option
def show(config_file, synthetic, preset):
    """Print the effective config (defaults + presets + file) as YAML."""
    from letter.config import dump_yaml, effective_config

    click.echo(dump_yaml(effective_config(config_file, synthetic=synthetic, preset=preset)), nl=False)
