"""k-means (k-means++ seeding + Lloyd steps on the fused nearest-code op), size-bounded assignment
and Sinkhorn-balanced assignment. Used for codebook init, the diversity loss's codebook clusters
and the authors' collision re-assignment."""
import contextlib
import math

import torch

import letter_ext


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest center per row (ties -> lowest index), via residual_quantize with L=1."""
    codes, _ = letter_ext.residual_quantize(x, centers.unsqueeze(0))
    return codes[:, 0]


def inertia(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances of the rows to their assigned centers."""
    return float(((x - centers[labels]) ** 2).sum())


def kmeans_pp_seed(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next center drawn with probability proportional to D(x)^2.

    With fewer distinct points than k, the remaining centers are drawn uniformly (duplicates).
    """
    n = x.shape[0]
    # Draws follow the generator's device (a CUDA generator cannot fill a CPU tensor).
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:
            idx = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centers)


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row of `dist` [n, K] to a column, at most `capacity` rows per column.

    Rounds of proposals: every unassigned row proposes its nearest column that still has room;
    each column accepts its closest proposers up to its remaining room. Each round fills a column
    or places every proposer, so it ends within K + 1 rounds. Deterministic.
    """
    n, k = dist.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters cannot hold {n} rows")
    labels = torch.full((n,), -1, dtype=torch.long, device=dist.device)
    room = torch.full((k,), capacity, dtype=torch.long, device=dist.device)
    while True:
        todo = (labels < 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            return labels
        d = dist[todo].masked_fill((room == 0).unsqueeze(0), float("inf"))
        best_d, choice = d.min(1)
        # Sort proposers by (column, distance) to rank them within their column.
        order = torch.argsort(best_d, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        col = choice[order]
        first_of_col = torch.searchsorted(col, col, right=False)
        rank = torch.arange(col.numel(), device=dist.device) - first_of_col
        take = rank < room[col]
        labels[todo[order[take]]] = col[take]
        room -= torch.bincount(col[take], minlength=k)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    generator: torch.Generator,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then up to `iters` Lloyd steps; returns (centers [k, d], labels [n]).

    The assignment step is letter_ext.residual_quantize with L=1 (no n x k matrix), or with
    `capacity` a size-bounded assignment (balanced_assign). Empty clusters keep their center.
    """
    x = x.detach().float()
    centers = kmeans_pp_seed(x, k, generator)
    labels = None
    for _ in range(max(iters, 1)):
        if capacity is None:
            new = nearest(x, centers)
        else:
            new = balanced_assign(torch.cdist(x, centers) ** 2, capacity)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
    return centers, labels


def diversity_capacity(n: int, k: int) -> int:
    """Cluster size bound for splitting a codebook of n codes into k groups: small enough that
    every group keeps >= 2 members (so each code has a positive besides itself) when feasible."""
    return max(math.ceil(n / k), (n - 2) // (k - 1))


def sinkhorn_assign(dist: torch.Tensor, epsilon: float, iters: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced assignment of rows to columns by Sinkhorn-Knopp on exp(-dist / epsilon).

    dist [R, N]; `groups` [R] (ids 0..G-1) splits the rows into independent problems (solved
    together, without padding). As the authors do, each problem's distances are first rescaled to
    [-1, 1] (so epsilon is scale-free), then rows and columns are normalized alternately; each row
    takes its argmax column. Computed in float64: grouped problems in the log domain, a single one
    as stabilized matrix scaling (the same iteration; no overflow at small epsilon either way).
    """
    with single_thread():
        return _sinkhorn(dist.double(), epsilon, iters, groups)


@contextlib.contextmanager
def single_thread():
    """Run small CPU ops on one intra-op thread: on a busy machine each OpenMP barrier of a
    two-thread op can wait milliseconds for a descheduled core (measured: exp on 900x16 float64
    15 ms with 2 threads vs 0.05 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sinkhorn(d: torch.Tensor, epsilon: float, iters: int, groups: torch.Tensor | None,
              return_log: bool = False) -> torch.Tensor:
    """The log-domain iteration (the spec): per group, rescale, then alternately subtract each
    row's and each group-column's log-sum-exp. One group takes the faster `_sinkhorn_one`."""
    if groups is None and not return_log:
        return _sinkhorn_one(d, epsilon, iters)
    if groups is None:
        groups = torch.zeros(d.shape[0], dtype=torch.long, device=d.device)
    num = int(groups.max()) + 1 if groups.numel() else 0
    lo = torch.full((num,), float("inf"), dtype=d.dtype, device=d.device).scatter_reduce(0, groups, d.amin(1), "amin")
    hi = torch.full((num,), float("-inf"), dtype=d.dtype, device=d.device).scatter_reduce(0, groups, d.amax(1), "amax")
    middle = ((hi + lo) / 2)[groups].unsqueeze(1)
    log_q = -(d - middle) / ((hi[groups].unsqueeze(1) - middle + 1e-5) * epsilon)
    index = groups.unsqueeze(1).expand_as(log_q)
    for _ in range(iters):
        log_q = log_q - _logsumexp(log_q, 1)
        # column normalization within each group: a grouped log-sum-exp over its rows
        m = torch.full((num, d.shape[1]), float("-inf"), dtype=d.dtype, device=d.device)
        m = m.scatter_reduce(0, index, log_q, "amax")
        total = torch.zeros_like(m).scatter_reduce(0, index, _shifted_exp(log_q - m[groups]), "sum")
        log_q = log_q - (m + total.log())[groups]
    return log_q if return_log else log_q.argmax(1)


# Scaling vectors are folded back into the log-domain matrix once one exceeds _SCALING_LIMIT,
# checked every _SCALING_CHECK steps (a host sync each). One step changes u by a factor within
# [1/N, R] and v within [1/R, N] (after a full step, columns sum to 1 and rows to >= 1/R), so
# between checks they stay far below float64 overflow (1e308) for any realistic R and N.
_SCALING_LIMIT = 1e100
_SCALING_CHECK = 8


def _sinkhorn_one(d: torch.Tensor, epsilon: float, iters: int, return_log: bool = False) -> torch.Tensor:
    """`_sinkhorn` with a single group, the training hot path: the same iteration written as
    matrix scaling, q = diag(u) exp(log_q) diag(v), so each step is two matrix-vector products
    instead of two exp passes over [R, N] (10x faster at 1024 x 256). Equal to the log domain up
    to rounding (argmax tested equal). The first step runs in the log domain: afterwards every
    column sums to 1 and every row to >= 1/R, so exp(log_q) has a significant entry in each row
    and column and the scaling vectors stay finite; they are absorbed into log_q (stabilized
    Sinkhorn) before they could overflow."""
    lo, hi = d.amin(), d.amax()
    middle = (hi + lo) / 2
    log_q = -(d - middle) / ((hi - middle + 1e-5) * epsilon)
    if iters == 0:
        return log_q if return_log else log_q.argmax(1)
    log_q = log_q - _logsumexp(log_q, 1)
    log_q = log_q - _logsumexp(log_q, 0)
    kernel = log_q.exp()
    u = torch.ones(d.shape[0], dtype=d.dtype, device=d.device)
    v = torch.ones(d.shape[1], dtype=d.dtype, device=d.device)
    for step in range(1, iters):
        u = 1.0 / (kernel @ v)
        v = 1.0 / (u @ kernel)
        # a tiny u makes the next v large, so the maxima suffice
        due = step % _SCALING_CHECK == 0 and step + 1 < iters
        if due and float(torch.maximum(u.amax(), v.amax())) > _SCALING_LIMIT:
            log_q += u.log().unsqueeze(1) + v.log().unsqueeze(0)
            torch.exp(log_q, out=kernel)
            v = torch.ones_like(v)
    if return_log:
        return log_q + u.log().unsqueeze(1) + v.log().unsqueeze(0)
    return (log_q + v.log().unsqueeze(0)).argmax(1)  # log u is constant along a row


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Stable log-sum-exp keeping `dim`. torch.logsumexp over a short last dimension is ~20x
    slower on CPU than this max-shifted form."""
    m = x.amax(dim, keepdim=True)
    return m + _shifted_exp(x - m).sum(dim, keepdim=True).log()


def _shifted_exp(x: torch.Tensor) -> torch.Tensor:
    """exp of max-shifted values (<= 0). Terms below e^-600 cannot change a sum that holds a 1,
    and clamping them keeps exp out of subnormal doubles, which are ~100x slower on CPUs."""
    return x.clamp(min=-600.0).exp()
