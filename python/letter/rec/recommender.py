"""What the recommender trainer (rec/train.py) and evaluation (rec/evaluation.py) need from a model.

One `Recommender` adapter per model (TIGER in recommender_tiger.py, LC-Rec in recommender_lcrec.py)
holds the model-specific parts; the training loop, the checkpoint/resume logic, the beam search
driver, the metrics and the reports are shared.

Before anything is written: cls.check_settings(config) refuses settings that cannot work (LC-Rec: no
usable base model folder).
Training (the adapter of a new run, `cls.build(config, rec, device)`, called with the RNG seeded):
  model                       the nn.Module (Tiger / LCRec)
  step_module                 called per batch: step_module(*batch(rows)) -> loss summed over the
                              batch's target tokens (L per sample)
  ddp                         True: step_module is wrapped in DistributedDataParallel under
                              torchrun; False: gradients are averaged with ctx.average_gradients
  trainable_parameters()      what AdamW updates and gradient clipping sees
  autocast(device)            whether the model trains under bf16 autocast on device (when the precision setting picks bf16)
  prepare_training(rng)       -> (training samples, their input lengths for bucket_by_length);
                              may register generators in the run's RandomStreams
  start_epoch(epoch)          per-epoch random choices that must not depend on the world size
  batch(rows)                 the inputs of step_module for training sample indices `rows`
  mean_loss(inputs, targets, batch_size)  validation loss per target token (eval mode)
  state_dict() / load_state_dict(state)   the trained weights that checkpoint.pt holds
  save_best(out_dir, epoch, metrics)      write the best model into the run folder
Loading (evaluation): cls.best_model_path(run_dir), cls.load_best(run_dir, config, device) -> model
Decoding (a bare model wrapped by `as_recommender`):
  eval_inputs(rec, part, max_users, seed) / encode(rec, histories)   model inputs of users
  input_lengths(inputs)       for grouping users of similar length
  prefix_index(rec, device)   the identifier trie over this model's vocabulary
  start_decoding(inputs, beams, device), decode_step(last, state), reorder_state(state, parent)
"""
from __future__ import annotations

import importlib

from letter.errors import LetterError

MODELS = {
    "tiger": ("letter.rec.recommender_tiger", "TigerRecommender"),
    "lcrec": ("letter.rec.recommender_lcrec", "LCRecRecommender"),
}


class Recommender:
    """Base of the adapters (see the module docstring for the interface)."""

    name = ""
    ddp = True

    def __init__(self, model, rec=None):
        self.model = model
        self.rec = rec

    @classmethod
    def check_settings(cls, config) -> None:
        """LetterError for RecConfig settings that cannot work here (cheap: checked by compare and
        the pipeline before they make any folder)."""

    @property
    def step_module(self):
        return self.model

    def trainable_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self, device) -> bool:
        return False

    def start_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def decode_step(self, last_tokens, state):
        return self.model.decode_step(last_tokens, state)

    def reorder_state(self, state, flat_parent):
        return self.model.reorder_state(state, flat_parent)


def recommender_class(name: str) -> type[Recommender]:
    """The adapter class of a RecConfig.model value."""
    if name not in MODELS:
        raise LetterError(f"unknown recommender {name!r}; known: {', '.join(MODELS)}")
    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)


def as_recommender(model, *, rec=None, index=None) -> Recommender:
    """The adapter of a bare model (Tiger or LCRec) for decoding; an adapter is returned as is.
    LC-Rec needs the items' codes: from `rec` (RecData) or else from the PrefixIndex `index`."""
    if isinstance(model, Recommender):
        return model
    for name in MODELS:
        cls = recommender_class(name)
        if cls.wraps(model):
            return cls.for_decoding(model, rec=rec, index=index)
    raise LetterError(f"not a recommender model: {type(model).__name__}")
