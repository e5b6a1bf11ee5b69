"""`letter compare`: identifier sets side by side under one recommender.

One dataset, several identifier sets (tokenizer run folders, authors'-format index .json files or
codes .npy files, each with a label; a path holding `{seed}` names one set per seed, e.g. one
tokenizer run per seed, so the seeds repeat the whole tokenizer + recommender chain). The same
recommender settings (TIGER, or LC-Rec with model "lcrec") are trained on every set for each of
`seeds` recommender seeds (config.seed, config.seed + 1, ...), and every run is evaluated on the
same test users. Output folder:

  compare.json / compare.md   per set: mean +- std over seeds of Recall/NDCG@5,10; the paired
                              bootstrap 95% interval of its difference to the first set; identifier
                              diagnostics (collision rate, codes used per level, agreement of
                              level-1 codes with the items' categories when item.json has them);
                              compare.json also the sha256 of the codes each seed's run trained on
  compare.png                 the same as bar charts (when matplotlib is installed)
  runs/<label>/seed-<s>/      rec/ (the train-rec run folder), test_ranks.npz (rank of the target's
                              identifier per test user, -1 = not generated), result.json (the
                              run's manifest, written last: kind "compare-run", the state of
                              test_ranks.npz, its metrics)

Resuming works like `letter pipeline`: result.json records as input a fingerprint of everything the
run depends on (rec settings, the codes, the dataset, the evaluation settings); a rerun skips a run
whose fingerprint matches and whose test_ranks.npz is the one recorded. The run folder itself is
keyed by the training part of it (rec settings, codes, dataset): with that unchanged an
interrupted training resumes from its checkpoint (train_rec(resume=True)) and a finished one is
kept when only the evaluation settings changed (it is evaluated again, not retrained); a change
of the training part restarts the run. Every set is validated (path, readable codes, item count;
on a cold split the warm items', as train-rec reads them) before any training starts.

Paired bootstrap: for set A vs the first set F, d[s, u] = metric_A(seed s, user u) -
metric_F(seed s, user u) pairs users and seeds; the per-user mean over seeds is resampled over
users (percentile interval). It measures the uncertainty from the finite test set given these
seeds; the spread across seeds is the reported std.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Callable, Iterable

import numpy as np
import torch

from letter.data import Dataset, load_dataset
from letter.data.cold import read_cold_split
from letter.data.split import check_training_samples
from letter.errors import LetterError, SettingError
from letter.utils import pyplot
from letter.metrics import metrics_from_hits, normalized_mutual_info
from letter.rec import RecConfig, train_rec
from letter.rec.config import model_summary
from letter.rec.data import codes_sha, resolve_codes
from letter.rec.evaluation import generate, load_run, prefix_index, target_hits
from letter.rec.recommender import as_recommender, recommender_class
from letter.runs import (MANIFEST, RecRun, TokenizerRun, atomic_path, finished_step, fingerprint, mark_started,
                         prepare_run_folder, read_json, start_step, write_json, write_manifest)
from letter.tokenizer.codes import collision_rate
from letter.tokenizer.report import category_agreement
from letter.devices import resolve_device

METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
RESULT, STARTED, RANKS = "result.json", "started.json", "test_ranks.npz"  # result.json: a run's manifest
RUN_KIND = "compare-run"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclasses.dataclass
class Identifiers:
    path: str  # absolute path (run folder, index .json or codes .npy)
    codes: np.ndarray  # [num_items, L] in the dataset's item order
    sha: str
    codebook_sizes: list[int] | None = None  # from a tokenizer run folder's config.json


@dataclasses.dataclass
class IdentifierSet:
    """A labelled identifier set: one path for every seed, or (a path with `{seed}`) one tokenizer
    run per seed, so each seed repeats the whole tokenizer + recommender chain."""

    label: str
    path: str  # as given (may hold {seed})
    members: dict  # seed -> Identifiers ({None: ...} for a path without {seed})

    def for_seed(self, seed: int) -> Identifiers:
        return self.members.get(seed, self.members.get(None))


def parse_set(spec: str) -> tuple[str, str]:
    """'LABEL=PATH' -> (label, path)."""
    label, sep, path = spec.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise SettingError("sets", f"{spec!r}: expected LABEL=PATH")
    return label.strip(), path.strip()


def _run_folder_sizes(path: str) -> list[int] | None:
    cfg = os.path.join(path, TokenizerRun.CONFIG)
    if not os.path.isdir(path) or not os.path.isfile(cfg):
        return None
    sizes = read_json(cfg, "tokenizer settings").get("codebook_sizes")
    try:
        return [int(n) for n in sizes] if isinstance(sizes, list) else None
    except (ValueError, TypeError):
        return None


def load_sets(dataset: Dataset, sets: Iterable, seeds: list[int] | None = None) -> list[IdentifierSet]:
    """Validate every set ('LABEL=PATH' strings, (label, path) pairs or a {label: path} dict)
    against the dataset; a PATH holding `{seed}` names one identifier set per seed in `seeds`. All
    problems are reported together in one LetterError line."""
    pairs = list(sets.items()) if isinstance(sets, dict) else [parse_set(s) if isinstance(s, str) else tuple(s)
                                                                for s in sets]
    if not pairs:
        raise LetterError("no identifier set given: sets needs at least one LABEL=PATH", "sets")
    problems, out, seen = [], [], set()
    cold = read_cold_split(dataset)  # a cold split's codes cover its warm items (as train-rec reads them)
    for label, path in pairs:
        path = os.fspath(path)
        where = f"sets {label}={path}"
        if not _LABEL.fullmatch(label) or len(label) > 100:
            problems.append(f"{where}: the label must be at most 100 letters, digits, '.', '_', '+' or '-' (it names "
                            "a folder)")
            continue
        if label in seen:
            problems.append(f"{where}: label {label!r} used twice")
            continue
        seen.add(label)
        members = {}
        for seed in (seeds or [0]) if "{seed}" in path else [None]:
            concrete = path.replace("{seed}", str(seed)) if seed is not None else path
            if not os.path.exists(concrete):
                problems.append(f"{where}: no such file or folder {concrete}")
                continue
            try:
                codes, _ = resolve_codes(concrete, dataset, cold, what="")  # `where` names the set
            except (LetterError, OSError, ValueError) as e:
                problems.append(f"{where}: {e}")
                continue
            members[seed] = Identifiers(os.path.abspath(concrete), codes, codes_sha(codes), _run_folder_sizes(concrete))
        out.append(IdentifierSet(label, path, members))
    if problems:
        raise LetterError("bad identifier set(s): " + "; ".join(" ".join(p.split()) for p in problems), "sets")
    return out


def set_diagnostics(s: IdentifierSet, categories) -> dict:
    """identifier_diagnostics of the set; for one set per seed, each number averaged over seeds."""
    each = [identifier_diagnostics(m.codes, categories, m.codebook_sizes) for m in s.members.values()]
    if len(each) == 1:
        return each[0]
    out = dict(each[0])
    for key, value in each[0].items():
        if isinstance(value, float):
            out[key] = float(np.mean([d[key] for d in each]))
        elif key == "codes_used":
            out[key] = [float(np.mean(v)) for v in zip(*(d[key] for d in each))]
    out["averaged_over_seeds"] = len(each)
    return out


def item_categories(dataset: Dataset) -> tuple[str, np.ndarray] | None:
    """(field, int labels [I]) from item text "category" (preferred) or "categories", when every
    item has one; lists are joined with ','. None otherwise."""
    text = dataset.item_text
    if not text:
        return None
    for field in ("category", "categories"):
        values = [t.get(field) for t in text]
        if all(v is not None and v != "" and v != [] for v in values):
            names = [",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in values]
            _, labels = np.unique(names, return_inverse=True)
            return field, labels.reshape(-1)
    return None


def identifier_diagnostics(codes: np.ndarray, categories: tuple[str, np.ndarray] | None = None,
                           codebook_sizes: list[int] | None = None) -> dict:
    """Collision rate, distinct codes per level and (with categories) level-1 purity / NMI."""
    out = {
        "items": int(len(codes)),
        "levels": int(codes.shape[1]),
        "collision_rate": collision_rate(codes),
        "codes_used": [int(len(np.unique(codes[:, l]))) for l in range(codes.shape[1])],
        "codebook_sizes": codebook_sizes,
    }
    if categories is not None:
        field, labels = categories
        labels = labels[: len(codes)]  # a cold split's codes: its warm items, the first of the catalog
        agreement = category_agreement(codes[:, 0], labels)
        out["category_field"] = field
        out["categories"] = int(len(np.unique(labels)))
        out["level1_purity"] = agreement["purity"]
        out["level1_nmi"] = normalized_mutual_info(codes[:, 0], labels)
        out["level1_same_code_same_category"] = agreement["same_code"]
        out["same_category_chance"] = agreement["chance"]
    return out


@torch.no_grad()
def user_ranks(run_dir: str, split: str = "test", *, data=None, max_users: int = 0, sample_seed: int = 0,
               num_beams: int = 20, batch_size: int = 256, device: str = "cpu", exclude_history: bool = False) -> dict:
    """Per-user results of a train-rec run, with the hit rule of letter.rec.evaluation (a generated
    identifier equal to the target's): {"ranks": int64 [U] (0-based position of the target's
    identifier among the num_beams generated ones, -1 when absent), "targets": item ids [U],
    "metrics": Recall/NDCG@5,10 (equal to evaluate()'s on the same users), "wall_s"}; with
    exclude_history also "ranks_exclude_history" and "metrics_exclude_history" of the search that
    excludes each user's history items (evaluate(exclude_history=True)'s second protocol).
    The users are `split`'s, or a sample of max_users of them drawn with sample_seed (not the
    run's seed, so runs with different seeds are evaluated on the same users)."""
    if num_beams < 10:
        raise SettingError("num_beams", f"must be >= 10 to compute the @10 metrics, got {num_beams}")
    dev = resolve_device(device)
    model, rec, _ = load_run(run_dir, data, dev)
    adapter = as_recommender(model, rec=rec)
    enc, targets = adapter.eval_inputs(rec, split, max_users, sample_seed)
    index = prefix_index(rec, dev, model)

    def ranks_and_metrics(banned_items=None):
        leaves, _ = generate(model, index, enc, num_beams, batch_size, dev, banned_items=banned_items)
        hits = target_hits(index, leaves, targets, banned_items)
        ranks = torch.where(hits.any(1), hits.float().argmax(1), torch.full((hits.shape[0],), -1))
        return ranks.numpy().astype(np.int64), metrics_from_hits(hits, ks=(5, 10))

    started = time.perf_counter()
    ranks, metrics = ranks_and_metrics()
    out = {"ranks": ranks, "targets": targets.numpy().astype(np.int64), "metrics": metrics}
    if exclude_history:
        out["ranks_exclude_history"], out["metrics_exclude_history"] = ranks_and_metrics(
            rec.eval_seen_items(split, max_users, sample_seed))
    return {**out, "wall_s": time.perf_counter() - started}


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user value of 'recall@k' or 'ndcg@k' from 0-based target ranks (-1: not generated)."""
    name, k = metric.split("@")
    within = (ranks >= 0) & (ranks < int(k))
    if name == "recall":
        return within.astype(np.float64)
    if name == "ndcg":
        return np.where(within, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def paired_bootstrap(diff: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """diff [seeds, users] of paired per-user differences -> mean and percentile interval of the
    mean, resampling users (each user's difference averaged over the seeds)."""
    per_user = np.asarray(diff, dtype=np.float64).reshape(-1, diff.shape[-1]).mean(0)
    n = per_user.size
    out = {"mean": float(per_user.mean()) if n else float("nan"), "low": float("nan"), "high": float("nan"),
           "resamples": int(resamples), "level": level}
    if n == 0 or resamples < 1:
        return out
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = per_user[rng.integers(0, n, size=(stop - start, n))].mean(1)
    tail = (1.0 - level) / 2 * 100
    out["low"], out["high"] = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    return out


def _run_one(data, s: IdentifierSet, config: RecConfig, run_dir: str, depends: dict, eval_args: dict,
             log: Callable[[str], None]) -> dict:
    fp = fingerprint(depends)
    training = {k: v for k, v in depends.items() if k != "eval"}
    tag = f"[{s.label} seed {config.seed}]"
    done, reason = finished_step(os.path.join(run_dir, RESULT), RUN_KIND, fp, run_dir, required=(RANKS,))
    if reason is None:
        log(f"{tag} up to date ({fp}), skipped")
        return done
    if reason != "not run yet":
        log(f"{tag} rerunning: {reason}")
    if start_step(run_dir, fingerprint(training), STARTED, depends=training):
        log(f"{tag} {run_dir} held a run with other training settings: started afresh")
    rec_dir = os.path.join(run_dir, "rec")
    t0 = time.time()
    if os.path.isfile(os.path.join(rec_dir, MANIFEST)):  # trained with these settings: only the evaluation changed
        log(f"{tag} trained run kept, evaluating again -> {rec_dir}")
        summary = read_json(os.path.join(rec_dir, RecRun.SUMMARY), "train-rec summary")
    else:
        resume = os.path.isfile(os.path.join(rec_dir, RecRun.CHECKPOINT))
        log(f"{tag} {'resuming' if resume else 'training'} -> {rec_dir}")
        summary = train_rec(config, data, s.for_seed(config.seed).path, rec_dir, resume=resume)
    train_s = time.time() - t0
    ev = user_ranks(rec_dir, "test", data=data, device=config.device, batch_size=config.eval_batch_size, **eval_args)
    with atomic_path(os.path.join(run_dir, RANKS), suffix=".npz") as tmp:
        np.savez(tmp, **{k: v for k, v in ev.items() if k.startswith("ranks") or k == "targets"})
    excluded = {"metrics_exclude_history": ev["metrics_exclude_history"]} if "metrics_exclude_history" in ev else {}
    result = {"label": s.label, "seed": config.seed, "metrics": ev["metrics"], **excluded,
              "users": int(len(ev["ranks"])), "best_epoch": summary.get("best_epoch"),
              "epochs_trained": summary.get("epochs_trained"), "train_s_this_call": round(train_s, 3),
              "rec_wall_s": summary.get("wall_s"), "eval_wall_s": round(ev["wall_s"], 3)}
    inputs = {"fingerprint": fp, "codes": depends["codes_sha"], "dataset": depends["data_sha"]}
    result = write_manifest(run_dir, RUN_KIND, [RANKS], inputs, name=RESULT, **result)  # last: the run is done
    log(f"{tag} test " + "  ".join(f"{m}={ev['metrics'][m]:.4f}" for m in METRICS)
        + ("  | history excluded " + "  ".join(f"{m}={excluded['metrics_exclude_history'][m]:.4f}" for m in METRICS)
           if excluded else ""))
    return result


def compare(
    data,
    sets,
    out_dir: str,
    config: RecConfig,
    *,
    seeds: int = 3,
    num_beams: int = 20,
    test_users: int = 0,
    sample_seed: int = 0,
    bootstrap: int = 2000,
    exclude_history: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train `config` on every identifier set for `seeds` seeds (config.seed + i), evaluate all runs
    on the same test users and write compare.json / compare.md / compare.png into out_dir.

    Args:
        data: dataset path (any letter.data format) or a letter.data.Dataset.
        sets: 'LABEL=PATH' strings, (label, path) pairs or {label: path}; the first is the
            reference of the differences.
        config: the recommender settings shared by every run (its seed is the first seed).
        num_beams: beam width of the test evaluation (>= 10).
        test_users: evaluate a fixed sample of this many test users (0 = all), drawn with sample_seed.
        bootstrap: resamples of the paired bootstrap.
        exclude_history: also evaluate every run with each user's history items excluded from the
            search, reported as "metrics_exclude_history" next to "metrics" (history kept).
    Returns the compare.json dict. Bad sets raise LetterError before any training.
    """
    config.validate()
    recommender_class(config.model).check_settings(config)  # e.g. LC-Rec's base model, before any folder
    resolve_device(config.device)  # a device this torch lacks, too
    if seeds < 1:
        raise SettingError("seeds", f"must be >= 1, got {seeds}")
    if num_beams < 10:
        raise SettingError("num_beams", f"must be >= 10 to compute the @10 metrics, got {num_beams}")
    if test_users < 0:
        raise SettingError("test_users", f"must be >= 0, got {test_users}")
    if bootstrap < 1:
        raise SettingError("bootstrap", f"must be >= 1, got {bootstrap}")
    dataset = data if isinstance(data, Dataset) else load_dataset(os.fspath(data))
    data_arg = data if isinstance(data, Dataset) else os.path.abspath(os.fspath(data))
    seed_list = [config.seed + i for i in range(seeds)]
    try:  # run i uses seed + i: the last one must be a valid seed too (found before any run trains)
        dataclasses.replace(config, seed=seed_list[-1]).validate()
    except SettingError as e:
        raise SettingError("seeds", f": {seeds} runs use seeds {config.seed}..{seed_list[-1]}, but seed {e.problem}",
                           "seed") from None
    check_training_samples(dataset, data_arg if isinstance(data_arg, str) else dataset.source)  # before any folder
    id_sets = load_sets(dataset, sets, seed_list)  # every set checked before any training
    categories = item_categories(dataset)
    data_sha = dataset.fingerprint()
    eval_args = {"max_users": test_users, "sample_seed": sample_seed, "num_beams": num_beams,
                 **({"exclude_history": True} if exclude_history else {})}  # old runs' fingerprints unchanged
    prepare_run_folder(out_dir, "compare", resume=True)  # never into a folder holding another kind of run
    mark_started(out_dir, "compare")

    runs: dict[str, list[dict]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    targets_ref = None
    for s in id_sets:
        runs[s.label] = []
        ranks = []
        for seed in seed_list:
            cfg = dataclasses.replace(config, seed=seed)
            depends = {"rec_config": {k: v for k, v in cfg.to_dict().items() if k != "device"},
                       "codes_sha": s.for_seed(seed).sha, "data_sha": data_sha, "eval": eval_args}
            run_dir = os.path.join(out_dir, "runs", s.label, f"seed-{seed}")
            runs[s.label].append(_run_one(data_arg, s, cfg, run_dir, depends, eval_args, log))
            with np.load(os.path.join(run_dir, RANKS)) as saved:
                ranks.append(saved["ranks"])
                if targets_ref is None:
                    targets_ref = saved["targets"]
                elif not np.array_equal(targets_ref, saved["targets"]):
                    raise LetterError(f"{run_dir}: evaluated on other test users than the first run")
        r = np.stack(ranks)  # [seeds, users]
        per_user[s.label] = {m: per_user_metric(r, m) for m in METRICS}

    first = id_sets[0].label
    report = {
        "dataset": {"name": dataset.name, "source": data_arg if isinstance(data_arg, str) else dataset.source,
                    "items": dataset.num_items, "users": dataset.num_users, "sha256": data_sha},
        "rec_config": config.to_dict(),
        "seeds": seed_list,
        "evaluation": {"split": "test", "users": int(len(targets_ref)), "beams": num_beams,
                       "test_users": test_users, "sample_seed": sample_seed, "exclude_history": exclude_history},
        "bootstrap": {"resamples": bootstrap, "level": 0.95, "reference": first,
                      "method": "paired over users and seeds; per-user difference averaged over seeds, "
                                "users resampled (percentile interval)"},
        "sets": [],
    }
    for i, s in enumerate(id_sets):
        entry = {
            "label": s.label,
            "path": s.path,
            "codes_sha256": [s.for_seed(seed).sha for seed in seed_list],  # what each seed's run trained on
            "diagnostics": set_diagnostics(s, categories),
            **{key: _seed_summary([run[key] for run in runs[s.label]])
               for key in ("metrics", "metrics_exclude_history") if key in runs[s.label][0]},
            "runs": [os.path.relpath(os.path.join(out_dir, "runs", s.label, f"seed-{seed}"), out_dir)
                     for seed in seed_list],
        }
        if i > 0:
            entry["difference_to_first"] = {
                m: paired_bootstrap(per_user[s.label][m] - per_user[first][m], bootstrap, seed=sample_seed)
                for m in METRICS
            }
        report["sets"].append(entry)
    with atomic_path(os.path.join(out_dir, "compare.png")) as tmp:
        plotted = plot_compare(report, tmp)
    if not plotted:
        os.remove(os.path.join(out_dir, "compare.png"))
    report["plot"] = "compare.png" if plotted else None
    with atomic_path(os.path.join(out_dir, "compare.md")) as tmp, open(tmp, "w") as f:
        f.write(compare_markdown(report))
    write_json(os.path.join(out_dir, "compare.json"), report)
    return report


def _seed_summary(per_run: list[dict]) -> dict:
    """Mean, std and per-seed values of each metric over a set's runs."""
    values = {m: [metrics[m] for metrics in per_run] for m in METRICS}
    return {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "per_seed": v}
            for m, v in values.items()}


def _fmt_diff(d: dict) -> str:
    mark = "*" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{mark}"


def compare_markdown(report: dict) -> str:
    ev, cfg = report["evaluation"], report["rec_config"]
    seeds = report["seeds"]
    has_cats = any("level1_purity" in s["diagnostics"] for s in report["sets"])
    lines = [
        f"# Identifier sets compared on {report['dataset']['name']}",
        "",
        f"{model_summary(cfg)} trained on each set with the same settings (up to {cfg['epochs']} epoch(s), "
        f"patience {cfg['patience']}), "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); test split, {ev['users']} users"
        f"{' (fixed sample)' if ev['test_users'] else ''}, constrained beam search with {ev['beams']} beams. "
        "Metrics: mean ± std over seeds.",
        "",
    ]
    head = ["set", "collision rate", "codes used per level"]
    if has_cats:
        head += ["L1 purity", "L1 NMI"]
    head += list(METRICS)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["sets"]:
        d = s["diagnostics"]
        sizes = d.get("codebook_sizes")
        used = " / ".join(f"{u:g}" + (f" of {sizes[l]}" if sizes and l < len(sizes) else "")
                          for l, u in enumerate(d["codes_used"]))
        row = [s["label"], f"{d['collision_rate']:.4f}", used]
        if has_cats:
            row += [f"{d['level1_purity']:.3f}" if "level1_purity" in d else "n/a",
                    f"{d['level1_nmi']:.3f}" if "level1_nmi" in d else "n/a"]
        row += [f"{s['metrics'][m]['mean']:.4f} ± {s['metrics'][m]['std']:.4f}" for m in METRICS]
        lines.append("| " + " | ".join(row) + " |")
    if has_cats:
        field = next(s["diagnostics"]["category_field"] for s in report["sets"] if "category_field" in s["diagnostics"])
        cats = next(s["diagnostics"]["categories"] for s in report["sets"] if "categories" in s["diagnostics"])
        lines += ["", f"L1 purity / NMI: level-1 codes vs the {cats} item categories of item.json's \"{field}\" "
                      "(purity: share of items in their code's majority category)."]
    if any("metrics_exclude_history" in s for s in report["sets"]):
        lines += ["", "## Both protocols", "",
                  "history kept (above, the authors' protocol) and history excluded (each user's earlier items "
                  "pruned from the search, as SASRec's mask_history); mean ± std over seeds.", "",
                  "| set | protocol | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
        for s in report["sets"]:
            for key, name in (("metrics", "history kept"), ("metrics_exclude_history", "history excluded")):
                cells = " | ".join(f"{s[key][m]['mean']:.4f} ± {s[key][m]['std']:.4f}" for m in METRICS)
                lines.append(f"| {s['label']} | {name} | {cells} |")
    others = [s for s in report["sets"] if "difference_to_first" in s]
    if others:
        b = report["bootstrap"]
        lines += ["", f"## Difference to {b['reference']}", "",
                  f"Mean per-user difference, paired by user and seed, with a {b['level']:.0%} bootstrap interval "
                  f"({b['resamples']} resamples of the test users); * = the interval excludes 0.", "",
                  "| set | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
        for s in others:
            cells = " | ".join(_fmt_diff(s["difference_to_first"][m]) for m in METRICS)
            lines.append(f"| {s['label']} | {cells} |")
    lines += ["", "## Runs", "", "| set | seed | " + " | ".join(METRICS) + " | run |",
              "|" + "---|" * (len(METRICS) + 3)]
    for s in report["sets"]:
        for i, seed in enumerate(seeds):
            vals = " | ".join(f"{s['metrics'][m]['per_seed'][i]:.4f}" for m in METRICS)
            lines.append(f"| {s['label']} | {seed} | {vals} | {s['runs'][i]} |")
    if report.get("plot"):
        lines += ["", f"![metrics]({report['plot']})"]
    return "\n".join(lines) + "\n"


def plot_compare(report: dict, path: str) -> bool:
    """Bars of each metric per set (± std over seeds) and of the differences to the first set
    (bootstrap interval); False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    sets = report["sets"]
    others = [s for s in sets if "difference_to_first" in s]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(12 if others else 6.5, 4), squeeze=False)
    width = 0.8 / len(sets)
    x = np.arange(len(METRICS))
    ax = axes[0][0]
    for i, s in enumerate(sets):
        ax.bar(x + i * width, [s["metrics"][m]["mean"] for m in METRICS], width,
               yerr=[s["metrics"][m]["std"] for m in METRICS], capsize=3, label=s["label"])
    ax.set_xticks(x + width * (len(sets) - 1) / 2)
    ax.set_xticklabels(METRICS)
    ax.set_title("test metrics (mean ± std over seeds)")
    ax.legend()
    if others:
        ax = axes[0][1]
        w = 0.8 / len(others)
        for i, s in enumerate(others):
            d = [s["difference_to_first"][m] for m in METRICS]
            mean = np.array([v["mean"] for v in d])
            err = np.array([[v["mean"] - v["low"] for v in d], [v["high"] - v["mean"] for v in d]])
            ax.bar(x + i * w, mean, w, yerr=err, capsize=3, label=s["label"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x + w * (len(others) - 1) / 2)
        ax.set_xticklabels(METRICS)
        ax.set_title(f"difference to {report['bootstrap']['reference']} (95% bootstrap interval)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
