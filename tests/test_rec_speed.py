"""TIGER training speed: trimmed batches give the padded results, and the length-bucketed batch
order is seeded and the same on every process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from letter.rec.data import RecData, drop_trailing_padding, input_lengths
from letter.rec.model import EOS, PAD, Tiger
from letter.errors import LetterError
from letter.training import batch_order, bf16_autocast, cpu_has_fast_bf16, epoch_generator

LEVELS, MAX_HISTORY, VOCAB = 3, 6, 3 + 3 * 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: run the whole module single-threaded (see conftest.one_thread)."""


def _padded_batch(rows: int, seed: int):
    """Right-padded encoder inputs [rows, MAX_HISTORY * LEVELS + 1] with 1..4 history items (the
    batch is narrower than the padded width) and target tokens [rows, LEVELS]."""
    gen = torch.Generator().manual_seed(seed)
    enc = torch.full((rows, MAX_HISTORY * LEVELS + 1), PAD, dtype=torch.long)
    for row in range(rows):
        n = int(torch.randint(1, 5, (1,), generator=gen)) * LEVELS
        enc[row, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
        enc[row, n] = EOS
    return enc, torch.randint(3, VOCAB, (rows, LEVELS), generator=gen)


def _loss_and_grads(model, enc, labels):
    model.zero_grad(set_to_none=True)
    per_token = model.loss(enc, RecData.decoder_inputs(labels), labels, reduction="none")
    per_token.sum().backward()
    return per_token.view(labels.shape).sum(1).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_trimming_keeps_per_sample_loss_and_gradients():
    torch.manual_seed(0)
    model = Tiger(VOCAB, d_model=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, d_ff=64, dropout=0.0,
                  temperature=0.7).train()
    enc, labels = _padded_batch(24, seed=1)
    trimmed = drop_trailing_padding(enc)
    assert trimmed.shape[1] < enc.shape[1]
    assert torch.equal(trimmed, enc[:, : int(input_lengths(enc).max())])
    loss_padded, grads_padded = _loss_and_grads(model, enc, labels)
    loss_trimmed, grads_trimmed = _loss_and_grads(model, trimmed, labels)
    torch.testing.assert_close(loss_trimmed, loss_padded, rtol=1e-5, atol=1e-5)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_trimmed[name], grad, rtol=1e-4, atol=2e-5, msg=name)


def test_bucketed_order_is_seeded_and_groups_lengths():
    lengths = torch.randint(2, 82, (5000,), generator=torch.Generator().manual_seed(0))
    first = batch_order(5000, 64, epoch_generator(42, 3), lengths)
    again = batch_order(5000, 64, epoch_generator(42, 3), lengths)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.sort(torch.cat(first)).values, torch.arange(5000))  # every sample once
    other = batch_order(5000, 64, epoch_generator(42, 4), lengths)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    plain = batch_order(5000, 64, epoch_generator(42, 3))
    width = lambda batches: sum(int(lengths[b].max()) for b in batches) / len(batches)  # noqa: E731
    assert width(first) < 0.6 * width(plain)  # uniform lengths: ~43 vs ~80


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from letter.training import batch_order, distributed, epoch_generator, shard
    with distributed("cpu") as ctx:
        lengths = torch.randint(2, 82, (3000,), generator=torch.Generator().manual_seed(0))
        orders = {epoch: batch_order(3000, 128, epoch_generator(42, epoch), lengths) for epoch in (0, 1)}
        out = {"world": ctx.world, "orders": {e: [b.tolist() for b in o] for e, o in orders.items()},
               "shards": [shard(b, ctx).tolist() for b in orders[0]]}
        with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as f:
            json.dump(out, f)
""")


@pytest.mark.slow
def test_bucketed_order_is_the_same_on_two_torchrun_ranks(tmp_path):
    script = tmp_path / "order.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LETTER_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["orders"] == ranks[1]["orders"]
    lengths = torch.randint(2, 82, (3000,), generator=torch.Generator().manual_seed(0))
    local = batch_order(3000, 128, epoch_generator(42, 0), lengths)
    assert ranks[0]["orders"]["0"] == [b.tolist() for b in local]  # and the same as one process's
    for batch, a, b in zip(local, ranks[0]["shards"], ranks[1]["shards"]):
        assert sorted(a + b) == sorted(batch.tolist()) and not set(a) & set(b)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_ranking_loss_matches_materialized_logits(reduction):
    torch.manual_seed(0)
    model = Tiger(VOCAB, d_model=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16, d_ff=64, dropout=0.0,
                  temperature=0.7).train()
    enc, labels = _padded_batch(16, seed=2)
    labels[3] = PAD  # ignored rows: no loss, no gradient
    enc, dec = drop_trailing_padding(enc), RecData.decoder_inputs(labels)

    def materialized(enc, dec, labels, reduction):
        hidden = model(enc, dec)
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), model.embed.weight) / model.temperature
        return F.cross_entropy(logits, labels.reshape(-1), ignore_index=PAD, reduction=reduction)

    results = {}
    for name, loss_fn in (("eager", materialized), ("fused", model.loss)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(enc, dec, labels, reduction=reduction)
        loss.sum().backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["eager"][0], results["fused"][0], rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert torch.all(results["fused"][0].view(labels.shape)[3] == 0)
    for n, grad in results["fused"][1].items():
        torch.testing.assert_close(results["eager"][1][n], grad, rtol=1e-4, atol=1e-5, msg=n)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def test_bf16_autocast_step_matches_fp32():
    # One TIGER training step on a fixed batch under CPU bf16 autocast (fp32 master weights) against
    # fp32. Stated tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.002 per
    # operation); after a few layers the loss must agree to 1%, all gradients together to 3% of their
    # norm and each gradient tensor to 10% (small tensors such as biases see the largest relative errors).
    torch.manual_seed(0)
    model = Tiger(VOCAB, d_model=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, d_ff=64, dropout=0.0,
                  temperature=0.7).train()
    enc, labels = _padded_batch(32, seed=3)
    enc, dec = drop_trailing_padding(enc), RecData.decoder_inputs(labels)
    results = {}
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(enc, dec, labels)
        loss.backward()
        assert loss.dtype == torch.float32
        results[amp] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert _relative_error(results[True][0], results[False][0]) < 0.01
    flat = {amp: torch.cat([g.flatten() for g in grads.values()]) for amp, (_, grads) in results.items()}
    assert _relative_error(flat[True], flat[False]) < 0.03
    for n, grad in results[False][1].items():
        assert _relative_error(results[True][1][n], grad) < 0.10, n


def test_precision_setting():
    cpu = torch.device("cpu")
    assert not bf16_autocast("fp32", cpu, 128) and bf16_autocast("bf16", cpu, 32)
    assert bf16_autocast("auto", cpu, 128) == cpu_has_fast_bf16()
    assert not bf16_autocast("auto", cpu, 64)  # small models train faster in fp32 (BENCHMARKS.md)
    with pytest.raises(LetterError, match="precision must be one of"):
        bf16_autocast("fp16", cpu, 128)
