"""The tokenizer's speed changes keep its results: bit for bit, or (Sinkhorn) up to rounding
that leaves every assignment and so the training run unchanged."""
import json

import numpy as np
import pytest
import torch

from letter_ext.bench.common import cpu_model

from letter.tokenizer import TokenizerConfig, clustering, train_tokenizer
from letter.tokenizer.clustering import _sinkhorn, _sinkhorn_one, sinkhorn_assign
from letter.tokenizer.inference import encode_all
from letter.tokenizer.model import RQVAE
from letter.tokenizer.train import _state_copy


def _spec_log_q(d, epsilon, iters):
    """The log-domain iteration (grouped code path, one group): the spec of the scaling form."""
    return _sinkhorn(d, epsilon, iters, torch.zeros(d.shape[0], dtype=torch.long), return_log=True)


# limit 10: the scaling vectors are absorbed at (almost) every check
@pytest.mark.parametrize("limit, check", [(1e100, 8), (10.0, 1), (10.0, 8)])
def test_scaling_sinkhorn_matches_the_log_domain(monkeypatch, limit, check):
    monkeypatch.setattr(clustering, "_SCALING_LIMIT", limit)
    monkeypatch.setattr(clustering, "_SCALING_CHECK", check)
    gen = torch.Generator().manual_seed(0)
    cases = [(1024, 256, 8, 0.003, 50), (37, 5, 8, 0.003, 50), (300, 64, 8, 0.1, 50), (1, 3, 8, 0.003, 50),
             (255, 16, 3, 1.0, 50), (257, 255, 8, 1e-4, 50), (300, 64, 2, 1e-5, 80), (7, 7, 4, 0.003, 1),
             (7, 7, 4, 0.003, 2), (1024, 256, 32, 0.003, 0)]
    for rows, cols, dim, eps, iters in cases:
        d = torch.cdist(torch.randn(rows, dim, generator=gen), torch.randn(cols, dim, generator=gen)).double() ** 2
        spec = _spec_log_q(d, eps, iters)
        fast = _sinkhorn_one(d, eps, iters, return_log=True)
        assert torch.isfinite(fast).all()
        tol = 1e-12 * max(1.0, 2 / eps)  # log q spans up to 2/eps: agreement to ~1e-13 of that range
        torch.testing.assert_close(fast, spec, rtol=0, atol=tol)
        picked = _sinkhorn_one(d, eps, iters)
        assert torch.equal(sinkhorn_assign(d, eps, iters), picked)
        # the same column, or one tied with the spec's best to rounding (tiny eps converges to
        # exact ties such as q = 1/2, 1/2)
        differs = picked != spec.argmax(1)
        assert differs.sum() <= max(3, rows // 50), (rows, cols, eps, iters)
        best = spec.amax(1)
        assert (spec.gather(1, picked.unsqueeze(1)).squeeze(1)[differs] >= best[differs] - tol).all()
        if eps >= 1e-3:
            assert not differs.any(), (rows, cols, eps, iters)


def test_scaling_sinkhorn_leaves_training_unchanged(monkeypatch, tmp_path):
    """Sinkhorn only picks each row's argmax: with the log-domain spec in its place the seeded run
    gives the same codes and losses."""
    rng = np.random.default_rng(0)
    text = (rng.standard_normal((400, 8)) @ rng.standard_normal((8, 48))).astype(np.float32)
    cf = rng.standard_normal((400, 8)).astype(np.float32)
    config = TokenizerConfig(layers=[32], e_dim=8, codebook_sizes=[16, 16, 16], clusters=4, batch_size=128,
                             epochs=8, kmeans_iters=5)
    fast = train_tokenizer(config, text, cf, str(tmp_path / "fast"))
    monkeypatch.setattr(clustering, "_sinkhorn_one",
                        lambda d, eps, iters, return_log=False: _spec_log_q(d, eps, iters).argmax(1))
    spec = train_tokenizer(config, text, cf, str(tmp_path / "spec"))
    assert np.array_equal(np.load(tmp_path / "fast" / "codes.npy"), np.load(tmp_path / "spec" / "codes.npy"))
    assert fast["final_losses"] == spec["final_losses"]


def test_standardized_once_gives_the_same_forward_and_codes():
    torch.manual_seed(0)
    config = TokenizerConfig(layers=[32, 16], e_dim=8, codebook_sizes=[8, 8, 8])
    model = RQVAE(24, config)
    x = torch.randn(300, 24) * 3 + 1
    model.fit_input_scaling(x)
    xs = model.standardize(x)
    idx = torch.randperm(300)[:64]
    a, b = model(x[idx], sinkhorn=True), model(xs[idx], sinkhorn=True, standardized=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert np.array_equal(encode_all(model, xs, batch=128, standardized=True)[0], encode_all(model, x, batch=128)[0])
    copy = _state_copy(model)
    assert copy.keys() == model.state_dict().keys()
    assert all(torch.equal(copy[k], v) and copy[k].data_ptr() != v.data_ptr() for k, v in model.state_dict().items())


def test_bench_out_onto_a_dataset_file_is_refused_before_any_benchmark_runs(tmp_path, capsys):
    """python -m letter.bench --out DATA/Synth.inter.json: refused (as `letter bench kernels/serve
    --out`) before the first benchmark, the dataset's file unchanged."""
    from letter.bench.__main__ import main
    from letter.data import make_synthetic, write_letter

    write_letter(make_synthetic(num_users=20, num_items=40, num_categories=4, seed=0), str(tmp_path))
    inter = tmp_path / "Synth.inter.json"
    before = inter.read_bytes()
    with pytest.raises(SystemExit) as stop:
        main(["tokenizer_epoch", "--out", str(inter), "--tok-items", "40", "--tok-text-dim", "8",
              "--tok-epochs", "1", "--tok-rounds", "1", "--tok-kmeans-iters", "1"])
    printed = capsys.readouterr()
    assert stop.value.code == 2 and "a dataset's file" in printed.err and "== tokenizer_epoch" not in printed.out
    assert inter.read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["rec_throughput", "--rec-steps", "0"], "--rec-steps: must be >= 1, got 0"),
    (["rec_throughput", "--rec-warmup", "-1"], "--rec-warmup: must be >= 0, got -1"),
    (["tokenizer_epoch", "--tok-epochs", "two"], "--tok-epochs: not an integer: 'two'"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
])
def test_bench_counts_out_of_range_are_usage_errors(argv, message, capsys):
    """A count of 0 (e.g. --rec-steps 0 divided by zero after loading its data) is refused up front."""
    from letter.bench.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    printed = capsys.readouterr()
    assert stop.value.code == 2 and message in printed.err and "==" not in printed.out


def test_tokenizer_epoch_benchmark_splits_epochs_into_steps_and_evaluation(tmp_path):
    from letter.bench.__main__ import main

    out = tmp_path / "bench.json"
    result = main(["tokenizer_epoch", "--out", str(out), "--tok-items", "300", "--tok-text-dim", "64",
                   "--tok-epochs", "2", "--tok-rounds", "2", "--tok-kmeans-iters", "2"])["tokenizer_epoch"]
    assert len(result["bare_mlp_epoch_s"]) == len(result["tokenizer_steps_s"]) == len(result["tokenizer_eval_s"]) == 4
    assert result["default_eval_interval"] == TokenizerConfig().epochs // 10
    steps, evaluation, ckpt, bare = (result[k] for k in ("tokenizer_steps_median_s", "tokenizer_eval_median_s",
                                                          "checkpoint_amortized_s", "bare_mlp_epoch_median_s"))
    for key, every in [("ratio", result["default_eval_interval"]), ("ratio_eval_every_epoch", 1)]:
        assert abs(result[key] - (steps + evaluation / every + ckpt) / bare) < 1e-3 * result[key] + 1e-3
    assert result["ratio_eval_every_epoch"] > result["ratio"] > result["ratio_steps_only"] > 0
    assert out.exists()
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpu"] == cpu_model() and machine["cpu"]  # the CPU model, as every benchmark JSON records it
