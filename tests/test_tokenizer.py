"""Unit tests of the LETTER tokenizer pieces: loss terms vs hand computations, STE, clustering,
Sinkhorn, collision handling, statistics, config and input checks."""
import math

import numpy as np
import pytest
import torch

from letter.errors import LetterError
from letter.tokenizer import TokenizerConfig, train_tokenizer
from letter.tokenizer.clustering import balanced_assign, inertia, kmeans, nearest, sinkhorn_assign
from letter.tokenizer.codes import collision_rate, level_stats, make_unique, sinkhorn_resolve
from letter.tokenizer.model import (
    RQVAE,
    collaborative_loss,
    diversity_loss,
    quantization_loss,
    sample_positives,
)

SMALL = dict(layers=[16], e_dim=4, codebook_sizes=[4, 4], clusters=2, epochs=1, batch_size=32)


def test_quantization_loss_matches_hand_computation():
    e = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # B=1, L=2, d=2
    r = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    # codebook term: mean over 4 elements of (e - r)^2 = (1 + 0 + 0.25 + 0.25) / 4 = 0.375; commitment equal
    assert quantization_loss(e, r, mu=0.25).item() == pytest.approx(0.375 * 1.25)


def test_quantization_loss_gradients_go_to_the_right_side():
    e = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    r = torch.tensor([[[2.0, 0.0]]], requires_grad=True)
    quantization_loss(e, r, mu=0.25).backward()
    # d/de mean((e - sg r)^2) = 2(e - r)/2 ; d/dr 0.25 mean((r - sg e)^2) = 0.25 * 2(r - e)/2
    assert torch.allclose(e.grad, torch.tensor([[[-1.0, 0.0]]]))
    assert torch.allclose(r.grad, torch.tensor([[[0.25, 0.0]]]))


def test_collaborative_loss_is_in_batch_infonce():
    g = torch.Generator().manual_seed(0)
    z, h = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    logits = (z.double() @ h.double().T) / 0.5
    expected = sum(-(logits[i, i] - math.log(math.fsum(math.exp(v) for v in logits[i].tolist()))) for i in range(5)) / 5
    assert collaborative_loss(z, h, 0.5).item() == pytest.approx(float(expected), rel=1e-5)


def test_diversity_loss_matches_hand_computation():
    codebook = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])  # pairs: the positive of code 0 is code 1, of code 2 is code 3
    codes = torch.tensor([0, 2])
    e = codebook[codes]
    loss = diversity_loss(e, codes, codebook, labels, torch.rand(2), temperature=1.0)
    expected = 0.0
    for c, pos in ((0, 1), (2, 3)):
        logits = {j: float(codebook[c] @ codebook[j]) for j in range(4) if j != c}
        expected += -(logits[pos] - math.log(sum(math.exp(v) for v in logits.values())))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)


def test_positives_are_other_members_of_the_same_cluster():
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 3])  # code 8 is alone in cluster 3
    codes = torch.arange(9).repeat(50)
    pos, valid = sample_positives(codes, labels, torch.rand(450, generator=torch.Generator(device="cpu").manual_seed(1)))
    ok = valid.numpy()
    assert not ok[codes.numpy() == 8].any() and ok[codes.numpy() != 8].all()
    assert (pos[valid] != codes[valid]).all()
    assert (labels[pos[valid]] == labels[codes[valid]]).all()
    # every other member of cluster 2 (codes 4 and 5) is drawn as the positive of code 0
    assert set(pos[codes == 0].tolist()) == {4, 5}


def test_straight_through_estimator():
    torch.manual_seed(0)
    model = RQVAE(6, TokenizerConfig(**SMALL))
    z = torch.randn(8, 4, requires_grad=True)
    codes, e, residuals, z_hat = model.quantize(z)
    cbs = list(model.codebooks)
    # value: the sum of the selected codes; gradient: identity to z, none to the codebooks
    assert torch.allclose(z_hat, cbs[0][codes[:, 0]] + cbs[1][codes[:, 1]])
    w = torch.randn(8, 4)
    (z_hat * w).sum().backward()
    assert torch.allclose(z.grad, w)
    assert all(cb.grad is None for cb in cbs)
    # codes are the nearest-code search; residual r_1 = z - e_0 with gradient to z only
    assert torch.equal(codes[:, 0], nearest(z.detach(), cbs[0].detach()))
    assert torch.allclose(residuals[:, 1], z - e[:, 0])
    z.grad = None
    residuals[:, 1].sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z)) and all(cb.grad is None for cb in cbs)


def test_sinkhorn_balances_a_skewed_assignment():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(64, 8, generator=g)
    dist[:, 0] -= 1.0  # every row's nearest column is 0
    assert (dist.argmin(1) == 0).all()
    converged = torch.bincount(sinkhorn_assign(dist, 0.003, 500), minlength=8)
    assert converged.tolist() == [8] * 8  # exactly 64 / 8 per column
    # the authors' 50 iterations at eps 0.003 stop early but already spread the rows out
    authors = torch.bincount(sinkhorn_assign(dist, 0.003, 50), minlength=8)
    assert (authors > 0).all() and authors.max() <= 32


def test_training_sinkhorn_leaves_a_one_row_batch_its_nearest_code():
    # a one-row Sinkhorn is uniform over the codes: its argmax was code 0 whatever the distances
    torch.manual_seed(0)
    model = RQVAE(6, TokenizerConfig(**{**SMALL, "codebook_sizes": [8, 8]}))
    for cb in model.codebooks:
        torch.nn.init.normal_(cb)
    z = torch.randn(5, 4)
    for row in range(5):
        balanced, *_ = model.quantize(z[row : row + 1], sinkhorn=True)
        plain, *_ = model.quantize(z[row : row + 1])
        assert torch.equal(balanced, plain)
    assert not (model.quantize(z)[0][:, -1] == 0).all()  # the rows' nearest last-level codes differ from 0


def test_kmeans_init_beats_random_init():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(16, 8, generator=g) * 5
    x = centers[torch.randint(16, (800,), generator=g)] + 0.3 * torch.randn(800, 8, generator=g)
    km_centers, labels = kmeans(x, 16, 20, torch.Generator().manual_seed(1))
    random_centers = x[torch.randperm(800, generator=g)[:16]]
    random_inertia = inertia(x, random_centers, nearest(x, random_centers))
    assert inertia(x, km_centers, labels) < 0.5 * random_inertia
    # Lloyd fixed point: every center is the mean of its members
    for k in range(16):
        if (labels == k).any():
            assert torch.allclose(km_centers[k], x[labels == k].mean(0), atol=1e-4)


def test_balanced_assign_respects_capacity():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(30, 4, generator=g)
    dist[:, 1] -= 1  # all prefer column 1
    labels = balanced_assign(dist, capacity=8)
    assert torch.bincount(labels, minlength=4).max() <= 8 and (labels >= 0).all()
    assert torch.equal(balanced_assign(dist, capacity=30), dist.argmin(1))  # no bound -> argmin


def test_balanced_kmeans_bounds_cluster_sizes():
    x = torch.cat([torch.zeros(90, 2), torch.ones(10, 2)]) + 0.01 * torch.randn(100, 2)
    _, labels = kmeans(x, 4, 10, torch.Generator().manual_seed(0), capacity=25)
    assert torch.bincount(labels, minlength=4).max() <= 25


def _colliding_setup():
    g = torch.Generator().manual_seed(0)
    cbs = [torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)]
    z = torch.randn(12, 3, generator=g)
    codes = np.zeros((12, 2), dtype=np.int64)
    codes[:6] = [1, 2]  # six items on one identifier
    codes[6:] = np.stack([np.arange(6) % 4, np.arange(6) // 4], 1)
    return cbs, z, codes


def test_make_unique_leaves_no_collision_and_prefers_the_last_level():
    cbs, z, codes = _colliding_setup()
    assert collision_rate(codes) > 0
    fixed, moves = make_unique(codes, z, cbs)
    assert collision_rate(fixed) == 0
    # 5 of the 6 items move; prefix [1] has only 4 last-level codes, so at least 2 move deeper
    assert moves["last_level"] + moves["deeper"] == 5 and moves["deeper"] >= 2
    unchanged = (fixed == codes).all(1)
    assert unchanged[6:].all() and unchanged[:6].sum() == 1


def test_make_unique_never_moves_fixed_items():
    cbs, z, codes = _colliding_setup()
    movable = np.ones(12, bool)
    movable[:5] = False  # five fixed items share one identifier; only item 5 may move
    fixed, _ = make_unique(codes, z, cbs, movable)
    assert (fixed[:5] == codes[:5]).all() and not (fixed[5] == codes[5]).all()


def test_sinkhorn_resolve_only_touches_the_last_level_of_movable_items():
    cbs, z, codes = _colliding_setup()
    movable = np.ones(12, bool)
    movable[0] = False
    out, rounds = sinkhorn_resolve(codes, z, cbs, 0.003, 50, rounds=20, movable=movable)
    assert rounds >= 1 and (out[:, 0] == codes[:, 0]).all() and (out[0] == codes[0]).all()
    assert collision_rate(out[:6]) < collision_rate(codes[:6])


def test_level_stats_by_hand():
    codes = np.array([[0, 3], [0, 3], [1, 3], [1, 3]])
    s1, s2 = level_stats(codes, [4, 4])
    assert s1["used"] == 2 and s1["entropy_bits"] == pytest.approx(1.0) and s1["perplexity"] == pytest.approx(2.0)
    assert s2["used"] == 1 and s2["entropy_bits"] == 0.0
    # Gini of counts [0, 0, 2, 2] over 4 codes is 0.5; of [0, 0, 0, 4] it is 0.75
    assert s1["gini"] == pytest.approx(0.5) and s2["gini"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kwargs, cf, message",
    [
        ({}, np.zeros((9, 4), np.float32), "9 rows"),
        ({}, np.zeros((10, 5), np.float32), "CF embedding dim 5 != e_dim 4"),
        ({"unique": True, "codebook_sizes": [3, 3], "beta": 0}, np.zeros((10, 4), np.float32), "smaller than the 10 items"),
        ({"clusters": 3}, np.zeros((10, 4), np.float32), "clusters must be"),
        ({"alpha": 0.1}, None, "needs CF embeddings"),
        ({"lr": 0}, np.zeros((10, 4), np.float32), "lr must be > 0"),
        ({"method": "rqkmeans", "pca_dim": 7}, None, r"pca_dim must be in \[1, 6\]"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, kwargs, cf, message):
    cfg = TokenizerConfig(**{**SMALL, **kwargs})
    with pytest.raises(LetterError, match=message):
        train_tokenizer(cfg, np.random.rand(10, 6), cf, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_nan_rows_are_named(tmp_path):
    text = np.random.rand(10, 6)
    text[3, 2] = np.nan
    with pytest.raises(LetterError, match=r"1 row\(s\) contain NaN/inf \(as float32\), e.g. item\(s\) \[3\]"):
        train_tokenizer(TokenizerConfig(**SMALL, alpha=0), text, None, str(tmp_path / "run"))
    text[3, 2] = 1e39  # finite in float64, inf in the float32 the tokenizer computes in
    with pytest.raises(LetterError, match=r"1 row\(s\) contain NaN/inf \(as float32\), e.g. item\(s\) \[3\]"):
        train_tokenizer(TokenizerConfig(**SMALL, alpha=0), text, None, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(LetterError, match="has 10 rows but the dataset has 11"):
        train_tokenizer(TokenizerConfig(**SMALL, alpha=0), np.random.rand(10, 6), None, str(tmp_path / "r"), num_items=11)


def test_divergence_within_an_epoch_is_a_clean_error(tmp_path):
    # lr 1e30 overflows the weights at the first step: the next batch's latents are inf
    cfg = TokenizerConfig(**{**SMALL, "batch_size": 4}, alpha=0, lr=1e30)
    with pytest.raises(LetterError, match="training diverged: the latents or codebooks hold NaN/inf; lower lr"):
        train_tokenizer(cfg, np.random.rand(10, 6), None, str(tmp_path / "run"))


def test_complex_embeddings_are_refused(tmp_path):
    # a complex .npy would lose its imaginary parts in the float32 copy, silently
    text = np.random.rand(10, 6) + 1j * np.random.rand(10, 6)
    with pytest.raises(LetterError, match="text embeddings: expected real numbers, got dtype complex128"):
        train_tokenizer(TokenizerConfig(**SMALL, alpha=0), text, None, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_config_file_round_trip_and_unknown_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("alpha: 0.5\ncodebook_sizes: [8, 8]\nclusters: 4\n")
    cfg = TokenizerConfig.from_file(str(path))
    assert cfg.alpha == 0.5 and cfg.codebook_sizes == [8, 8] and cfg.beta == 1e-4
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    path.write_text('{"alpah": 1}')
    with pytest.raises(LetterError, match="unknown setting"):
        TokenizerConfig.from_file(str(path))


def test_grouped_sinkhorn_equals_separate_problems():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(5, 6, generator=g), torch.rand(3, 6, generator=g) * 10
    joint = sinkhorn_assign(torch.cat([a, b]), 0.01, 50, groups=torch.tensor([0] * 5 + [1] * 3))
    assert torch.equal(joint, torch.cat([sinkhorn_assign(a, 0.01, 50), sinkhorn_assign(b, 0.01, 50)]))


def test_sinkhorn_resolve_counts_the_rounds_it_ran():
    cbs, z, codes = _colliding_setup()
    unique = np.stack([np.arange(12) % 4, np.arange(12) // 4], 1)
    out, rounds = sinkhorn_resolve(unique, z, cbs, 0.003, 50, rounds=20)
    assert rounds == 0 and np.array_equal(out, unique)  # nothing collides: no round
    # a group that Sinkhorn cannot split (one fixed, one movable member: a one-row problem) runs none
    pair = unique.copy()
    pair[1] = pair[0]
    movable = np.ones(12, bool)
    movable[0] = False
    out, rounds = sinkhorn_resolve(pair, z, cbs, 0.003, 50, rounds=20, movable=movable)
    assert rounds == 0 and np.array_equal(out, pair)
