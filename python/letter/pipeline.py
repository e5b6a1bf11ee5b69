"""`letter pipeline`: prepare -> embed -> cf -> tokenizer -> rec -> evaluate, then a report.

Each stage writes into RUN/<stage>/ and, when it finishes, RUN/<stage>/stage.json with the
fingerprint of everything it depends on (its config section, its upstream stages, the data
source). A rerun skips a stage whose stage.json matches; a stage interrupted midway resumes from
its own checkpoint when its fingerprint is unchanged and starts afresh otherwise. A failing stage
stops the pipeline with a LetterError naming the stage; earlier stages' outputs stay intact.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import numpy as np

from letter.errors import LetterError
from letter.utils import write_json

STAGES = ("prepare", "embed", "cf", "tokenizer", "rec", "evaluate")
# Upstream stages and the config sections each stage reads.
DEPENDS = {
    "prepare": ((), ("data",)),
    "embed": (("prepare",), ("embed",)),
    "cf": (("prepare",), ("cf",)),
    "tokenizer": (("embed", "cf"), ("tokenizer",)),
    "rec": (("tokenizer",), ("rec", "data")),
    "evaluate": (("rec",), ("evaluate",)),
}
MARKER = "stage.json"
STARTED = "stage.started.json"


@dataclasses.dataclass
class Pipeline:
    out: str
    config: dict
    source: dict  # {"synthetic": True} or {"data": absolute path}
    device: str = "auto"
    log: Callable[[str], None] = print
    fingerprints: dict = dataclasses.field(default_factory=dict)
    outputs: dict = dataclasses.field(default_factory=dict)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.out, stage)

    def fingerprint(self, stage: str) -> str:
        ups, sections = DEPENDS[stage]
        payload = {
            "stage": stage,
            "upstream": [self.fingerprints[u] for u in ups],
            "config": {s: self.config[s] for s in sections},
            "source": self.source if stage == "prepare" else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _read(self, stage: str, name: str) -> dict | None:
        path = os.path.join(self.stage_dir(stage), name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def run(self, from_stage: str | None = None) -> dict:
        if from_stage is not None and from_stage not in STAGES:
            raise LetterError(f"--from must be one of {', '.join(STAGES)}, got {from_stage!r}")
        os.makedirs(self.out, exist_ok=True)
        write_json(os.path.join(self.out, "config.json"), {"source": self.source, "config": self.config})
        forced = False
        for stage in STAGES:
            forced = forced or stage == from_stage
            fp = self.fingerprint(stage)
            self.fingerprints[stage] = fp
            done = self._read(stage, MARKER)
            if done and done.get("fingerprint") == fp and not forced:
                self.log(f"[{stage}] up to date ({fp}), skipped")
                self.outputs[stage] = done["outputs"]
                continue
            self._run_stage(stage, fp, fresh=forced)
        report = write_report(self)
        return report

    def _run_stage(self, stage: str, fp: str, fresh: bool) -> None:
        directory = self.stage_dir(stage)
        started = self._read(stage, STARTED)
        if os.path.isdir(directory) and (fresh or not started or started.get("fingerprint") != fp):
            # Outputs from other settings (or a forced rerun): start this stage from scratch.
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, STARTED), {"fingerprint": fp})
        self.log(f"[{stage}] running ({fp}) -> {directory}")
        t0 = time.time()
        try:
            outputs = STAGE_FUNCTIONS[stage](self, directory)
        except KeyboardInterrupt:
            self.log(f"[{stage}] interrupted; rerun the same command to resume")
            raise
        except LetterError as e:
            raise LetterError(f"stage '{stage}' failed: {e}") from e
        except Exception as e:  # an unexpected failure: still name the stage, keep the cause
            raise LetterError(f"stage '{stage}' failed: {type(e).__name__}: {e}") from e
        seconds = time.time() - t0
        self.outputs[stage] = outputs
        write_json(os.path.join(directory, MARKER), {"fingerprint": fp, "outputs": outputs, "seconds": seconds})
        self.log(f"[{stage}] done in {seconds:.1f}s")

    # Shared inputs of several stages -------------------------------------------------------
    def dataset(self):
        from letter.data import load_dataset

        return load_dataset(self.outputs["prepare"]["dataset"])


def _prepare(p: Pipeline, directory: str) -> dict:
    from letter.data import load_dataset, make_synthetic, write_letter
    from letter.data.stats import dataset_stats

    if p.source.get("synthetic"):
        ds = make_synthetic(**p.config["data"]["synthetic"], name="Synth")
    else:
        ds = load_dataset(p.source["data"])
    write_letter(ds, directory)
    stats = dataset_stats(ds)
    write_json(os.path.join(directory, "stats.json"), stats)
    return {"dataset": directory, "name": ds.name, "stats": stats}


def _embed(p: Pipeline, directory: str) -> dict:
    from letter.embed import embed_dataset

    ds = p.dataset()
    cfg = p.config["embed"]
    path, _ = embed_dataset(ds, directory, model=cfg["model"], mode=cfg["mode"], fields=cfg["fields"],
                            batch_size=cfg["batch_size"], device=p.device)
    return {"text_embeddings": path}


def _cf(p: Pipeline, directory: str) -> dict:
    from letter.cf import CFConfig, output_paths, train_cf

    ds = p.dataset()
    cfg = CFConfig(**p.config["cf"])
    paths = output_paths(directory, ds.name, cfg.dim)
    train_cf(ds, directory, cfg, resume=os.path.exists(paths["checkpoint"]), device=p.device, log=p.log)
    return {"cf_embeddings": paths["embeddings"], "metrics": paths["metrics"]}


def _tokenizer(p: Pipeline, directory: str) -> dict:
    from letter.tokenizer import TokenizerConfig, train_tokenizer

    ds = p.dataset()
    cfg = TokenizerConfig.from_dict(p.config["tokenizer"])
    text = np.load(p.outputs["embed"]["text_embeddings"])
    cf = np.load(p.outputs["cf"]["cf_embeddings"]) if cfg.alpha > 0 else None
    labels = None
    if ds.item_text is not None and all("category" in t for t in ds.item_text):
        names = sorted({t["category"] for t in ds.item_text})
        labels = np.array([names.index(t["category"]) for t in ds.item_text])
    report = train_tokenizer(cfg, text, cf, directory, name=ds.name, num_items=ds.num_items, device=p.device,
                             resume=os.path.exists(os.path.join(directory, "checkpoint.pt")), item_labels=labels)
    write_json(os.path.join(directory, "pipeline_report.json"), report)
    return {"run": directory, "report": os.path.join(directory, "report.json")}


def _rec(p: Pipeline, directory: str) -> dict:
    from letter.rec import RecConfig, train_rec

    values = dict(p.config["rec"], max_history=p.config["data"]["max_history"])
    if p.device != "auto":
        values["device"] = p.device
    cfg = RecConfig.from_dict(values)
    summary = train_rec(cfg, p.outputs["prepare"]["dataset"], p.outputs["tokenizer"]["run"], directory,
                        resume=os.path.exists(os.path.join(directory, "checkpoint.pt")))
    return {"run": directory, "history": os.path.join(directory, "history.json"),
            "best_valid": summary.get("best_valid")}


def _evaluate(p: Pipeline, directory: str) -> dict:
    from letter.rec import evaluate

    cfg = p.config["evaluate"]
    out = os.path.join(directory, "metrics.json")
    device = "cuda" if p.device in ("auto", "cuda") and _cuda() else "cpu"
    result = evaluate(p.outputs["rec"]["run"], cfg["split"], num_beams=cfg["num_beams"],
                      batch_size=cfg["batch_size"], device=device, out=out, show_progress=True)
    return {"metrics": out, "result": result}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


STAGE_FUNCTIONS = {"prepare": _prepare, "embed": _embed, "cf": _cf, "tokenizer": _tokenizer, "rec": _rec,
                   "evaluate": _evaluate}

METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def metric_table(p: Pipeline) -> list[dict]:
    """Popularity, SASRec and LETTER-TIGER on the same leave-one-out test split."""
    cf_metrics = _load(p.outputs["cf"]["metrics"])
    tiger = p.outputs["evaluate"]["result"]["metrics"]
    return [
        {"model": "Popularity", **{m: cf_metrics.get("popularity_test", {}).get(m) for m in METRICS}},
        {"model": "SASRec", **{m: cf_metrics.get("test", {}).get(m) for m in METRICS}},
        {"model": "LETTER-TIGER", **{m: tiger.get(m) for m in METRICS}},
    ]


def format_table(rows: list[dict]) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for row in rows:
        cells = [f"{row[m]:.4f}" if isinstance(row.get(m), (int, float)) else "n/a" for m in METRICS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(p: Pipeline) -> dict:
    """report.json + report.md (+ training-curve PNGs when matplotlib is installed) in RUN/."""
    tok = _load(p.outputs["tokenizer"]["report"])
    table = metric_table(p)
    evaluation = p.outputs["evaluate"]["result"]
    report = {
        "dataset": p.outputs["prepare"]["stats"],
        "tokenizer": tok,
        "metrics": table,
        "evaluation": {k: evaluation.get(k) for k in ("split", "users", "beams", "wall_s", "users_per_s",
                                                       "targets_in_collision_groups")},
        "stage_seconds": {s: _stage_seconds(p, s) for s in STAGES},
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
        f"## Test metrics (leave-one-out, full ranking; TIGER: constrained beam search, {evaluation.get('beams')} beams,"
        f" {evaluation.get('users_per_s')} users/s)",
        "",
        format_table(table),
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
        "| " + " | ".join(STAGES) + " |",
        "|" + "---|" * len(STAGES),
        "| " + " | ".join(f"{report['stage_seconds'][s]:.1f}" if report["stage_seconds"][s] is not None else "-"
                          for s in STAGES) + " |",
    ]
    if plots:
        lines += ["", "## Training curves", ""] + [f"![{os.path.basename(x)}]({os.path.relpath(x, p.out)})" for x in plots]
    with open(os.path.join(p.out, ".report.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(p.out, ".report.md.tmp"), os.path.join(p.out, "report.md"))
    return report


def _stage_seconds(p: Pipeline, stage: str):
    marker = p._read(stage, MARKER)
    return marker.get("seconds") if marker else None


def _plot_curves(p: Pipeline) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    tok_png = os.path.join(p.outputs["tokenizer"]["run"], "curves.png")
    if os.path.isfile(tok_png):
        paths.append(tok_png)
    series = []
    cf_hist = _load(p.outputs["cf"]["metrics"]).get("history", [])
    if cf_hist:
        series.append(("SASRec valid NDCG@10", [h.get("epoch") for h in cf_hist], [h.get("valid_ndcg@10") for h in cf_hist]))
    rec_hist = _load(p.outputs["rec"]["history"])
    if rec_hist:
        series.append(("TIGER train loss", [h.get("epoch") for h in rec_hist], [h.get("train_loss") for h in rec_hist]))
        evals = [h for h in rec_hist if h.get("valid_ndcg@10") is not None]
        if evals:
            series.append(("TIGER valid NDCG@10", [h["epoch"] for h in evals], [h["valid_ndcg@10"] for h in evals]))
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
        fig.savefig(path + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        paths.append(path)
    return paths
