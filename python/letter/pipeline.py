"""`letter pipeline`: prepare -> embed -> cf -> tokenizer -> rec -> evaluate, then a report.

Each stage writes into RUN/<stage>/ and, when it finishes, its manifest RUN/<stage>/stage.json
(letter.runs.write_manifest, written last: kind "pipeline-stage"), with the size/mtime/sha256 of
each file it wrote (names relative to RUN, so a copied or moved run folder uses its own files), as
inputs the fingerprint of everything it read (its config settings, its upstream stages'
fingerprints and output contents, the synthetic generator's settings or the content of the data
source's files) and the upstream stages' output digests, and its results (paths relative to RUN).
A rerun skips a stage whose manifest has the fingerprint and whose files are all still there and
unchanged; otherwise it logs why and reruns it (and, through the fingerprints, what follows). A
stage interrupted midway resumes from its own checkpoint when its fingerprint is unchanged and
starts afresh otherwise. Inputs a stage would refuse are refused before any stage runs. A failing
stage stops the pipeline with a LetterError naming the stage; earlier stages' outputs stay intact.
"""
import dataclasses
import os
import time
from typing import Callable

from letter.devices import resolve_device
from letter.errors import LetterError, SettingError
from letter.pipeline_report import write_report
from letter.runs import (MANIFEST, RecRun, TokenizerRun, file_state, fingerprint, finished_step, folder_files,
                         mark_started, prepare_run_folder, read_json_if_valid, relative_to, remove_stale_temps,
                         resolve, start_step, write_json, write_manifest)

STAGES = ("prepare", "embed", "cf", "tokenizer", "rec", "evaluate")
# Upstream stages and the config settings each stage reads: whole sections, or "section.key" for
# one setting of a section (a stage reruns only when what it reads changed). prepare's data.synthetic
# is part of its source (_source_identity): a real data source does not read it.
DEPENDS = {
    "prepare": ((), ()),
    "embed": (("prepare",), ("embed",)),
    "cf": (("prepare",), ("cf",)),
    "tokenizer": (("embed", "cf"), ("tokenizer",)),
    "rec": (("tokenizer",), ("rec", "data.max_history")),
    "evaluate": (("rec",), ("evaluate",)),
}
TRAINER_SECTIONS = ("cf", "tokenizer", "rec")  # the config sections with their own device
MARKER = "stage.json"  # a stage's manifest
STAGE_KIND = "pipeline-stage"
STARTED = "stage.started.json"


# Keys of a stage's results that are paths: stage.json stores them relative to the run folder.
PATH_KEYS = ("dataset", "text_embeddings", "cf_embeddings", "metrics", "run", "report", "history")


def _is_recorded(rel: str) -> bool:
    """Files of a finished stage whose content later stages rely on (not its markers, checkpoints
    or temporary files)."""
    name = os.path.basename(rel)
    return not (name in (MARKER, STARTED) or name.startswith(".tmp-") or name == RecRun.CHECKPOINT
                or name.endswith(".ckpt.pt"))


@dataclasses.dataclass
class Pipeline:
    out: str
    config: dict
    source: dict  # {"synthetic": True} or {"data": absolute path}
    device: str = "auto"
    log: Callable[[str], None] = print
    fingerprints: dict = dataclasses.field(default_factory=dict)
    outputs: dict = dataclasses.field(default_factory=dict)
    digests: dict = dataclasses.field(default_factory=dict)  # stage -> hash of its recorded files
    source_files: dict = dataclasses.field(default_factory=dict)  # data file -> state (prepare's input)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.out, stage)

    def stage_settings(self, section: str) -> dict:
        """A trainer's settings: its config section, with the pipeline's device (when not auto) in
        place of the section's own."""
        values = dict(self.config[section])
        if self.device != "auto":
            values["device"] = self.device
        return values

    def fingerprint(self, stage: str) -> str:
        """Hash of what the stage reads: its config settings, each upstream stage's fingerprint and
        the content of its outputs, and (prepare) the data source: the synthetic generator's settings
        or the content of the data source's files."""
        ups, settings = DEPENDS[stage]
        payload = {
            "stage": stage,
            "upstream": [[self.fingerprints[u], self.digests[u]] for u in ups],
            "config": {name: self._setting(name) for name in settings},
            "source": self._source_identity() if stage == "prepare" else None,
        }
        return fingerprint(payload)

    def _setting(self, name: str):
        """A config section ("rec"), or one setting of it ("data.max_history")."""
        section, _, key = name.partition(".")
        return self.config[section][key] if key else self.config[section]

    def _source_identity(self) -> dict:
        if self.source.get("synthetic"):
            return {"synthetic": self.config["data"]["synthetic"]}
        from letter.data.readers import source_files

        previous = (self._read("prepare", MARKER) or {}).get("source_files", {})
        self.source_files = {}
        for path in source_files(self.source["data"]):
            self.source_files[path] = file_state(path, previous.get(path))
        # content, not names: the same files elsewhere are the same data, an edited file is not
        return {"files": sorted((os.path.basename(p), st["sha256"]) for p, st in self.source_files.items())}

    def _read(self, stage: str, name: str) -> dict | None:
        path = os.path.join(self.stage_dir(stage), name)
        data = read_json_if_valid(path)
        if data is None and os.path.isfile(path):
            self.log(f"[{stage}] {path}: corrupt or truncated, ignored")
        return data


    def run(self, from_stage: str | None = None) -> dict:
        if from_stage is not None and from_stage not in STAGES:
            raise SettingError("from_stage", f"must be one of {', '.join(STAGES)}, got {from_stage!r}")
        from letter.rec import RecConfig
        from letter.rec.recommender import recommender_class

        rec = RecConfig.from_dict(self.config["rec"])
        recommender_class(rec.model).check_settings(rec)  # LC-Rec's base model: not found only at the rec stage
        self._check_devices()
        prepare_run_folder(self.out, "pipeline", resume=True, what="out")
        self._check_inputs()
        mark_started(self.out, "pipeline")
        for path in remove_stale_temps(self.out):
            self.log(f"removed {path} (left by an interrupted write)")
        write_json(os.path.join(self.out, "config.json"), {"source": self.source, "config": self.config})
        forced = False
        for stage in STAGES:
            forced = forced or stage == from_stage
            fp = self.fingerprint(stage)
            self.fingerprints[stage] = fp
            done, reason = finished_step(os.path.join(self.stage_dir(stage), MARKER), STAGE_KIND, fp, self.out)
            if forced:
                reason = f"forced: the run starts at stage {from_stage}"
            if reason is None:
                self.log(f"[{stage}] up to date ({fp}), skipped")
                self.outputs[stage] = self._resolve(done["results"])
                self.digests[stage] = _digest(done["outputs"])
                continue
            if forced or os.path.isfile(os.path.join(self.stage_dir(stage), MARKER)):
                self.log(f"[{stage}] rerunning: {reason}")
            # changed or missing outputs: nothing in the folder can be trusted, start afresh
            self._run_stage(stage, fp, fresh=forced or (done is not None and done["inputs"].get("fingerprint") == fp))
        return write_report(self)

    def _check_inputs(self) -> None:
        """Data and embed settings the stages would refuse, refused before any stage runs: no run
        folder is left by a new run, and a rerun does not stop at the stage that reads them after
        the ones before it ran again (every run, also on an existing run folder)."""
        from letter.cf.train import check_catalog
        from letter.data.split import check_training_samples
        from letter.embed import EmbedSettings, encoder_inputs

        dataset = self.source_dataset()
        if dataset.item_text is None:
            raise LetterError(f"{dataset.source}: no item text (<Name>.item.json); the embed stage needs it")
        check_catalog(dataset)
        check_training_samples(dataset, dataset.source)
        encoder_inputs(dataset, EmbedSettings.from_dict(self.config["embed"]), self.device)  # model, fields

    def _check_devices(self) -> None:
        """A device this torch lacks, the pipeline's or a trainer section's, is refused before any stage writes."""
        if self.device != "auto":  # it replaces the sections' own
            resolve_device(self.device)
            return
        for section in TRAINER_SECTIONS:
            try:
                resolve_device(self.config[section]["device"])
            except SettingError as e:
                raise LetterError(f"config: {section}.device {e.problem}") from None

    def _relative(self, outputs: dict) -> dict:
        return {k: relative_to(v, self.out) if k in PATH_KEYS and isinstance(v, str) else v
                for k, v in outputs.items()}

    def _resolve(self, outputs: dict) -> dict:
        return {k: resolve(v, self.out) if k in PATH_KEYS and isinstance(v, str) else v for k, v in outputs.items()}

    def _run_stage(self, stage: str, fp: str, fresh: bool) -> None:
        directory = self.stage_dir(stage)
        start_step(directory, fp, STARTED, fresh)  # outputs of other settings or a forced rerun: from scratch
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
        files = [relative_to(os.path.join(directory, rel), self.out)
                 for rel in folder_files(directory, skip=lambda rel: not _is_recorded(rel))]
        inputs = {"fingerprint": fp, **{up: self.digests[up] for up in DEPENDS[stage][0]},
                  **{os.path.basename(path): st["sha256"] for path, st in self.source_files.items()
                     if stage == "prepare"}}
        extra = {"stage": stage, "results": self._relative(outputs), "seconds": seconds}
        if stage == "prepare" and self.source_files:
            extra["source_files"] = self.source_files  # their states: unchanged files are not hashed again
        # written last: the stage's completion manifest (output names relative to the run folder)
        manifest = write_manifest(self.out, STAGE_KIND, files, inputs, name=os.path.join(stage, MARKER), **extra)
        self.digests[stage] = _digest(manifest["outputs"])
        self.log(f"[{stage}] done in {seconds:.1f}s")

    def stage_seconds(self, stage: str) -> float | None:
        marker = self._read(stage, MARKER)
        return marker.get("seconds") if marker else None

    def source_dataset(self):
        """The dataset the prepare stage writes: the synthetic one, or the data source's."""
        from letter.data import load_dataset, make_synthetic

        if self.source.get("synthetic"):
            return make_synthetic(**self.config["data"]["synthetic"], name="Synth")
        _refuse_cold_split(self.source["data"])  # data that became a split since the run folder was made
        return load_dataset(self.source["data"])

    # Shared inputs of several stages -------------------------------------------------------
    def dataset(self):
        from letter.data import load_dataset

        return load_dataset(self.outputs["prepare"]["dataset"])


def _digest(files: dict) -> str:
    """One hash of a stage's recorded files (names relative to the run folder, and contents)."""
    return fingerprint(sorted((rel, st.get("sha256")) for rel, st in files.items()))


def _refuse_cold_split(data: str) -> None:
    from letter.data.cold import read_cold_split

    if read_cold_split(data) is not None:  # its copy would lose the record, and cold items would train
        raise LetterError(f"{data} is a cold split: run its stages one by one (README, cold start)")


def _prepare(p: Pipeline, directory: str) -> dict:
    from letter.data import write_letter
    from letter.data.stats import dataset_stats

    ds = p.source_dataset()
    write_letter(ds, directory)
    stats = dataset_stats(ds)
    write_json(os.path.join(directory, "stats.json"), stats)
    return {"dataset": directory, "name": ds.name, "stats": stats}


def _embed(p: Pipeline, directory: str) -> dict:
    from letter.embed import EmbedSettings, embed_dataset

    ds = p.dataset()
    # overwrite: the stage folder is the pipeline's; a file in it is left by an interrupted embedding
    path, _ = embed_dataset(ds, directory, EmbedSettings.from_dict(p.config["embed"]), device=p.device, overwrite=True)
    return {"text_embeddings": path}


def _cf(p: Pipeline, directory: str) -> dict:
    from letter.cf import CFConfig, output_paths, train_cf

    ds = p.dataset()
    cfg = CFConfig.from_dict(p.stage_settings("cf"))
    paths = output_paths(directory, ds.name, cfg.dim, cfg.model)
    train_cf(ds, directory, cfg, resume=os.path.exists(paths["checkpoint"]), log=p.log)
    return {"cf_embeddings": paths["embeddings"], "metrics": paths["metrics"]}


def _tokenizer(p: Pipeline, directory: str) -> dict:
    from letter.tokenizer import TokenizerConfig, prepare_tokenizer_inputs

    cfg = TokenizerConfig.from_dict(p.stage_settings("tokenizer"))
    inputs = prepare_tokenizer_inputs(p.outputs["prepare"]["dataset"], cfg, p.outputs["embed"]["text_embeddings"],
                                      p.outputs["cf"]["cf_embeddings"], log=p.log)
    # the stage folder is the pipeline's: a finished run in it (its stage.json lost) is refitted
    resume = any(os.path.exists(os.path.join(directory, n)) for n in (TokenizerRun.CHECKPOINT, MANIFEST))
    report = inputs.train(directory, resume=resume)
    write_json(os.path.join(directory, "pipeline_report.json"), report)
    return {"run": directory, "report": os.path.join(directory, TokenizerRun.REPORT)}


def _rec(p: Pipeline, directory: str) -> dict:
    from letter.rec import RecConfig, train_rec

    cfg = RecConfig.from_dict(dict(p.stage_settings("rec"), max_history=p.config["data"]["max_history"]))
    summary = train_rec(cfg, p.outputs["prepare"]["dataset"], p.outputs["tokenizer"]["run"], directory,
                        resume=os.path.exists(os.path.join(directory, RecRun.CHECKPOINT)))
    return {"run": directory, "history": os.path.join(directory, RecRun.HISTORY),
            "best_valid": summary.get("best_valid")}


def _evaluate(p: Pipeline, directory: str) -> dict:
    from letter.rec import EvaluateSettings, evaluate

    out = os.path.join(directory, "metrics.json")
    # the dataset of this run folder (not the path the rec run recorded, which a copy shares), and the
    # index the tokenizer stage built: versions `letter add-items` writes later into the rec folder are
    # no input of this stage, so they must not change what a rerun measures (`letter evaluate` does)
    result = evaluate(p.outputs["rec"]["run"], settings=EvaluateSettings.from_dict(p.config["evaluate"]),
                      data=p.outputs["prepare"]["dataset"], device=p.device, out=out, show_progress=True,
                      index_version=0)
    return {"metrics": out, "result": result}


STAGE_FUNCTIONS = {"prepare": _prepare, "embed": _embed, "cf": _cf, "tokenizer": _tokenizer, "rec": _rec,
                   "evaluate": _evaluate}
