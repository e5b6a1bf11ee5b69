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
from letter.pipeline_report import write_report
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
        return write_report(self)

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

    def stage_seconds(self, stage: str) -> float | None:
        marker = self._read(stage, MARKER)
        return marker.get("seconds") if marker else None

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
    cfg = CFConfig.from_dict(p.config["cf"])
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
    result = evaluate(p.outputs["rec"]["run"], cfg["split"], num_beams=cfg["num_beams"],
                      batch_size=cfg["batch_size"], device=p.device, out=out, show_progress=True)
    return {"metrics": out, "result": result}


STAGE_FUNCTIONS = {"prepare": _prepare, "embed": _embed, "cf": _cf, "tokenizer": _tokenizer, "rec": _rec,
                   "evaluate": _evaluate}
