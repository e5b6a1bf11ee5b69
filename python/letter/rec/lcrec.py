"""LC-Rec: a causal LLM fine-tuned with LoRA to generate the next item's identifier tokens.

The item identifiers (L codes per item) become new tokens of the LLM vocabulary, one per
(level, code), named as in the authors' code: `<a_0>`..`<a_255>` for level 0, `<b_...>` for level
1, and so on. A training example is an instruction prompt holding the identifiers of the user's
last `max_history` items, followed by the target item's L identifier tokens (no EOS: every
identifier has exactly L tokens, and decoding stops after L steps).

What is trained (peft): LoRA adapters (r 8, alpha 32, dropout 0.05) on the attention and MLP
projections present in the model, and the rows of the new identifier tokens in the input embedding
and in the output layer (peft `trainable_token_indices`; with tied embeddings one set of rows
serves both). The rows of the original vocabulary stay frozen, so a saved model is small: the
adapter plus 2 x (number of new tokens) x d values. (The authors train the whole embedding and
output matrices through `modules_to_save`; the original-vocabulary rows are frozen here.)

Sequences are left-padded, with position ids counted from each row's first real token, so a
batch of prompts ends at the same column and cached batched decoding is exact.

Typical use (see tests/test_lcrec.py):
    model = LCRec.from_base("/models/llama-7b", level_sizes=(256,) * 4)
    item_tokens = model.item_tokens(codes)                               # [num_items, L]
    batch = model.encode_examples(histories, item_tokens, targets, generator)
    model.loss(**batch).backward()                                       # sum over response tokens
    index = PrefixIndex.from_codes(codes, model.level_sizes, model.vocab_offsets)
    prompts = model.encode_examples(histories, item_tokens, None)        # template 0
    result = model.generate(prompts["input_ids"], prompts["attention_mask"], index, num_beams=20)
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import string
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from letter.data.split import check_max_history
from letter.errors import LetterError
from letter.rec.model import check_temperature
from letter.runs import atomic_dir, read_json

IGNORE_INDEX = -100
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_FILE = "lcrec.json"
ADAPTER_FILE = "adapter_model.safetensors"
_FORMAT = "letter.lcrec"
_VERSION = 1

# The instruction wrapper (Alpaca style, as LC-Rec uses) around one of the sequential
# recommendation instructions below; {history} is replaced by the history's identifier tokens.
PROMPT_WRAPPER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
SEQREC_INSTRUCTIONS = (
    "Here are the user's historical interactions: {history}, try to predict the next item.",
    "The user has interacted with the following items in chronological order: {history}. "
    "Which item will the user interact with next?",
    "Given the user's interaction history {history}, recommend the next item the user is likely to want.",
    "Based on the items the user engaged with so far, {history}, predict the item the user will choose next.",
    "These are the items the user bought, oldest first: {history}. What is the next item the user will buy?",
)


def token_name(level: int, code: int) -> str:
    """Name of the token of (level, code): <a_12> for level 0, <b_12> for level 1, ..."""
    if not 0 <= level < 26:
        raise LetterError(f"LC-Rec identifiers support at most 26 levels, got level {level}")
    return f"<{string.ascii_lowercase[level]}_{code}>"


def check_base_folder(path: str):
    """The config of a local causal-LM folder; LetterError (one line) otherwise. Loads no weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not os.path.isdir(path):
        raise LetterError(f"base model {path}: no such folder (LC-Rec loads a local Hugging Face model folder; "
                          "nothing is downloaded)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise LetterError(f"base model {path}: not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # unknown model_type, malformed json, ...
        raise LetterError(f"base model {path}: cannot read its config.json ({str(e).splitlines()[0]})") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LetterError(f"base model {path}: a {config.model_type!r} model is not a causal language model")
    return config


@dataclass
class LCRecDecodeState:
    """Incremental decoding state of B users x K beams (rows user-major once expanded)."""

    cache: Any  # transformers Cache holding the prompt (and generated tokens), [rows, heads, T, d]
    attention_mask: torch.Tensor  # [rows, T] 1 = real token (left padding)
    positions: torch.Tensor  # [rows] position id of the next token
    first_logits: torch.Tensor | None  # [B, V] logits after the prompt (returned by step 0)
    beams: int
    output_weight: torch.Tensor  # [V, d] float32 output layer, converted once per search


class LCRec(nn.Module):
    """A causal LM + LoRA reading and generating LETTER identifiers as new tokens.

    Attributes: model (the peft model), tokenizer, level_sizes, vocab_offsets (token id of code 0
    at each level; token of (l, c) = vocab_offsets[l] + c), vocab_size (rows of the output layer,
    the V of the logits), temperature (tau of the ranking-guided loss and of the decoding logits),
    max_history, pad_token_id, base_model (folder path).
    """

    def __init__(self, model, tokenizer, base_model: str, level_sizes: Sequence[int], vocab_offsets: Sequence[int],
                 *, temperature: float, max_history: int, lora: dict):
        check_temperature(temperature)
        check_max_history(max_history)
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.level_sizes = tuple(int(s) for s in level_sizes)
        self.vocab_offsets = tuple(int(o) for o in vocab_offsets)
        self.temperature = float(temperature)
        self.max_history = int(max_history)
        self.lora = dict(lora)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)
        self._bos = [int(tokenizer.bos_token_id)] if getattr(tokenizer, "bos_token", None) else []
        self._templates = [self._split_template(t) for t in SEQREC_INSTRUCTIONS]
        decoder = self.decoder
        self._cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base_model: str, level_sizes: tuple[int, ...], *, lora_r: int = 8, lora_alpha: int = 32,
                  lora_dropout: float = 0.05, temperature: float = 1.0, dtype=None,
                  gradient_checkpointing: bool = False,
                  max_history: int = 20, device=None) -> "LCRec":
        """Load the causal LM + tokenizer of the local folder `base_model` (nothing is fetched from a
        hub), add one token per (level, code), resize the embeddings and wrap the model with LoRA.
        dtype: torch dtype of the weights (None: as the folder's from_pretrained default, fp32);
        device: where to put the model (default CPU); max_history: the last items of a history each
        prompt reads (>= 1)."""
        level_sizes = tuple(int(s) for s in level_sizes)
        if not level_sizes or min(level_sizes) < 1:
            raise LetterError(f"level_sizes must be positive ints, got {level_sizes}")
        check_temperature(temperature)  # both before the base model loads
        check_max_history(max_history)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        base_model = os.path.abspath(os.fspath(base_model))
        check_base_folder(base_model)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
        except Exception as e:
            raise LetterError(f"base model {base_model}: cannot load its tokenizer ({str(e).splitlines()[0]})") from e
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(base_model, local_files_only=True, **kwargs)
        if device is not None:
            model = model.to(device)

        names = [token_name(level, code) for level, size in enumerate(level_sizes) for code in range(size)]
        clash = [n for n in names if n in tokenizer.get_vocab()]
        if clash:
            raise LetterError(f"base model {base_model}: its tokenizer already has token(s) {clash[:3]}")
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(names))):
            raise LetterError(f"base model {base_model}: the identifier tokens did not get consecutive ids")
        offsets, start = [], ids[0]
        for size in level_sizes:
            offsets.append(start)
            start += size
        rows = model.get_input_embeddings().num_embeddings
        if start > rows:
            model.resize_token_embeddings(start)

        linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        targets = [t for t in LORA_TARGETS if t in linear_names]
        if not targets:
            raise LetterError(f"base model {base_model}: none of the LoRA target layers "
                              f"{', '.join(LORA_TARGETS)} exist")
        embed_name = _module_name(model, model.get_input_embeddings())
        token_ids = list(range(offsets[0], start))
        trainable = {embed_name: token_ids}
        if not _tied(model):
            trainable[_module_name(model, model.get_output_embeddings())] = token_ids
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                            trainable_token_indices=trainable, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        lm = cls(peft_model, tokenizer, base_model, level_sizes, offsets, temperature=temperature,
                 max_history=max_history,
                 lora={"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "target_modules": targets})
        if gradient_checkpointing:  # recompute each layer in backward (only in train mode, as HF does)
            causal = peft_model.get_base_model()
            enable = getattr(causal, "activation_checkpointing_enable", None)  # transformers >= 5.x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return lm

    # -- properties --------------------------------------------------------------------------------

    @property
    def causal_lm(self):
        """The HF causal LM inside the peft wrapper (LoRA layers injected in place)."""
        return self.model.get_base_model()

    @property
    def decoder(self):
        """The transformer stack without the output layer (returns final hidden states)."""
        return self.causal_lm.get_decoder()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        head = self.causal_lm.get_output_embeddings()
        return int((head.token_adapter.base_layer if _is_wrapper(head) else head).weight.shape[0])

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def item_tokens(self, codes) -> torch.Tensor:
        """Item codes [num_items, L] -> LLM token ids [num_items, L] (int64, CPU)."""
        codes = torch.as_tensor(codes, dtype=torch.long).cpu()
        if codes.dim() != 2 or codes.shape[1] != self.num_levels:
            raise LetterError(f"codes must be [num_items, {self.num_levels}], got {tuple(codes.shape)}")
        sizes = torch.tensor(self.level_sizes)
        if codes.numel() and (codes.min() < 0 or (codes >= sizes).any()):
            raise LetterError(f"codes out of range for level sizes {self.level_sizes}")
        return codes + torch.tensor(self.vocab_offsets)

    def output_weight(self) -> torch.Tensor:
        """[V, d] weight of the output layer as the model uses it (new-token rows trained)."""
        head = self.causal_lm.get_output_embeddings()
        if _is_wrapper(head):
            layer = head.token_adapter
            return layer.get_merged_weights(layer.active_adapters)
        if getattr(head, "bias", None) is not None:
            raise LetterError("LC-Rec needs an output layer without bias")
        return head.weight

    # -- prompts -----------------------------------------------------------------------------------

    def _split_template(self, instruction: str) -> tuple[list[int], list[int]]:
        text = PROMPT_WRAPPER.format(instruction=instruction)
        before, after = text.split("{history}")
        enc = lambda s: list(self.tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
        return self._bos + enc(before), enc(after)

    @property
    def num_templates(self) -> int:
        return len(self._templates)

    def encode_examples(self, histories: list[list[int]], item_tokens: torch.Tensor, targets: list[int] | None = None,
                        generator: torch.Generator | None = None, *,
                        template: int | Sequence[int] | torch.Tensor | None = None) -> dict:
        """Token ids of prompts (+ responses), left-padded.

        histories: item ids of each user, oldest first (the last max_history are used);
        item_tokens: [num_items, L] LLM token ids of every item (`item_tokens(codes)`);
        targets: next item of each user (training / loss), or None (prompts for decoding).
        The instruction is sampled per example with `generator` (CPU torch.Generator); without a
        generator, or with `template` given, every example uses instruction `template` (default 0),
        or, when `template` is a sequence of N ints, example i uses instruction template[i] (the
        trainer draws them for a whole epoch at once, so every process sees the same choice).
        Returns dict of CPU int64 tensors input_ids, attention_mask [N, T] and, with targets,
        labels [N, T] (IGNORE_INDEX except the L response tokens)."""
        n = len(histories)
        if targets is not None and len(targets) != n:
            raise LetterError(f"got {len(targets)} targets for {n} histories")
        item_tokens = torch.as_tensor(item_tokens, dtype=torch.long).cpu()
        if template is not None and not isinstance(template, int):
            which = torch.as_tensor(template, dtype=torch.long).reshape(-1).cpu()
            if which.numel() != n:
                raise LetterError(f"got {which.numel()} templates for {n} histories")
            if n and (which.min() < 0 or which.max() >= self.num_templates):
                raise LetterError(f"templates must be in [0, {self.num_templates})")
        elif template is not None or generator is None:
            template = 0 if template is None else int(template)
            if not 0 <= template < self.num_templates:
                raise LetterError(f"template must be in [0, {self.num_templates}), got {template}")
            which = torch.full((n,), template, dtype=torch.long)
        else:
            which = torch.randint(0, self.num_templates, (n,), generator=generator, device=generator.device)
        rows, prompt_lens = [], []
        for i, history in enumerate(histories):
            before, after = self._templates[int(which[i])]
            hist = item_tokens[list(history)[-self.max_history:]].reshape(-1).tolist() if len(history) else []
            prompt = before + hist + after
            prompt_lens.append(len(prompt))
            rows.append(prompt + (item_tokens[int(targets[i])].tolist() if targets is not None else []))
        width = max((len(r) for r in rows), default=0)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if targets is not None else None
        for i, row in enumerate(rows):
            start = width - len(row)
            input_ids[i, start:] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, start:] = 1
            if labels is not None:
                labels[i, start + prompt_lens[i]:] = input_ids[i, start + prompt_lens[i]:]
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = labels
        return out

    # -- training ----------------------------------------------------------------------------------

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted from each row's first real token (left padding); 0 on padding."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [N, T, d] (after the last norm), no cache."""
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=self.position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             reduction: str = "sum") -> torch.Tensor:
        """Ranking-guided generation loss: cross-entropy of softmax(h W^T / tau) on the response
        tokens (label at position t is predicted from the state at t - 1), through
        letter_ext.dot_product_cross_entropy so the [tokens x vocab] logits are never built.
        reduction: 'sum' (default, divide by the number of response tokens yourself), 'mean', 'none'.
        With bf16/fp16 hidden states the per-token losses are summed in float32 (a float32 result)."""
        from letter_ext import dot_product_cross_entropy

        hidden = self.hidden_states(input_ids, attention_mask)
        labels = labels.to(hidden.device)[:, 1:]
        keep = labels != IGNORE_INDEX
        h, y = hidden[:, :-1][keep], labels[keep]
        weight = self.output_weight().to(h.dtype)
        if h.dtype == torch.float32 or h.dtype == torch.float64 or reduction == "none":
            return dot_product_cross_entropy(h, weight, y, temperature=self.temperature, ignore_index=IGNORE_INDEX,
                                             reduction=reduction)
        rows = dot_product_cross_entropy(h, weight, y, temperature=self.temperature, ignore_index=IGNORE_INDEX,
                                         reduction="none").float()
        if reduction == "sum":
            return rows.sum()
        if reduction == "mean":
            return rows.sum() / y.numel()
        raise LetterError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")

    def forward(self, input_ids, attention_mask, labels, reduction: str = "sum"):
        """= loss(): what DDP wraps, so gradient hooks fire on backward."""
        return self.loss(input_ids, attention_mask, labels, reduction)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits / tau of hidden states [..., d] over the whole vocabulary (weight: the
        output layer in float32, when the caller keeps one)."""
        weight = self.output_weight().float() if weight is None else weight
        return (hidden.float() @ weight.T) / self.temperature

    # -- decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def start_decoding(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, beams: int) -> LCRecDecodeState:
        """Run the (left-padded) prompts once and keep their KV cache; the logits of the first
        identifier token come from each prompt's last position (returned by decode_step(None, .))."""
        from transformers import DynamicCache

        if attention_mask.shape[1] and not bool(attention_mask[:, -1].all()):
            raise LetterError("prompts must be left-padded (every row's last token real)")
        device = self.device
        prompt_ids, attention_mask = prompt_ids.to(device), attention_mask.to(device).long()
        cache = DynamicCache(config=self.causal_lm.config)
        out = self.decoder(input_ids=prompt_ids, attention_mask=attention_mask,
                           position_ids=self.position_ids(attention_mask), use_cache=True,
                           **{self._cache_kwarg: cache})
        weight = self.output_weight().float()
        logits = self.logits(out.last_hidden_state[:, -1], weight)
        return LCRecDecodeState(cache, attention_mask, attention_mask.sum(1), logits, beams, weight)

    @torch.no_grad()
    def decode_step(self, last_tokens: torch.Tensor | None, state: LCRecDecodeState):
        """last_tokens [rows] -> (float32 logits / tau [rows, V], state). Step 0 (last_tokens None)
        returns the prompt logits [B, V], one row per user."""
        if last_tokens is None:
            if state.first_logits is None:
                raise LetterError("decode_step(None, state) is only valid once, right after start_decoding")
            logits, state.first_logits = state.first_logits, None
            return logits, state
        tokens = last_tokens.to(self.device).view(-1, 1)
        if tokens.shape[0] != state.attention_mask.shape[0]:
            raise LetterError(f"decode_step got {tokens.shape[0]} tokens for {state.attention_mask.shape[0]} cached "
                              "rows (call reorder_state between steps)")
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(tokens.shape[0], 1)], 1)
        out = self.decoder(input_ids=tokens, attention_mask=mask, position_ids=state.positions[:, None],
                           use_cache=True, **{self._cache_kwarg: state.cache})
        state.attention_mask, state.positions = mask, state.positions + 1
        return self.logits(out.last_hidden_state[:, -1], state.output_weight), state

    @staticmethod
    def reorder_state(state: LCRecDecodeState, flat_parent: torch.Tensor) -> LCRecDecodeState:
        """New row r continues old row flat_parent[r]; after step 0 this expands each user's
        prompt cache to its K beams (flat_parent [B*K] indexes the B prompt rows)."""
        flat_parent = flat_parent.to(state.attention_mask.device)
        state.cache.reorder_cache(flat_parent)  # index_select on the batch axis of every layer
        state.attention_mask = state.attention_mask.index_select(0, flat_parent)
        state.positions = state.positions.index_select(0, flat_parent)
        return state

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, index, num_beams: int, *,
                 backend: str | None = None):
        """Trie-constrained beam search (letter.decoding.constrained_beam_search) over the identifiers
        of `index` (a PrefixIndex built with this model's vocab_offsets, on the model's device)."""
        from letter.decoding import constrained_beam_search

        if tuple(index.vocab_offsets) != self.vocab_offsets:
            raise LetterError(f"the PrefixIndex was built with vocab_offsets {index.vocab_offsets}, the model uses "
                              f"{list(self.vocab_offsets)}")
        was_training = self.training
        self.eval()
        try:
            state = self.start_decoding(prompt_ids, attention_mask, num_beams)
            return constrained_beam_search(lambda step, last, st: self.decode_step(last, st), prompt_ids.shape[0],
                                           index, num_beams, reorder_state=self.reorder_state, state=state,
                                           backend=backend)
        finally:
            self.train(was_training)

    # -- saving ------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict:
        """The trained tensors only (LoRA + new-token rows), for checkpoints."""
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(self.model, save_embedding_layers=False).items()}

    def load_adapter_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}  # tied copies counted once
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if k in trained]
        if unexpected or missing:
            raise LetterError(f"adapter weights do not fit this model (unexpected {unexpected[:3]}, "
                              f"missing {missing[:3]})")

    def metadata(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "base_model": self.base_model,
                "level_sizes": list(self.level_sizes), "vocab_offsets": list(self.vocab_offsets),
                "vocab_size": self.vocab_size, "temperature": self.temperature, "max_history": self.max_history,
                "lora": self.lora}

    def save(self, directory: str) -> None:
        """Write the adapter (LoRA + new-token rows, safetensors) and lcrec.json to `directory`,
        atomically: a reader sees the old folder or the complete new one."""
        from safetensors.torch import save_file

        tmp, commit = atomic_dir(directory)
        try:
            state = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
            save_file(state, os.path.join(tmp, ADAPTER_FILE), metadata={"format": "pt"})
            self.model.peft_config["default"].save_pretrained(tmp)  # adapter_config.json (peft's own format)
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(self.metadata(), f, indent=2)
            commit()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str, base_model: str | None = None, *, dtype=None, device=None,
             gradient_checkpointing: bool = False) -> "LCRec":
        """Rebuild a saved model: the base model (recorded path, or `base_model` when it moved) +
        the saved adapter."""
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, META_FILE)
        if not os.path.exists(meta_path) or not os.path.exists(os.path.join(directory, ADAPTER_FILE)):
            raise LetterError(f"{directory}: not a saved LC-Rec model (missing {META_FILE} or {ADAPTER_FILE})")
        meta = read_json(meta_path, "LC-Rec model metadata")
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise LetterError(f"{meta_path}: not an LC-Rec model file of version {_VERSION}")
        lora = meta["lora"]
        model = cls.from_base(base_model or meta["base_model"], tuple(meta["level_sizes"]), lora_r=lora["r"],
                              lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                              temperature=meta["temperature"], dtype=dtype, device=device,
                              gradient_checkpointing=gradient_checkpointing, max_history=meta["max_history"])
        if list(model.vocab_offsets) != meta["vocab_offsets"] or model.vocab_size != meta["vocab_size"]:
            raise LetterError(f"{directory}: the base model's vocabulary differs from the one this model was "
                              "trained on")
        adapter = os.path.join(directory, ADAPTER_FILE)
        try:
            state = load_file(adapter, device=str(model.device))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise LetterError(f"{adapter}: corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        try:
            model.load_adapter_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise LetterError(f"{adapter}: does not match the base model ({str(e).splitlines()[0][:160]})") from None
        return model


def _is_wrapper(module) -> bool:
    return hasattr(module, "token_adapter")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise LetterError("cannot locate the embedding layer of the base model")


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight
