import pytest
import torch
import torch.nn.functional as F

import letter_ext
from letter_ext import reference


def make_inputs(B, M, d, *, seed, exclude=False, bias=False, ignore=False, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(B, d, generator=gen, dtype=dtype)
    keys = scale * torch.randn(M, d, generator=gen, dtype=dtype)
    targets = torch.randint(0, M, (B,), generator=gen)
    excl = None
    if exclude and M > 1:
        # a key other than the target, or -1 on some rows
        shift = torch.randint(1, M, (B,), generator=gen)
        excl = (targets + shift) % M
        excl[torch.rand(B, generator=gen) < 0.25] = -1
    if ignore:
        targets[torch.rand(B, generator=gen) < 0.3] = -100
    b = torch.randn(M, generator=gen, dtype=dtype) if bias else None
    return q, keys, targets, excl, b


def torch_cross_entropy(q, keys, targets, temperature, exclude, bias, reduction):
    """Independent spec: F.cross_entropy on explicitly built float64 logits."""
    logits = q.double() @ keys.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    if exclude is not None:
        for i, e in enumerate(exclude.tolist()):
            if e >= 0:
                logits[i, e] = float("-inf")
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("exclude,bias,ignore", [(False, False, False), (True, True, True)])
def test_reference_matches_torch_cross_entropy(reduction, exclude, bias, ignore):
    q, keys, targets, excl, b = make_inputs(13, 29, 7, seed=0, exclude=exclude, bias=bias, ignore=ignore)
    got = letter_ext.dot_product_cross_entropy(
        q.double(), keys.double(), targets, temperature=0.7, exclude=excl,
        bias=None if b is None else b.double(), reduction=reduction, backend="reference",
    )
    want = torch_cross_entropy(q, keys, targets, 0.7, excl, b, reduction)
    torch.testing.assert_close(got, want)


def test_info_nce_is_in_batch_cross_entropy():
    z, h, *_ = make_inputs(9, 9, 5, seed=1)
    want = F.cross_entropy((z @ h.T) / 0.3, torch.arange(9))
    torch.testing.assert_close(letter_ext.info_nce(z, h, 0.3), want)
    sym = 0.5 * (want + F.cross_entropy((h @ z.T) / 0.3, torch.arange(9)))
    torch.testing.assert_close(letter_ext.info_nce(z, h, 0.3, symmetric=True), sym)


def test_codebook_diversity_loss_excludes_the_selected_code():
    gen = torch.Generator().manual_seed(2)
    codebook = torch.randn(11, 4, generator=gen)
    selected_idx = torch.randint(0, 11, (6,), generator=gen)
    positives = (selected_idx + 3) % 11
    selected = codebook[selected_idx]
    logits = selected @ codebook.T / 0.5
    logits[torch.arange(6), selected_idx] = float("-inf")
    want = F.cross_entropy(logits, positives)
    got = letter_ext.codebook_diversity_loss(selected, codebook, positives, selected_idx, 0.5)
    torch.testing.assert_close(got, want)


def test_all_rows_ignored_mean_is_nan_like_torch():
    q, keys, targets, _, _ = make_inputs(3, 4, 2, seed=3)
    targets[:] = -100
    assert torch.isnan(letter_ext.dot_product_cross_entropy(q, keys, targets))
    assert letter_ext.dot_product_cross_entropy(q, keys, targets, reduction="sum") == 0


Q, K, T = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize(
    "args,kwargs,exc,words",
    [
        ((torch.zeros(3), K, T), {}, ValueError, "q must be"),
        ((Q, torch.zeros(5), T), {}, ValueError, "keys must be"),
        ((Q, torch.zeros(0, 4), T), {}, ValueError, "M >= 1"),
        ((Q, torch.zeros(5, 3), T), {}, ValueError, "does not match q dim"),
        ((Q, K.double(), T), {}, ValueError, "keys dtype"),
        ((Q, K.to("meta"), T), {}, ValueError, "keys is on"),
        ((Q.long(), K, T), {}, TypeError, "q must be a floating"),
        ((Q, K, T.int()), {}, TypeError, "targets must be an int64"),
        ((Q, K, T[:2]), {}, ValueError, "targets must be"),
        ((Q, K, torch.tensor([0, 5, 1])), {}, ValueError, "targets must be in"),
        ((Q, K, torch.tensor([0, -1, 1])), {}, ValueError, "targets must be in"),
        ((Q, K, T), {"temperature": 0.0}, ValueError, "temperature"),
        ((Q, K, T), {"temperature": -1.0}, ValueError, "temperature"),
        ((Q, K, T), {"temperature": "hot"}, TypeError, "temperature"),
        ((Q, K, T), {"reduction": "max"}, ValueError, "reduction"),
        ((Q, K, T), {"exclude": torch.tensor([1, 2, -2])}, ValueError, "exclude must be in"),
        ((Q, K, T), {"exclude": torch.tensor([1, 0, 2])}, ValueError, r"targets\[1\] is excluded"),
        ((Q, torch.zeros(1, 4), T), {"exclude": torch.tensor([-1, 0, -1])}, ValueError, "every key"),
        ((Q, K, T), {"exclude": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "exclude must be an int64"),
        ((Q, K, T), {"bias": torch.zeros(4)}, ValueError, "bias must be"),
        ((Q, K, T), {"bias": torch.zeros(5, dtype=torch.float64)}, ValueError, "bias dtype"),
        ((Q, K, T), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ((torch.full((3, 4), float("nan")), K, T), {}, ValueError, "q contains NaN"),
        ((Q, K, T), {"bias": torch.full((5,), float("inf"))}, ValueError, "bias contains NaN"),
    ],
)
def test_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        letter_ext.dot_product_cross_entropy(*args, **kwargs)
