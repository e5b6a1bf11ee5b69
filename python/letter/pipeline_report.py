"""The pipeline's report: the metric table (Popularity, SASRec, LETTER-TIGER or -LC-Rec on the same test split),
tokenizer statistics, time per stage and training curves, as report.json, report.md and PNGs."""
import os

from letter.rec.config import MODEL_NAMES
from letter.runs import atomic_path, parse_json, read_text, write_json
from letter.utils import pyplot

METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
CF_NAMES = {"sasrec": "SASRec", "lightgcn": "LightGCN"}  # the cf section's model -> its row in the table


def _cf_name(cf_metrics: dict) -> str:
    return CF_NAMES[cf_metrics.get("config", {}).get("model", "sasrec")]


def _rec_name(p) -> str:
    """The rec stage's model as the table names it (its section's RecConfig.model)."""
    return MODEL_NAMES[p.config["rec"]["model"]]


def _load(path: str):
    return parse_json(read_text(path), path)


def _sasrec_protocols(cf_metrics: dict) -> tuple[dict, dict | None]:
    """SASRec's test metrics with history kept and masked (runs older than the two recorded
    protocols have one "test" entry, under the protocol their config named)."""
    if "test_history_kept" in cf_metrics:
        return cf_metrics["test_history_kept"], cf_metrics.get("test_history_masked")
    if cf_metrics.get("config", {}).get("mask_history"):
        return {}, cf_metrics.get("test", {})
    return cf_metrics.get("test", {}), None


def metric_table(p) -> list[dict]:
    """Popularity, SASRec and LETTER-<rec model> on the same leave-one-out test split: per row the metrics
    with history kept, and under "history_excluded" those with every history item ruled out (SASRec
    and Popularity: masked from the ranking; the recommender: pruned from the search), or None if not measured."""
    cf_metrics = _load(p.outputs["cf"]["metrics"])
    tiger = p.outputs["evaluate"]["result"]
    sasrec_kept, sasrec_excluded = _sasrec_protocols(cf_metrics)
    rows = [
        ("Popularity", cf_metrics.get("popularity_test", {}), cf_metrics.get("popularity_test_history_masked")),
        (_cf_name(cf_metrics), sasrec_kept, sasrec_excluded),
        (f"LETTER-{_rec_name(p)}", tiger["metrics"], tiger.get("metrics_exclude_history")),
    ]
    return [{"model": model, **{m: kept.get(m) for m in METRICS},
             "history_excluded": {m: excluded.get(m) for m in METRICS} if excluded else None}
            for model, kept, excluded in rows]


def format_table(rows: list[dict]) -> str:
    """Markdown table: the history-kept metrics, then (when any row has them) the history-excluded ones."""
    both = any(row.get("history_excluded") for row in rows)
    head = list(METRICS) + ([f"{m} (history excluded)" for m in METRICS] if both else [])
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for row in rows:
        values = [row.get(m) for m in METRICS]
        if both:
            values += [(row.get("history_excluded") or {}).get(m) for m in METRICS]
        cells = [f"{v:.4f}" if isinstance(v, (int, float)) else "n/a" for v in values]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(p) -> dict:
    """report.json + report.md (+ training-curve PNGs when matplotlib is installed) in RUN/."""
    tok = _load(p.outputs["tokenizer"]["report"])
    table = metric_table(p)
    evaluation = p.outputs["evaluate"]["result"]
    report = {
        "dataset": p.outputs["prepare"]["stats"],
        "tokenizer": tok,
        "metrics": table,
        "evaluation": {k: evaluation.get(k) for k in ("split", "users", "beams", "wall_s", "users_per_s",
                                                       "targets_in_collision_groups", "wall_s_exclude_history",
                                                       "targets_in_history")},
        "stage_seconds": {s: p.stage_seconds(s) for s in p.outputs},
    }
    plots = _plot_curves(p)
    report["plots"] = plots
    write_json(os.path.join(p.out, "report.json"), report)
    stats = report["dataset"]
    lines = [
        "# LETTER pipeline report",
        "",
        f"Dataset **{stats['name']}**: {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions (sparsity {stats['sparsity']:.4f}).",
        "",
        f"## Test metrics (leave-one-out, full ranking; {_rec_name(p)}: constrained beam search, "
        f"{evaluation.get('beams')} beams,"
        f" {evaluation.get('users_per_s')} users/s)",
        "",
        format_table(table),
        "",
        "History kept: the authors' protocol (an item the user already has may be recommended and counts if "
        "it is the target). History excluded: every earlier item of the user is ruled out (SASRec "
        f"cf.mask_history; {_rec_name(p)} evaluate.exclude_history, pruned inside the constrained search).",
        "",
        "## Tokenizer",
        "",
        f"Collision rate {tok.get('collision_rate_before', float('nan')):.4f} before resolution, "
        f"{tok.get('collision_rate_after', float('nan')):.4f} after; reconstruction MSE "
        f"{tok.get('recon_mse', float('nan')):.4f}; CF alignment (mean cosine) "
        f"{tok.get('cf_alignment_cosine', float('nan')):.4f}; best epoch {tok.get('best_epoch')}.",
        "",
        "| level | codes used | entropy (bits) | perplexity | Gini |",
        "|---|---|---|---|---|",
        *[f"| {st['level']} | {st['used']} / {st['codebook_size']} | {st['entropy_bits']:.2f} | "
          f"{st['perplexity']:.1f} | {st['gini']:.3f} |" for st in tok.get("level_stats", [])],
        "",
        "## Time per stage (s)",
        "",
        "| " + " | ".join(report["stage_seconds"]) + " |",
        "|" + "---|" * len(report["stage_seconds"]),
        "| " + " | ".join(f"{report['stage_seconds'][s]:.1f}" if report["stage_seconds"][s] is not None else "-"
                          for s in report["stage_seconds"]) + " |",
    ]
    if plots:
        lines += ["", "## Training curves", ""] + [f"![{os.path.basename(x)}]({os.path.relpath(x, p.out)})" for x in plots]
    with atomic_path(os.path.join(p.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


def _plot_curves(p) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    tok_png = os.path.join(p.outputs["tokenizer"]["run"], "curves.png")
    if os.path.isfile(tok_png):
        paths.append(tok_png)
    series = []
    cf_metrics = _load(p.outputs["cf"]["metrics"])
    cf_hist = cf_metrics.get("history", [])
    if cf_hist:
        series.append((f"{_cf_name(cf_metrics)} valid NDCG@10", [h.get("epoch") for h in cf_hist], [h.get("valid_ndcg@10") for h in cf_hist]))
    rec_hist = _load(p.outputs["rec"]["history"])
    if rec_hist:
        series.append((f"{_rec_name(p)} train loss", [h.get("epoch") for h in rec_hist], [h.get("train_loss") for h in rec_hist]))
        evals = [h for h in rec_hist if h.get("valid_ndcg@10") is not None]
        if evals:
            series.append((f"{_rec_name(p)} valid NDCG@10", [h["epoch"] for h in evals], [h["valid_ndcg@10"] for h in evals]))
    series = [s for s in series if any(v is not None for v in s[2])]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
        for ax, (title, xs, ys) in zip(axes[0], series):
            ax.plot(xs, ys, marker="o", ms=3)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(p.out, "training_curves.png")
        with atomic_path(path) as tmp:  # the temporary name keeps .png, the format savefig writes
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
