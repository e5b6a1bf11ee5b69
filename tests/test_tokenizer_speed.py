"""The tokenizer's speed changes keep its results bit for bit."""
import numpy as np
import torch

from letter.tokenizer import TokenizerConfig
from letter.tokenizer.clustering import _sinkhorn, _sinkhorn_one, sinkhorn_assign
from letter.tokenizer.inference import encode_all
from letter.tokenizer.model import RQVAE
from letter.tokenizer.train import _eval_codes, _state_copy


def _grouped_log_q(d, epsilon, iters):
    """The grouped Sinkhorn with one group (the path every training batch took before)."""
    groups = torch.zeros(d.shape[0], dtype=torch.long)
    num = 1
    lo = torch.full((num,), float("inf"), dtype=d.dtype).scatter_reduce(0, groups, d.amin(1), "amin")
    hi = torch.full((num,), float("-inf"), dtype=d.dtype).scatter_reduce(0, groups, d.amax(1), "amax")
    middle = ((hi + lo) / 2)[groups].unsqueeze(1)
    log_q = -(d - middle) / ((hi[groups].unsqueeze(1) - middle + 1e-5) * epsilon)
    index = groups.unsqueeze(1).expand_as(log_q)
    for _ in range(iters):
        m = log_q.amax(1, keepdim=True)
        log_q = log_q - (m + (log_q - m).clamp(min=-600.0).exp().sum(1, keepdim=True).log())
        cm = torch.full((num, d.shape[1]), float("-inf"), dtype=d.dtype).scatter_reduce(0, index, log_q, "amax")
        total = torch.zeros_like(cm).scatter_reduce(0, index, (log_q - cm[groups]).clamp(min=-600.0).exp(), "sum")
        log_q = log_q - (cm + total.log())[groups]
    return log_q


def test_single_group_sinkhorn_is_bit_identical():
    gen = torch.Generator().manual_seed(0)
    for rows, cols, eps in [(1024, 256, 0.003), (37, 5, 0.003), (300, 64, 0.1), (1, 3, 0.003), (200, 16, 1.0)]:
        d = torch.cdist(torch.randn(rows, 8, generator=gen), torch.randn(cols, 8, generator=gen)).double() ** 2
        assert torch.equal(_sinkhorn_one(d, eps, 50, return_log=True), _grouped_log_q(d, eps, 50))
        assert torch.equal(sinkhorn_assign(d, eps, 50), _sinkhorn(d, eps, 50, torch.zeros(rows, dtype=torch.long)))


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
    assert np.array_equal(_eval_codes(model, xs, True, batch=128), encode_all(model, x, batch=128)[0])
    copy = _state_copy(model)
    assert copy.keys() == model.state_dict().keys()
    assert all(torch.equal(copy[k], v) and copy[k].data_ptr() != v.data_ptr() for k, v in model.state_dict().items())
