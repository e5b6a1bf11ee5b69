"""LC-Rec (rec/lcrec.py) behind the shared recommender trainer and evaluation (see recommender.py).

Inputs are item-id histories [N, max_history] (-1 padded); each batch becomes instruction prompts
(`LCRec.encode_examples`) whose instruction template is drawn per training sample once per epoch
from a CPU stream seeded by (seed, epoch), so resumed and multi-process runs pick the same
templates. Validation, evaluation and recommendation use template 0. Checkpoint: the adapter
weights (LoRA + new-token rows), not the base model; best model: `LCRec.save` into run/model/.
"""
from __future__ import annotations

import os

import torch

from letter.decoding import PrefixIndex
from letter.errors import LetterError
from letter.runs import RecRun

from .lcrec import LCRec, check_base_folder
from .recommender import Recommender

BEST_MODEL_DIR = RecRun.LCREC_MODEL
TEMPLATE_STREAM = "lcrec_templates"


def _llm_dtype(config, device: torch.device):
    """bfloat16 weights on a GPU that supports them when config.bf16, else the folder's float32."""
    if config.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _require_llm_packages() -> None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise LetterError(f"model lcrec needs transformers and peft ({e}); "
                          "install them with pip install -e .[llm]") from None


def _histories(rows: torch.Tensor) -> list[list[int]]:
    return [r[r >= 0].tolist() for r in rows]


class LCRecRecommender(Recommender):
    name = "lcrec"
    ddp = False  # only the adapter trains: its gradients are averaged directly (no full-model broadcast)

    def __init__(self, model: LCRec, rec=None, item_tokens: torch.Tensor | None = None, seed: int = 0):
        super().__init__(model, rec)
        if item_tokens is None and rec is not None:
            item_tokens = model.item_tokens(rec.codes)
        self.item_tokens = item_tokens
        self.seed = seed

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def build(cls, config, rec, device) -> "LCRecRecommender":
        _require_llm_packages()
        on_gpu = device.type == "cuda"
        model = LCRec.from_base(config.base_model, rec.layout.level_sizes, lora_r=config.lora_r,
                                lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                temperature=config.temperature, dtype=_llm_dtype(config, device),
                                gradient_checkpointing=config.gradient_checkpointing and on_gpu,
                                max_history=config.max_history, device=device)
        return cls(model, rec, seed=config.seed)

    @classmethod
    def check_settings(cls, config) -> None:
        _require_llm_packages()
        check_base_folder(config.base_model)

    @staticmethod
    def wraps(model) -> bool:
        return isinstance(model, LCRec)

    @classmethod
    def for_decoding(cls, model: LCRec, *, rec=None, index: PrefixIndex | None = None) -> "LCRecRecommender":
        if rec is None and index is None:
            raise LetterError("decoding with LC-Rec needs the items' codes (a RecData or a PrefixIndex)")
        if rec is None:
            if list(index.vocab_offsets) != list(model.vocab_offsets):
                raise LetterError(f"the PrefixIndex was built with vocab_offsets {index.vocab_offsets}, the model "
                                  f"uses {list(model.vocab_offsets)}")
            codes = index.leaf_codes()[index.leaf_of_item].cpu()
            return cls(model, None, model.item_tokens(codes))
        return cls(model, rec)

    @staticmethod
    def best_model_path(run_dir: str) -> str:
        return os.path.join(run_dir, BEST_MODEL_DIR)

    @classmethod
    def load_best(cls, run_dir: str, config, device) -> LCRec:
        _require_llm_packages()
        return LCRec.load(cls.best_model_path(run_dir), dtype=_llm_dtype(config, device), device=device)

    # -- training --------------------------------------------------------------------------------

    def prepare_training(self, rng):
        self.train_hist, self.train_targets = self.rec.train_histories()
        self._templates_gen = rng.generator(TEMPLATE_STREAM, self.seed, device="cpu")
        self._templates = None
        return self.train_hist.shape[0], (self.train_hist >= 0).sum(1)

    def start_epoch(self, epoch: int) -> None:
        """Instruction template of every training sample for this epoch: a function of (seed,
        epoch) only, drawn for all samples so each process takes its rows from the same draw."""
        self._templates_gen.manual_seed(self.seed * 100003 + epoch + 1)
        self._templates = torch.randint(0, self.model.num_templates, (self.train_hist.shape[0],),
                                        generator=self._templates_gen, device="cpu")

    def batch(self, rows: torch.Tensor):
        if self._templates is None:
            raise LetterError("start_epoch() must come before batch()")
        examples = self.model.encode_examples(_histories(self.train_hist[rows]), self.item_tokens,
                                              self.train_targets[rows].tolist(), template=self._templates[rows])
        return examples["input_ids"], examples["attention_mask"], examples["labels"]

    @torch.no_grad()
    def mean_loss(self, histories: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
        """Mean per-token loss (eval mode, template 0) of the given samples."""
        self.model.eval()
        total = 0.0
        for start in range(0, histories.shape[0], batch_size):
            examples = self.model.encode_examples(_histories(histories[start:start + batch_size]), self.item_tokens,
                                                  targets[start:start + batch_size].tolist(), template=0)
            total += self.model.loss(**examples, reduction="sum").item()
        return total / max(1, targets.numel() * self.model.num_levels)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.adapter_state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_adapter_state_dict({k: v.to(self.model.device) for k, v in state.items()})

    def save_best(self, out_dir: str, epoch: int, metrics: dict) -> None:
        self.model.save(self.best_model_path(out_dir))

    # -- decoding --------------------------------------------------------------------------------

    @staticmethod
    def eval_inputs(rec, part: str, max_users: int = 0, seed: int = 0):
        return rec.eval_histories(part, max_users, seed)

    @staticmethod
    def encode(rec, histories: list[list[int]]) -> torch.Tensor:
        return rec.history_tensor(histories)

    @staticmethod
    def input_lengths(inputs: torch.Tensor) -> torch.Tensor:
        return (inputs >= 0).sum(1)

    def prefix_index(self, rec, device) -> PrefixIndex:
        return PrefixIndex.from_codes(rec.codes, self.model.level_sizes, self.model.vocab_offsets, device=device)

    def start_decoding(self, inputs: torch.Tensor, beams: int, device):
        if inputs.dim() != 2:
            raise LetterError(f"LC-Rec decodes item-id histories [users, max_history], got shape {tuple(inputs.shape)}")
        prompts = self.model.encode_examples(_histories(inputs), self.item_tokens, None, template=0)
        return self.model.start_decoding(prompts["input_ids"], prompts["attention_mask"], beams)
