"""LC-Rec (python/letter/rec/lcrec.py) on a tiny random Llama saved to a local folder."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from letter.decoding import PrefixIndex  # noqa: E402
from letter.errors import LetterError  # noqa: E402
from letter.rec.lcrec import IGNORE_INDEX, LCRec, token_name  # noqa: E402
from letter_ext import dot_product_cross_entropy  # noqa: E402

LEVELS = (4, 3, 5)


@pytest.fixture(scope="module")
def base(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def codes():
    g = torch.Generator().manual_seed(1)
    all_codes = torch.cartesian_prod(*[torch.arange(s) for s in LEVELS])
    return all_codes[torch.randperm(all_codes.shape[0], generator=g)[:30]]  # 30 items, distinct identifiers


def _histories(n, num_items, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 25, (n,), generator=g).tolist()
    return [torch.randint(0, num_items, (k,), generator=g).tolist() for k in lengths]


def _model(base, **kw):
    torch.manual_seed(0)
    return LCRec.from_base(base, LEVELS, **kw)


def _train_a_few_steps(model, codes, steps=4):
    item_tokens = model.item_tokens(codes)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-2)
    g = torch.Generator().manual_seed(0)
    histories = _histories(6, codes.shape[0], seed=3)
    targets = list(range(6))
    model.train()
    for _ in range(steps):
        batch = model.encode_examples(histories, item_tokens, targets, g)
        loss = model.loss(**batch) / len(targets) / model.num_levels
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return item_tokens


@pytest.fixture(scope="module")
def trained(base, codes):
    model = _model(base, temperature=0.7)
    _train_a_few_steps(model, codes)
    return model


# -- construction ------------------------------------------------------------------------------


def test_from_base_vocab_and_trainable(base):
    model = _model(base)
    tok = model.tokenizer
    assert len(model.vocab_offsets) == len(LEVELS)
    for level, size in enumerate(LEVELS):
        for code in (0, size - 1):
            assert tok.convert_tokens_to_ids(token_name(level, code)) == model.vocab_offsets[level] + code
    assert token_name(0, 255) == "<a_255>" and token_name(1, 0) == "<b_0>"
    assert model.vocab_size == model.vocab_offsets[-1] + LEVELS[-1]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{target}.lora_A" in n for n in names), target
    assert any("embed_tokens" in n and "trainable_tokens_delta" in n for n in names)
    assert any("lm_head" in n and "trainable_tokens_delta" in n for n in names)
    assert model.model.peft_config["default"].r == 8 and model.model.peft_config["default"].lora_alpha == 32
    # the identifier trie over the LLM vocabulary
    index = PrefixIndex.from_codes(torch.tensor([[0, 0, 0], [3, 2, 4]]), LEVELS, model.vocab_offsets)
    assert index.num_leaves == 2


def test_from_base_errors(tmp_path):
    with pytest.raises(LetterError, match="no such folder"):
        LCRec.from_base(str(tmp_path / "missing"), LEVELS)
    with pytest.raises(LetterError, match="no config.json"):
        LCRec.from_base(str(tmp_path), LEVELS)
    from transformers import T5Config

    T5Config(vocab_size=10, d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path / "t5")
    with pytest.raises(LetterError, match="not a causal language model"):
        LCRec.from_base(str(tmp_path / "t5"), LEVELS)


@pytest.mark.parametrize("max_history", [0, -3])
def test_from_base_refuses_a_history_window_below_one(base, max_history):
    """max_history 0 would read the whole history ([-0:]), -3 all but its first 3 items: refused, as
    RecConfig refuses it, before the base model loads."""
    from letter.errors import SettingError

    with pytest.raises(SettingError, match=f"^max_history must be >= 1, got {max_history}$"):
        LCRec.from_base(base, LEVELS, max_history=max_history)


def test_constructor_refuses_a_history_window_below_one(base):
    """LCRec(...) directly (not from_base) used to keep max_history 0, and read whole histories."""
    from letter.errors import SettingError

    lm = _model(base)
    with pytest.raises(SettingError, match="^max_history must be >= 1, got 0$"):
        LCRec(lm.model, lm.tokenizer, lm.base_model, lm.level_sizes, lm.vocab_offsets, temperature=lm.temperature,
              max_history=0, lora=lm.lora)


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_from_base_and_constructor_refuse_a_temperature_that_is_not_finite_and_positive(base, temperature):
    """LCRec(...) directly used to keep any temperature (and from_base let NaN and inf through), to
    divide every logit by it: refused by both, from_base before the base model loads."""
    from letter.errors import SettingError

    expected = f"^temperature must be a finite number > 0, got {temperature!r}$"
    with pytest.raises(SettingError, match=expected):
        LCRec.from_base(base, LEVELS, temperature=temperature)
    lm = _model(base)
    with pytest.raises(SettingError, match=expected):
        LCRec(lm.model, lm.tokenizer, lm.base_model, lm.level_sizes, lm.vocab_offsets, temperature=temperature,
              max_history=lm.max_history, lora=lm.lora)


# -- prompts -------------------------------------------------------------------------------------


def test_encode_examples(base, codes):
    model = _model(base)
    item_tokens = model.item_tokens(codes)
    histories = _histories(8, codes.shape[0])
    histories[0] = list(range(25))  # longer than max_history
    targets = list(range(8))
    batch = model.encode_examples(histories, item_tokens, targets, torch.Generator().manual_seed(0))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    assert bool(mask[:, -1].all())  # left padding
    for i, history in enumerate(histories):
        real = ids[i][mask[i].bool()]
        assert (ids[i][~mask[i].bool()] == model.pad_token_id).all()
        assert real[0] == model.tokenizer.bos_token_id
        # the response: the target's identifier tokens, the only labelled positions
        assert torch.equal(labels[i][labels[i] != IGNORE_INDEX], item_tokens[targets[i]])
        assert torch.equal(real[-len(LEVELS):], item_tokens[targets[i]])
        # the history: identifiers of the last 20 items, spliced in order
        hist = item_tokens[history[-20:]].reshape(-1)
        is_code = real[:-len(LEVELS)] >= model.vocab_offsets[0]
        assert torch.equal(real[:-len(LEVELS)][is_code], hist)
    # the template is sampled per example, reproducibly
    again = model.encode_examples(histories, item_tokens, targets, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], ids)
    many = model.encode_examples([histories[1]] * 40, item_tokens, [0] * 40, torch.Generator().manual_seed(1))
    assert len({tuple(r[m.bool()].tolist()) for r, m in zip(many["input_ids"], many["attention_mask"])}) > 1
    prompts = model.encode_examples(histories, item_tokens, None)
    assert set(prompts) == {"input_ids", "attention_mask"} and bool(prompts["attention_mask"][:, -1].all())
    with pytest.raises(LetterError):
        model.item_tokens(torch.tensor([[0, 0, 9]]))


# -- loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 50, 16), (33, 300, 24)])
def test_fused_loss_matches_linear_cross_entropy_float64(shape):
    n, vocab, d = shape
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::3] = IGNORE_INDEX
    tau = 0.37
    fused = dot_product_cross_entropy(h, w, y, temperature=tau, ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(fused, (h, w))
    eager = F.cross_entropy(F.linear(h, w) / tau, y, ignore_index=IGNORE_INDEX)
    eh, ew = torch.autograd.grad(eager, (h, w))
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, eh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-12)


def test_loss_matches_hf_loss_at_tau_1(trained, base, codes):
    model = _model(base)  # tau = 1
    item_tokens = model.item_tokens(codes)
    batch = model.encode_examples(_histories(5, codes.shape[0], seed=7), item_tokens, [1, 2, 3, 4, 5],
                                  torch.Generator().manual_seed(0))
    model.eval()
    ours = model.loss(**batch, reduction="mean")
    hf = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=LCRec.position_ids(batch["attention_mask"]), labels=batch["labels"]).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)
    total = model.loss(**batch)  # default: sum over the response tokens
    torch.testing.assert_close(total, hf * 5 * len(LEVELS), rtol=1e-5, atol=1e-5)


def test_loss_with_temperature_and_gradients(trained, codes):
    model = trained
    item_tokens = model.item_tokens(codes)
    batch = model.encode_examples(_histories(4, codes.shape[0], seed=9), item_tokens, [0, 5, 7, 9],
                                  torch.Generator().manual_seed(2))
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])[:, :-1]
    y = batch["labels"][:, 1:]
    ref = F.cross_entropy(model.logits(hidden).reshape(-1, model.vocab_size), y.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    loss = model.loss(**batch)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lm_head" in n)
    model.zero_grad(set_to_none=True)


def test_training_lowers_the_loss(base, codes):
    model = _model(base)
    item_tokens = model.item_tokens(codes)
    batch = model.encode_examples(_histories(6, codes.shape[0], seed=3), item_tokens, list(range(6)), None)
    model.eval()
    before = model.loss(**batch).item()
    _train_a_few_steps(model, codes, steps=6)
    assert model.loss(**batch).item() < before


# -- decoding ------------------------------------------------------------------------------------


def _full_sequence_scores(model, prompts, tokens):
    """Sum of log-softmax(logits / tau) of `tokens` [N, L] after left-padded prompts, one no-cache forward."""
    ids = torch.cat([prompts["input_ids"], tokens], 1)
    mask = torch.cat([prompts["attention_mask"], torch.ones_like(tokens)], 1)
    with torch.no_grad():
        logp = model.logits(model.hidden_states(ids, mask)).log_softmax(-1)
    L = tokens.shape[1]
    steps = logp[:, -L - 1:-1]
    return steps.gather(2, tokens[..., None]).squeeze(2).sum(1)


def test_cached_beam_search_matches_full_forward(trained, codes):
    model = trained
    item_tokens = model.item_tokens(codes)
    histories = _histories(3, codes.shape[0], seed=11)
    histories[1] = histories[1][:2]  # prompts of different lengths: real left padding
    prompts = model.encode_examples(histories, item_tokens, None)
    index = PrefixIndex.from_codes(codes, LEVELS, model.vocab_offsets)
    beams = 6
    result = model.generate(prompts["input_ids"], prompts["attention_mask"], index, beams)
    assert result.items.shape == (3, beams)
    assert (result.items >= 0).all()
    # every recommendation is a real item, and its codes are the item's
    assert torch.equal(codes[result.items], result.codes)
    # beams are sorted and distinct
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    assert all(len(set(row)) == beams for row in result.items.tolist())
    # cached decoding == one no-cache forward over prompt + identifier
    flat_items = result.items.reshape(-1)
    rep = {k: v.repeat_interleave(beams, 0) for k, v in prompts.items()}
    full = _full_sequence_scores(model, rep, item_tokens[flat_items])
    torch.testing.assert_close(result.scores.reshape(-1), full, rtol=1e-4, atol=1e-4)
    # the beam search found the best identifiers: brute force over all items for user 0
    all_scores = _full_sequence_scores(model, {k: v[:1].expand(codes.shape[0], -1) for k, v in prompts.items()},
                                       item_tokens)
    torch.testing.assert_close(result.scores[0, 0], all_scores.max(), rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_scores(trained, codes):
    """A user's beam results are the same alone as in a batch with longer prompts (left padding)."""
    model = trained
    item_tokens = model.item_tokens(codes)
    histories = [[1, 2], list(range(20))]
    index = PrefixIndex.from_codes(codes, LEVELS, model.vocab_offsets)
    both = model.encode_examples(histories, item_tokens, None)
    alone = model.encode_examples(histories[:1], item_tokens, None)
    r_both = model.generate(both["input_ids"], both["attention_mask"], index, 4)
    r_alone = model.generate(alone["input_ids"], alone["attention_mask"], index, 4)
    assert torch.equal(r_both.items[0], r_alone.items[0])
    torch.testing.assert_close(r_both.scores[0], r_alone.scores[0], rtol=1e-4, atol=1e-5)


def test_decode_step_shapes(trained, codes):
    model = trained
    prompts = model.encode_examples(_histories(2, codes.shape[0]), model.item_tokens(codes), None)
    state = model.start_decoding(prompts["input_ids"], prompts["attention_mask"], 3)
    logits, state = model.decode_step(None, state)
    assert logits.shape == (2, model.vocab_size) and logits.dtype == torch.float32
    state = model.reorder_state(state, torch.tensor([0, 0, 0, 1, 1, 1]))
    logits, state = model.decode_step(torch.full((6,), model.vocab_offsets[0]), state)
    assert logits.shape == (6, model.vocab_size)
    torch.testing.assert_close(logits[0], logits[2])


# -- saving --------------------------------------------------------------------------------------


def test_save_load_roundtrip(trained, base, codes, tmp_path):
    model = trained
    out = tmp_path / "lcrec"
    model.save(str(out))
    model.save(str(out))  # overwriting an existing save is fine
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "lcrec.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left
    meta = json.loads((out / "lcrec.json").read_text())
    assert meta["level_sizes"] == list(LEVELS) and meta["temperature"] == 0.7 and meta["base_model"] == base
    # small: LoRA + the new-token rows, not the full embedding matrices
    assert os.path.getsize(out / "adapter_model.safetensors") < 200_000

    torch.manual_seed(123)  # a different RNG state: nothing random may leak into the loaded model
    loaded = LCRec.load(str(out))
    loaded.eval()
    prompts = model.encode_examples(_histories(3, codes.shape[0], seed=5), model.item_tokens(codes), None)
    with torch.no_grad():
        a = model.logits(model.hidden_states(prompts["input_ids"], prompts["attention_mask"]))
        b = loaded.logits(loaded.hidden_states(prompts["input_ids"], prompts["attention_mask"]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.temperature == 0.7 and loaded.vocab_offsets == model.vocab_offsets
    with pytest.raises(LetterError, match="not a saved LC-Rec model"):
        LCRec.load(str(tmp_path))


def test_tied_embeddings(tmp_path, codes, tiny_llama_factory):
    """A base model with tied input/output embeddings: one set of trained rows serves both."""
    base = tiny_llama_factory(tmp_path / "tied", tie=True, extra_rows=0)
    model = _model(base)
    names = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens_delta" in n]
    assert len(names) == 1
    item_tokens = _train_a_few_steps(model, codes, steps=2)
    emb = model.causal_lm.get_input_embeddings()
    w_in = emb.token_adapter.get_merged_weights(emb.token_adapter.active_adapters)
    torch.testing.assert_close(model.output_weight(), w_in)
    model.save(str(tmp_path / "saved"))
    loaded = LCRec.load(str(tmp_path / "saved"))
    prompts = model.encode_examples([[1, 2, 3]], item_tokens, None)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.hidden_states(**prompts)),
                                   loaded.eval().logits(loaded.hidden_states(**prompts)), rtol=0, atol=0)


def test_gradient_checkpointing_same_gradients(base, codes):
    grads = []
    for checkpointing in (False, True):
        model = _model(base, lora_dropout=0.0, gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        item_tokens = _train_a_few_steps(model, codes, steps=1)  # nonzero LoRA B, so every LoRA weight gets a gradient
        model.train()
        batch = model.encode_examples(_histories(3, codes.shape[0]), item_tokens, [0, 1, 2], None)
        model.loss(**batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_bfloat16(base, codes):
    model = _model(base, dtype=torch.bfloat16)
    assert model.output_weight().dtype == torch.bfloat16
    item_tokens = model.item_tokens(codes)
    batch = model.encode_examples(_histories(3, codes.shape[0]), item_tokens, [0, 1, 2], None)
    loss = model.loss(**batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # bf16 per-token losses, summed in float32
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])[:, :-1]
        ref = F.cross_entropy(model.logits(hidden).flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    loss.backward()
    prompts = model.encode_examples(_histories(2, codes.shape[0]), item_tokens, None)
    index = PrefixIndex.from_codes(codes, LEVELS, model.vocab_offsets)
    result = model.generate(prompts["input_ids"], prompts["attention_mask"], index, 3)
    assert (result.items >= 0).all() and torch.equal(codes[result.items], result.codes)


def test_load_rejects_other_adapter(trained, base, tmp_path):
    trained.save(str(tmp_path / "a"))
    meta = json.loads((tmp_path / "a" / "lcrec.json").read_text())
    meta["level_sizes"] = [4, 3, 6]
    (tmp_path / "a" / "lcrec.json").write_text(json.dumps(meta))
    with pytest.raises(LetterError):
        LCRec.load(str(tmp_path / "a"))


def test_damaged_saves_are_one_line_errors_and_stale_temps_go(tiny_llama, tmp_path):
    model = LCRec.from_base(tiny_llama, (4, 4))
    out = tmp_path / "saved"
    model.save(str(out))
    stale = tmp_path / ".tmp-saved-killed"
    stale.mkdir()
    model.save(str(out))
    assert not stale.exists()
    adapter = next(p for p in out.iterdir() if p.suffix == ".safetensors")
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(LetterError, match="corrupt or truncated"):
        LCRec.load(str(out))
