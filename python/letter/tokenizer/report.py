"""report.json / report.md / curves.png of a tokenizer run."""
import numpy as np
import torch
from torch.nn import functional as F

from letter.utils import pyplot

from .codes import level_stats
from .model import ROW_CHUNK, row_tensor


def category_agreement(first_level: np.ndarray, labels: np.ndarray) -> dict:
    """How much level-1 codes capture known item categories.

    same_code: P(two distinct items share a category | they share a level-1 code);
    chance: P(two distinct random items share a category). Purity: share of items in their
    code's majority category.
    """
    labels = np.asarray(labels)
    _, cat = np.unique(labels, return_inverse=True)
    table = np.zeros((first_level.max() + 1, cat.max() + 1), dtype=np.int64)
    np.add.at(table, (first_level, cat), 1)
    n_code = table.sum(1)
    same_pairs = float((table * (table - 1)).sum())
    code_pairs = float((n_code * (n_code - 1)).sum())
    n_cat = table.sum(0)
    n = len(labels)
    return {
        "same_code": same_pairs / code_pairs if code_pairs else float("nan"),
        "chance": float((n_cat * (n_cat - 1)).sum()) / (n * (n - 1)) if n > 1 else float("nan"),
        "purity": float(table.max(1).sum()) / n,
    }


def _recon_mse(model, quantized: torch.Tensor, text) -> float:
    """Mean squared reconstruction error over all items, a chunk of rows at a time (the decoder's
    widest layer over a whole large catalog would not fit; `text` may be memory-mapped)."""
    device = quantized.device
    total = 0.0
    for i in range(0, len(text), ROW_CHUNK):
        x = model.standardize(row_tensor(text, slice(i, i + ROW_CHUNK), device))
        total += float(F.mse_loss(model.decoder(quantized[i : i + ROW_CHUNK]), x, reduction="sum"))
    return total / (len(text) * text.shape[1])


def build_report(tok, text, cf, codes_raw, codes, z, resolution, history, best, init_stats, timings, item_labels) -> dict:
    model, config = tok.model, tok.config
    with torch.no_grad():
        c = torch.as_tensor(codes)
        quantized = sum(cb[c[:, l]] for l, cb in enumerate(tok.codebooks))
        report = {
            "name": tok.name,
            "items": int(len(text)),
            "levels": config.codebook_sizes,
            "epochs": 0 if config.method == "rqkmeans" else config.epochs,  # rqkmeans fits, never trains
            "best_epoch": best["epoch"],
            "best_train_collision": best["collision"],
            "collision_rate_before": resolution["collision_before"],
            "collision_rate_after_sinkhorn": resolution["collision_after_sinkhorn"],
            "collision_rate_after": resolution["collision_after"],
            "sinkhorn_rounds": resolution["sinkhorn_rounds"],
            "unique": config.unique,
            "level_stats": level_stats(codes, config.codebook_sizes),
            "level_stats_before_resolution": level_stats(codes_raw, config.codebook_sizes),
            "recon_mse": _recon_mse(model, quantized, text),  # on the standardized inputs when config.standardize
            "quantization_mse": float(F.mse_loss(quantized, z)),
        }
        if config.unique:
            report["unique_method"] = resolution["unique_method"]
            report["unique_moves"] = resolution["unique_moves"]
        zq = model.cf_proj(quantized) if cf is not None and model.cf_proj is not None else quantized
        if cf is not None and cf.shape[1] == zq.shape[1]:  # other widths: no trained map between the spaces
            report["cf_alignment_cosine"] = float(F.cosine_similarity(zq, torch.from_numpy(cf), dim=1).mean())
    if item_labels is not None:
        report["level1_category_agreement"] = category_agreement(codes[:, 0], item_labels)
    epoch_s = timings["epoch_s"]
    refresh = timings["cluster_refresh_s"]
    report["timing"] = {
        "kmeans_init_s": round(timings["kmeans_init_s"], 4),
        "epoch_mean_s": round(float(np.mean(epoch_s)), 4) if epoch_s else None,
        "train_total_s": round(float(np.sum(epoch_s)), 2),
        "cluster_refresh_mean_s": round(float(np.mean(refresh)), 5) if refresh else None,
        "cluster_refreshes": len(refresh),
        "epoch_s": [round(t, 4) for t in epoch_s],
        "eval_s": [round(t, 4) for t in timings.get("eval_s", [])],  # collision evaluations (in epoch_s)
        "checkpoint_s": [round(t, 4) for t in timings.get("checkpoint_s", [])],  # not in epoch_s
    }
    report["codebook_init_inertia"] = [round(s["inertia"], 4) for s in init_stats]
    # the last epoch's losses and collision rate, without the bookkeeping (wall time, selection)
    report["final_losses"] = ({k: v for k, v in history[-1].items() if k not in ("epoch", "used", "selected", "wall_s")}
                              if history else {})
    report["config"] = config.to_dict()
    return report


def report_markdown(report: dict) -> str:
    lines = [
        f"# LETTER tokenizer report: {report['name']}",
        "",
        f"{report['items']} items, levels {report['levels']}, "
        + (f"{report['epochs']} epochs (best-collision checkpoint: epoch {report['best_epoch']})." if report["epochs"]
           else "residual k-means, no training."),
        "",
        "| collision rate | value |",
        "|---|---|",
        f"| before (argmin codes) | {report['collision_rate_before']:.4%} |",
        f"| after Sinkhorn re-assignment ({report['sinkhorn_rounds']} rounds) | {report['collision_rate_after_sinkhorn']:.4%} |",
        f"| final | {report['collision_rate_after']:.4%} |",
        "",
    ]
    if report.get("unique"):
        lines += [f"`unique`: {report['unique_method']}; moves: {report['unique_moves']}.", ""]
    lines += ["| level | size | used | entropy (bits) | perplexity | Gini |", "|---|---|---|---|---|---|"]
    for s in report["level_stats"]:
        lines.append(f"| {s['level']} | {s['codebook_size']} | {s['used']} | {s['entropy_bits']:.3f} | "
                     f"{s['perplexity']:.1f} | {s['gini']:.3f} |")
    lines += ["", f"Reconstruction MSE {report['recon_mse']:.6f}, quantization MSE {report['quantization_mse']:.6f}."]
    if "cf_alignment_cosine" in report:
        lines.append(f"CF alignment (mean cosine of quantized vector and CF embedding): {report['cf_alignment_cosine']:.4f}.")
    if "level1_category_agreement" in report:
        a = report["level1_category_agreement"]
        lines.append(f"Level-1 codes vs categories: same-code pairs share a category {a['same_code']:.3f} "
                     f"(chance {a['chance']:.3f}), purity {a['purity']:.3f}.")
    t = report["timing"]
    lines += ["", f"Timing: k-means init {t['kmeans_init_s']}s, epoch mean {t['epoch_mean_s']}s, total "
              f"{t['train_total_s']}s, cluster refresh mean {t['cluster_refresh_mean_s']}s "
              f"({t['cluster_refreshes']} refreshes).", ""]
    return "\n".join(lines)


def plot_curves(history: list[dict], path: str) -> bool:
    """Loss terms and level-1..L code usage over epochs as a PNG; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "recon", "quant", "cf", "div"):
        vals = [r[key] for r in history]
        if any(v > 0 for v in vals):
            ax1.plot(epochs, vals, label=key)
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_title("training losses")
    ax1.legend()
    evals = [r for r in history if "used" in r]
    if evals:
        for l in range(len(evals[0]["used"])):
            ax2.plot([r["epoch"] for r in evals], [r["used"][l] for r in evals], label=f"level {l + 1} codes used")
        ax2b = ax2.twinx()
        ax2b.plot([r["epoch"] for r in evals], [r["collision"] for r in evals], "k--", label="collision rate")
        ax2b.set_ylabel("collision rate")
        ax2.legend(loc="center right")
    ax2.set_xlabel("epoch")
    ax2.set_title("code usage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
