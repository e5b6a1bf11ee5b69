"""Each stage's cost from 10k to 1M items (issue 23): `python -m letter.bench scale`.

For every catalog size (`--scale-items`, users = items) the stages run one after the other, each
in its own process (so its peak resident memory, VmHWM, is its own), on the files the earlier
stages wrote under `--scale-dir`:

  generate        letter.data.catalog.write_catalog (streamed JSON)            per 1k users
  load            load_dataset (the JSON readers + id mapping)                 per 1k users
  embed           hash encoder streamed into a memory-mapped .npy              per 1k items
  tokenizer       train_tokenizer, `--scale-tokenizer-epochs` epochs (the        per 1k items per epoch
                  budget) on the memory-mapped matrix, CPU-preset MLP, k-means
                  init, collision evaluation, Sinkhorn rounds, report
  tokenize        Tokenizer.raw_codes (streamed) + resolve with `unique`       per 1k items
  sample_codes    not in the default list: a stand-in for tokenizer + tokenize   per 1k items
                  where they are not run (the downstream stages' costs do not
                  depend on how the codes were learned): residual k-means (the
                  CPU preset's code sizes, PCA to 32 dims as the LETTER latent)
                  fitted on 20,000 sampled items, every
                  item encoded, `unique`; writes codes.npy as tokenize does
  prefix_index    PrefixIndex.from_codes                                       per 1k items
  tiger_train     TIGER (CPU preset) training steps, `--scale-steps` (budget)  per 1k samples
                  (the samples' preparation is timed apart: prepare_s)
  sasrec_ce       SASRec steps, full softmax over all items (fused op)         per 1k targets
  sasrec_sampled  SASRec steps, sampled softmax (`--scale-negatives` negatives) per 1k targets
  inference       the same `--scale-users` test users: TIGER constrained beam  per user
                  search (20 beams, history items excluded as the pipeline does, untrained
                  weights: the cost does not depend on them) and
                  SASRec full ranking over the catalog (top 10 of all items)

Times are the measured part's CPU time (one thread; robust to other load on a shared machine)
and wall time; the growth exponent is the least-squares slope of log(CPU s per unit) against
log(items). Peak RSS covers the whole stage process (its inputs included). With --out the JSON is
rewritten after every stage and a log-log plot goes beside it (same name, .png);
`python -m letter.bench.scale plot RESULT.json OUT.png` and `... table RESULT.json` (the
docs/BENCHMARKS.md table) redo them from a result file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from letter.runs import atomic_path
from letter.utils import pyplot
from letter_ext.bench.common import cpu_model, peak_rss_bytes

NAME = "scale"
STAGES = ("generate", "load", "embed", "tokenizer", "tokenize", "sample_codes", "prefix_index", "tiger_train",
          "sasrec_ce", "sasrec_sampled", "inference")
SAMPLE_CODES_ROWS = 20_000  # sample_codes: the items residual k-means is fitted on
DATA_NAME = "Catalog"


def add_arguments(p) -> None:
    from . import count

    g = p.add_argument_group(NAME)
    g.add_argument("--scale-items", default="10000,100000,1000000", help="catalog sizes, comma-separated")
    g.add_argument("--scale-dir", default=os.path.expanduser("~/letter-runs/scale-bench"),
                   help="work folder (one sub-folder per size; several GB at 1M items)")
    g.add_argument("--scale-stages", default=",".join(s for s in STAGES if s != "sample_codes"),
                   help="stages to run, comma-separated, in this order")
    g.add_argument("--scale-dim", type=count(), default=384, help="hash encoder dimension")
    g.add_argument("--scale-tokenizer-epochs", type=count(), default=1, help="tokenizer epochs (the stage's budget)")
    g.add_argument("--scale-kmeans-iters", type=count(), default=10, help="Lloyd steps of the codebook init")
    g.add_argument("--scale-steps", type=count(), default=5, help="training steps timed per model (the budget)")
    g.add_argument("--scale-negatives", type=count(), default=1024, help="sasrec_sampled: negatives per step")
    g.add_argument("--scale-users", type=count(), default=200, help="inference: test users")
    g.add_argument("--scale-keep", default=None, help="an earlier result JSON (same settings) whose rows this run "
                                                      "keeps unless it measures them again (runs split by size or stage)")


def _settings(args) -> dict:
    return {"dim": args.scale_dim, "tokenizer_epochs": args.scale_tokenizer_epochs,
            "kmeans_iters": args.scale_kmeans_iters, "steps": args.scale_steps, "negatives": args.scale_negatives,
            "users": args.scale_users}


def run(args) -> dict:
    sizes = [int(s) for s in args.scale_items.split(",")]
    stages = [s for s in args.scale_stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    result = {"cpu_model": cpu_model(), "settings": _settings(args), "sizes": sizes, "stages": {}}
    if args.scale_keep:
        result = _kept(result, args.scale_keep)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for items in sizes:
        work = os.path.join(args.scale_dir, str(items))
        os.makedirs(work, exist_ok=True)
        for stage in stages:
            print(f"-- {stage} at {items} items", flush=True)
            proc = subprocess.run([sys.executable, "-m", "letter.bench.scale", stage, work, str(items),
                                   json.dumps(result["settings"])], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                record = {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
            else:
                record = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"   {record}", flush=True)
            result["stages"].setdefault(stage, {})[str(items)] = record
            if args.out:  # after every stage: a long run's finished stages survive a later failure
                from letter.runs import write_json

                write_json(args.out, {"scale": fit_growth(result)})
    result = fit_growth(result)
    if args.out:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    return result


def _kept(result: dict, path: str) -> dict:
    """`result` started from the rows of the earlier result at `path` (its sizes added)."""
    with open(path) as f:
        earlier = json.load(f)
    earlier = earlier.get("scale", earlier)
    if earlier["settings"] != result["settings"] or earlier["cpu_model"] != result["cpu_model"]:
        raise ValueError(f"{path}: measured with other settings or on another CPU ({earlier['settings']}, "
                         f"{earlier['cpu_model']}); its rows cannot be merged with this run's")
    sizes = sorted(set(earlier["sizes"]) | set(result["sizes"]))
    return {**result, "sizes": sizes, "stages": {stage: dict(rows) for stage, rows in earlier["stages"].items()}}


def fit_growth(result: dict) -> dict:
    """Adds per stage (and per inference arm) the least-squares slope of log(cpu s per unit)
    against log(items) over the sizes measured."""
    growth = {}
    for stage, by_size in result["stages"].items():
        for key in ("per_unit_cpu_s", "tiger_per_user_cpu_s", "sasrec_per_user_cpu_s"):
            points = [(int(n), r[key]) for n, r in by_size.items() if key in r and r[key] > 0]
            if len(points) >= 2:
                x = np.log([n for n, _ in points])
                y = np.log([v for _, v in points])
                name = stage if key == "per_unit_cpu_s" else f"{stage}:{key.split('_per_user')[0]}"
                growth[name] = round(float(np.polyfit(x, y, 1)[0]), 3)
    return {**result, "growth_exponent": growth, "sasrec_loss": sasrec_loss_costs(result)}


def sasrec_loss_costs(result: dict) -> dict:
    """Per size, the full softmax's CPU cost per target over the sampled softmax's, beside the
    catalog size from which train-cf and the pipeline log that the sampled loss is the faster one."""
    from letter.cf.train import SAMPLED_ADVISED_FROM_ITEMS

    full, sampled = result["stages"].get("sasrec_ce", {}), result["stages"].get("sasrec_sampled", {})
    ratios = {n: round(full[n]["per_unit_cpu_s"] / sampled[n]["per_unit_cpu_s"], 2) for n in full
              if n in sampled and "error" not in full[n] and "error" not in sampled[n]}
    return {"ce_over_sampled_cpu": ratios, "sampled_advised_from_items": SAMPLED_ADVISED_FROM_ITEMS}


def plot(result: dict, path: str) -> bool:
    """Log-log plot of each stage's CPU seconds per unit of work (and the per-user inference cost of
    TIGER and SASRec) against catalog size; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for stage, by_size in result["stages"].items():
        for key, label, ax in (("per_unit_cpu_s", stage, axes[0]), ("tiger_per_user_cpu_s", "TIGER beam search", axes[1]),
                               ("sasrec_per_user_cpu_s", "SASRec full ranking", axes[1])):
            points = sorted((int(n), r[key]) for n, r in by_size.items() if key in r)
            if points:
                slope = result["growth_exponent"].get(stage if key == "per_unit_cpu_s" else
                                                      f"{stage}:{key.split('_per_user')[0]}")
                ax.plot(*zip(*points), marker="o", label=label + (f" (slope {slope})" if slope is not None else ""))
    axes[0].set_title("CPU seconds per unit of work")
    axes[1].set_title("inference: CPU seconds per user")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalog size (items; users = items)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"letter.bench scale on {result['cpu_model']} (1 thread)")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix: savefig's format follows it
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def markdown_table(result: dict) -> str:
    """The docs/BENCHMARKS.md table: per stage and size, CPU s per unit (wall s) and peak RSS."""
    sizes = result["sizes"]
    head = "| stage | unit | " + " | ".join(f"{n:,} items: CPU s/unit (wall), peak RSS" for n in sizes) + " | exponent |"
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    for stage, by_size in result["stages"].items():
        arms = (("tiger_per_user", "TIGER beam search"), ("sasrec_per_user", "SASRec full ranking")) \
            if stage == "inference" else ((None, stage),)
        for arm, label in arms:
            cells, unit = [], ""
            for n in sizes:
                r = by_size.get(str(n))
                if r is None:
                    cells.append("not run")
                elif "error" in r:
                    cells.append(f"failed: {r['error'][:60]}")
                else:
                    unit = r["unit"]
                    cpu = r[f"{arm}_cpu_s"] if arm else r["per_unit_cpu_s"]
                    wall = r[f"{arm.split('_per_user')[0]}_wall_s"] / r["units"] if arm else r["per_unit_wall_s"]
                    cells.append(f"{cpu:.4g} ({wall:.4g}), {r['peak_rss_mib'] / 1024:.2f} GiB")
            key = f"{stage}:{arm.split('_per_user')[0]}" if arm else stage
            lines.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {result['growth_exponent'].get(key, '')} |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    lines = [f"{'stage':16s} " + " ".join(f"{n:>22d}" for n in result["sizes"]) + "  exponent"]
    for stage, by_size in result["stages"].items():
        cells = []
        for n in result["sizes"]:
            r = by_size.get(str(n), {})
            cells.append(f"{'error' if 'error' in r else '-' if not r else _cell(r):>22s}")
        lines.append(f"{stage:16s} " + " ".join(cells) + f"  {result['growth_exponent'].get(stage, '')}")
    return "\n".join(lines)


def _cell(r: dict) -> str:
    if "tiger_per_user_cpu_s" in r:
        return f"T{r['tiger_per_user_cpu_s'] * 1e3:.0f}/S{r['sasrec_per_user_cpu_s'] * 1e3:.0f}ms {r['peak_rss_mib']:.0f}M"
    return f"{r['per_unit_cpu_s']:.3g}s {r['peak_rss_mib']:.0f}M"


# ---------------------------------------------------------------- stages (each in its own process)


class Timer:
    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def _record(timer: Timer, units: float, unit: str, **extra) -> dict:
    return {"unit": unit, "units": units, "cpu_s": round(timer.cpu, 3), "wall_s": round(timer.wall, 3),
            "per_unit_cpu_s": timer.cpu / units, "per_unit_wall_s": timer.wall / units, **extra}


def _dataset(work: str):
    from letter.data import load_dataset

    return load_dataset(os.path.join(work, "data"))


def _embeddings(work: str, settings: dict) -> np.ndarray:
    return np.load(os.path.join(work, "emb", f"{DATA_NAME}.emb-hash{settings['dim']}.npy"), mmap_mode="r")


def _tokenizer_config(settings: dict, **changes):
    from letter.config import CPU_PRESET
    from letter.tokenizer import TokenizerConfig

    values = {**CPU_PRESET["tokenizer"], "epochs": settings["tokenizer_epochs"], "batch_size": 1024,
              "kmeans_iters": settings["kmeans_iters"], "alpha": 0.0, "device": "cpu", **changes}
    return TokenizerConfig.from_dict(values)


def stage_generate(work: str, items: int, settings: dict) -> dict:
    from letter.data.catalog import write_catalog

    with Timer() as t:
        stats = write_catalog(os.path.join(work, "data"), items, seed=0, name=DATA_NAME)
    return _record(t, stats["users"] / 1000, "1k users", interactions=stats["interactions"])


def stage_load(work: str, items: int, settings: dict) -> dict:
    with Timer() as t:
        ds = _dataset(work)
    return _record(t, ds.num_users / 1000, "1k users")


def stage_embed(work: str, items: int, settings: dict) -> dict:
    from letter.embed import embed_dataset

    ds = _dataset(work)
    with Timer() as t:
        # overwrite: the benchmark's own work folder, re-embedded on every run of the stage
        embed_dataset(ds, os.path.join(work, "emb"), model="hash", mode="hash", dim=settings["dim"], overwrite=True)
    return _record(t, items / 1000, "1k items")


def stage_tokenizer(work: str, items: int, settings: dict) -> dict:
    from letter.tokenizer.train import train_tokenizer

    text = _embeddings(work, settings)
    with Timer() as t:
        report = train_tokenizer(_tokenizer_config(settings), text, None, os.path.join(work, "tokenizer"),
                                 name=DATA_NAME)
    epochs = settings["tokenizer_epochs"]
    return _record(t, items / 1000 * epochs, "1k items x epochs", epochs=epochs,
                   collision_rate_after=report["collision_rate_after"])


def stage_tokenize(work: str, items: int, settings: dict) -> dict:
    import dataclasses

    from letter.tokenizer.inference import load_tokenizer
    from letter.runs import save_npy

    tok = load_tokenizer(os.path.join(work, "tokenizer"))
    tok.config = dataclasses.replace(tok.config, unique=True)
    text = _embeddings(work, settings)
    with Timer() as t:
        raw, z = tok.raw_codes(text)
        codes, info = tok.resolve(raw, z)
    save_npy(os.path.join(work, "codes.npy"), codes)
    return _record(t, items / 1000, "1k items", collision_before=info["collision_before"],
                   collision_after=info["collision_after"], unique_moves=info.get("unique_moves"))


def stage_sample_codes(work: str, items: int, settings: dict) -> dict:
    from letter.config import CPU_PRESET
    from letter.runs import save_npy
    from letter.tokenizer import TokenizerConfig
    from letter.tokenizer.inference import Tokenizer
    from letter.tokenizer.rqkmeans import fit_rqkmeans

    text = _embeddings(work, settings)
    rows = np.sort(np.random.default_rng(0).choice(items, size=min(items, SAMPLE_CODES_ROWS), replace=False))
    sizes = CPU_PRESET["tokenizer"].get("codebook_sizes", TokenizerConfig().codebook_sizes)
    # PCA to the LETTER latent's width: without it z is the 384-dim input in float64, which the
    # collision rules hold whole several times (over 12 GiB at 1M items)
    latent = TokenizerConfig().e_dim
    config = TokenizerConfig(method="rqkmeans", codebook_sizes=sizes, pca_dim=latent, unique=True, device="cpu")
    with Timer() as t:
        model = fit_rqkmeans(np.asarray(text[rows]), sizes, iters=settings["kmeans_iters"], standardize=True,
                             pca_dim=latent)
        tok = Tokenizer(model, config, DATA_NAME)
        raw, z = tok.raw_codes(text)
        codes, info = tok.resolve(raw, z)
    save_npy(os.path.join(work, "codes.npy"), codes)
    return _record(t, items / 1000, "1k items", fitted_on=len(rows), collision_before=info["collision_before"],
                   collision_after=info["collision_after"], unique_moves=info.get("unique_moves"))


def _codes(work: str) -> np.ndarray:
    return np.load(os.path.join(work, "codes.npy"))


def stage_prefix_index(work: str, items: int, settings: dict) -> dict:
    import torch

    from letter.decoding import PrefixIndex

    codes = torch.from_numpy(_codes(work))
    sizes = (codes.max(0).values + 1).tolist()
    with Timer() as t:
        index = PrefixIndex.from_codes(codes, sizes)
    return _record(t, items / 1000, "1k items", leaves=index.num_leaves)


def _tiger(work: str, device):
    from letter.config import CPU_PRESET
    from letter.rec.config import RecConfig
    from letter.rec.data import load_rec_data
    from letter.rec.recommender import recommender_class

    config = RecConfig.from_dict(CPU_PRESET["rec"])
    rec = load_rec_data(_dataset(work), _codes(work), config.max_history)
    return config, rec, recommender_class("tiger").build(config, rec, device)


def stage_tiger_train(work: str, items: int, settings: dict) -> dict:
    import torch

    from letter.training import RandomStreams

    device = torch.device("cpu")
    torch.manual_seed(0)
    with Timer() as prepare:
        config, rec, rm = _tiger(work, device)
        n_train, _ = rm.prepare_training(RandomStreams(device))
    optimizer = torch.optim.AdamW(rm.model.parameters(), lr=config.lr)
    order = torch.randperm(n_train, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    batches = order[: settings["steps"] * config.batch_size].split(config.batch_size)
    rm.model.train()
    with Timer() as t:
        for rows in batches:
            loss = rm.step_module(*rm.batch(rows)) / (rows.numel() * rec.num_levels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    samples = sum(b.numel() for b in batches)
    held = sum(x.numel() * x.element_size() for x in (rm.train_enc, rm.train_labels))
    return _record(t, samples / 1000, "1k samples", steps=len(batches), train_samples=n_train,
                   samples_mib=round(held / 2**20, 1), samples_dtype=str(rm.train_enc.dtype),
                   prepare_cpu_s=round(prepare.cpu, 2), prepare_wall_s=round(prepare.wall, 2))


def _sasrec(items: int):
    from letter.cf.config import CFConfig
    from letter.cf.model import SASRec

    cfg = CFConfig()
    return cfg, SASRec(items, cfg.dim, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len)


def _stage_sasrec(work: str, items: int, settings: dict, loss: str) -> dict:
    import torch

    from letter.cf.sasrec import step_loss, training_windows
    from letter.data import drop_leading_padding, leave_one_out

    torch.manual_seed(0)
    ds = _dataset(work)
    cfg, model = _sasrec(ds.num_items)
    inputs, targets = training_windows(leave_one_out(ds, cfg.max_len), ds, cfg.max_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.randperm(len(inputs), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    batches = order[: settings["steps"] * cfg.batch_size].split(cfg.batch_size)
    counted = 0
    with Timer() as t:
        for rows in batches:
            seq, tgt = drop_leading_padding(inputs[rows], targets[rows])
            n = int((tgt > 0).sum())
            step_loss(model, seq, tgt, ds.num_items, loss, n, 1, settings["negatives"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counted += n
    return _record(t, counted / 1000, "1k targets", steps=len(batches), loss=loss)


def stage_sasrec_ce(work: str, items: int, settings: dict) -> dict:
    return _stage_sasrec(work, items, settings, "ce")


def stage_sasrec_sampled(work: str, items: int, settings: dict) -> dict:
    return _stage_sasrec(work, items, settings, "sampled")


def stage_inference(work: str, items: int, settings: dict) -> dict:
    import torch

    from letter.cf.sasrec import sasrec_scorer
    from letter.cf.train import ranking_metrics
    from letter.rec.evaluation import generate, prefix_index, target_hits
    from letter.training import distributed

    device = torch.device("cpu")
    torch.manual_seed(0)
    config, rec, rm = _tiger(work, device)
    samples = rec.split.test[: settings["users"]]  # the same users for both models
    enc = rec.encode([history for history, _ in samples])
    targets = torch.tensor([target for _, target in samples])
    index = prefix_index(rec, device)
    with Timer() as tiger:
        # the pipeline's protocol: the users' history items excluded inside the search
        leaves, _ = generate(rm.model, index, enc, 20, 256, device,
                             banned_items=[list(history) for history, _ in samples])
        target_hits(index, leaves, targets)
    cfg, sasrec = _sasrec(rec.dataset.num_items)
    with Timer() as sasrec_timer, distributed("cpu") as ctx, torch.no_grad():
        ranking_metrics(sasrec_scorer(sasrec.eval()), samples, [0] * len(samples), rec.dataset.num_items, ctx, cfg)
    return {"unit": "user", "units": len(samples), "tiger_cpu_s": round(tiger.cpu, 3),
            "tiger_wall_s": round(tiger.wall, 3), "sasrec_cpu_s": round(sasrec_timer.cpu, 3),
            "sasrec_wall_s": round(sasrec_timer.wall, 3), "tiger_per_user_cpu_s": tiger.cpu / len(samples),
            "sasrec_per_user_cpu_s": sasrec_timer.cpu / len(samples), "beams": 20}


def _main(argv: list[str]) -> None:
    if argv[0] == "plot":  # python -m letter.bench.scale plot RESULT.json OUT.png
        with open(argv[1]) as f:
            result = json.load(f)
        plot(result.get("scale", result), argv[2])
        return
    if argv[0] == "table":  # python -m letter.bench.scale table RESULT.json
        with open(argv[1]) as f:
            result = json.load(f)
        print(markdown_table(result.get("scale", result)))
        return
    import torch

    torch.set_num_threads(1)
    stage, work, items, settings = argv[0], argv[1], int(argv[2]), json.loads(argv[3])
    record = globals()[f"stage_{stage}"](work, items, settings)
    record["peak_rss_mib"] = round(peak_rss_bytes() / 2**20, 1)
    print(json.dumps(record))


if __name__ == "__main__":
    _main(sys.argv[1:])
