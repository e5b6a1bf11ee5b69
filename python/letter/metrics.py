"""Top-K ranking metrics with one relevant item per user (leave-one-out)."""
import torch


def hits_from_topk(topk: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bool [U, K]: topk[u, k] == targets[u]. Empty slots (-1) never hit."""
    if topk.dim() != 2 or targets.dim() != 1 or topk.shape[0] != targets.shape[0]:
        raise ValueError(f"need topk [U, K] and targets [U], got {tuple(topk.shape)} and {tuple(targets.shape)}")
    return (topk == targets.unsqueeze(1)) & (topk >= 0)


def per_user_metrics(hits: torch.Tensor, ks=(5, 10)) -> dict[str, torch.Tensor]:
    """Recall@k (0/1) and NDCG@k (1/log2(rank+2) at the first hit, rank 0-based) of every user:
    float64 [U] per metric. Only the first hit of a row counts, so a caller may mark several slots
    (e.g. all items sharing a generated code) without inflating the score."""
    if hits.dim() != 2:
        raise ValueError(f"hits must be [U, K], got {tuple(hits.shape)}")
    width = hits.shape[1]
    if max(ks) > width:
        raise ValueError(f"need at least {max(ks)} ranked slots, got {width}")
    hits = hits.bool()
    any_hit = hits.any(dim=1)
    first = torch.where(any_hit, hits.float().argmax(dim=1), torch.full_like(any_hit, width, dtype=torch.long))
    out = {}
    for k in ks:
        within = first < k
        out[f"recall@{k}"] = within.double()
        gain = 1.0 / torch.log2(first.double() + 2.0)
        out[f"ndcg@{k}"] = torch.where(within, gain, torch.zeros((), dtype=torch.double))
    return out


def metrics_from_hits(hits: torch.Tensor, ks=(5, 10)) -> dict[str, float]:
    """Recall@k and NDCG@k (see per_user_metrics) averaged over users."""
    values = per_user_metrics(hits, ks)
    denom = max(hits.shape[0], 1)
    return {name: v.sum().item() / denom for name, v in values.items()}


def standard_errors(hits: torch.Tensor, ks=(5, 10)) -> dict[str, float | None]:
    """Standard error of each metric of metrics_from_hits as an estimate of its mean over the users'
    population: sample standard deviation of the per-user values / sqrt(users); None below 2 users
    (undefined; null in the JSON outputs, which NaN would make invalid JSON).
    It says how far a metric measured on these users may be from the same model's metric on others,
    i.e. which differences between two validations are noise."""
    n = hits.shape[0]
    if n < 2:
        return {name: None for name in per_user_metrics(hits, ks)}
    return {name: (v.std(unbiased=True) / n ** 0.5).item() for name, v in per_user_metrics(hits, ks).items()}


def ranking_metrics(topk: torch.Tensor, targets: torch.Tensor, ks=(5, 10)) -> dict[str, float]:
    """Metrics of ranked item ids topk [U, K] (-1 = empty slot) against targets [U]."""
    return metrics_from_hits(hits_from_topk(topk, targets), ks)


def metric_sums(hits: torch.Tensor, ks=(5, 10)) -> dict[str, float]:
    """Per-metric sums (not means) over the rows, for combining shards: divide by the total users."""
    means = metrics_from_hits(hits, ks)
    return {key: value * hits.shape[0] for key, value in means.items()}



def normalized_mutual_info(a, b) -> float:
    """NMI of two labelings of the same items: 2 I(A; B) / (H(A) + H(B)) (arithmetic-mean
    normalization), in [0, 1]; 1.0 when both labelings are constant."""
    import numpy as np

    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.size == 0:
        return float("nan")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia.reshape(-1), ib.reshape(-1)), 1)
    p = joint / a.size
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa * np.log(pa)).sum())
    hb = float(-(pb * np.log(pb)).sum())
    if ha + hb == 0:
        return 1.0
    return max(0.0, min(1.0, 2 * mi / (ha + hb)))
