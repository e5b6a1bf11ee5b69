"""Pure-torch references of every LETTER op: the specification the kernels are tested against.

They materialize whatever is convenient (distance matrices, logits) and are differentiable through
plain autograd. Pass float64 tensors to get a float64 reference.
"""
import torch


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the ops compute in for inputs of t's dtype: fp64 for fp64, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def residual_quantize_dtype(x: torch.Tensor, codebooks: torch.Tensor) -> torch.dtype:
    """residual_quantize computes in fp64 if x or codebooks is fp64 (as the CPU kernel), else fp32."""
    return torch.promote_types(accumulation_dtype(x), accumulation_dtype(codebooks))


def residual_quantize(x: torch.Tensor, codebooks: torch.Tensor, return_residuals: bool = False):
    """Residual nearest-code search.

    r_0 = x; c_l = argmin_j ||r_l - C_l[j]||^2 (ties -> lowest j); r_{l+1} = r_l - C_l[c_l].
    Returns (codes [B, L] int64, quantized = sum_l C_l[c_l] [B, d] in x's dtype,
    residuals [B, L, d] (r_0..r_{L-1}) or an empty tensor).
    """
    dt = residual_quantize_dtype(x, codebooks)
    cb = codebooks.to(dt)
    r = x.to(dt)
    codes, residuals = [], []
    quantized = torch.zeros_like(r)
    for level in cb:
        residuals.append(r)
        dist = (r * r).sum(1, keepdim=True) - 2 * r @ level.T + (level * level).sum(1)[None, :]
        code = dist.argmin(1)  # first minimum on ties
        chosen = level[code]
        codes.append(code)
        quantized = quantized + chosen
        r = r - chosen
    codes_t = torch.stack(codes, 1) if codes else x.new_zeros((x.shape[0], 0), dtype=torch.long)
    res = torch.stack(residuals, 1).to(x.dtype) if return_residuals else x.new_empty(0)
    return codes_t, quantized.to(x.dtype), res


def dot_product_cross_entropy_rows(
    q: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
):
    """Softmax cross-entropy over dot products, materializing the B x M logits.

    logits_ij = (q_i . k_j + bias_j) / temperature, with logits_i,exclude_i = -inf;
    loss_i = logsumexp_j logits_ij - logits_i,targets_i, and 0 where targets_i == ignore_index.
    Returns (loss_rows [B], lse [B]) in the accumulation dtype (fp64 for fp64 q, else fp32),
    differentiable through plain autograd.
    """
    dt = accumulation_dtype(q)
    logits = q.to(dt) @ keys.to(dt).T
    if bias is not None:
        logits = logits + bias.to(dt)[None, :]
    logits = logits / temperature
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0)[:, 0]
        logits = logits.index_put((rows, exclude[rows]), torch.tensor(float("-inf"), dtype=dt, device=q.device))
    lse = torch.logsumexp(logits, dim=1)
    valid = targets != ignore_index
    target_logit = logits.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    loss_rows = torch.where(valid, lse - torch.where(valid, target_logit, 0.0), 0.0)
    return loss_rows, lse


def nonfinite_logits_error(row: int, k_in: int) -> ValueError:
    """The error of every constrained_beam_step backend for a live beam's logits row with NaN or +inf."""
    return ValueError(
        f"constrained_beam_step: logits row {row} (batch row {row // k_in}, beam {row % k_in}) of a live "
        "beam contains NaN or +inf; its log-probabilities are undefined"
    )


def constrained_beam_step(
    logits, beam_scores, nodes, row_ptr, child_token, num_beams: int, banned_ptr=None, banned_node=None
):
    """One step of trie-constrained beam search (the spec of letter::constrained_beam_step).

    logits [B*K_in, V] (row b*K_in + k belongs to beam k of batch row b), beam_scores [B, K_in],
    nodes [B, K_in] (trie node of each beam at this level), row_ptr/child_token: this level's CSR.
    Candidate (k, token) of row b scores beam_scores[b, k] + log_softmax(logits[b*K_in + k])[token]
    for every child token of nodes[b, k]; beams scored -inf have no candidates (their logits are
    never looked at), nor do candidates scoring -inf or NaN. A live beam whose logits hold NaN or
    +inf (log_softmax undefined) raises nonfinite_logits_error for the first such row; -inf logits
    are impossible tokens, and an all -inf row has no candidates. Keeps the num_beams best per row,
    best first, ties -> lowest (k, token). Returns (scores [B, num_beams] (fp64 for fp64 logits,
    else fp32), parent [B, num_beams], token, node (child node id = edge index)); empty slots:
    (-inf, 0, -1, -1).

    Bans: banned_ptr [B + 1] / banned_node [nnz] (both or neither), a CSR of child node ids per
    batch row, in any order, duplicates allowed: a candidate whose child node is among
    banned_node[banned_ptr[b]:banned_ptr[b + 1]] is no candidate of row b. Scores are unchanged
    (log_softmax still runs over the full row); the next best allowed candidates fill the slots.
    """
    batch, k_in = beam_scores.shape
    vocab = logits.shape[1]
    dt = accumulation_dtype(logits)
    lse = torch.logsumexp(logits.to(dt), dim=1)  # NaN or +inf exactly when the row holds NaN or +inf
    bad = (beam_scores.reshape(-1) > float("-inf")) & ~(lse < float("inf"))
    if bool(bad.any()):
        raise nonfinite_logits_error(int(bad.nonzero()[0, 0]), k_in)
    logp = torch.log_softmax(logits.to(dt), dim=1).view(batch, k_in, vocab)
    out_scores = torch.full((batch, num_beams), float("-inf"), dtype=dt, device=logits.device)
    out_parent = torch.zeros((batch, num_beams), dtype=torch.long, device=logits.device)
    out_token = torch.full((batch, num_beams), -1, dtype=torch.long, device=logits.device)
    out_node = torch.full((batch, num_beams), -1, dtype=torch.long, device=logits.device)
    for b in range(batch):
        scores, parents, tokens, edges = [], [], [], []
        for k in range(k_in):
            beam_score = beam_scores[b, k].to(dt)
            if not beam_score > float("-inf"):
                continue
            node = int(nodes[b, k])
            edge = torch.arange(int(row_ptr[node]), int(row_ptr[node + 1]), device=logits.device)
            token = child_token[edge]
            scores.append(beam_score + logp[b, k, token])
            parents.append(torch.full_like(edge, k))
            tokens.append(token)
            edges.append(edge)
        if not scores:
            continue
        score, parent, token, edge = (torch.cat(t) for t in (scores, parents, tokens, edges))
        keep = score > float("-inf")  # also drops NaN
        if banned_ptr is not None:
            keep &= ~torch.isin(edge, banned_node[int(banned_ptr[b]) : int(banned_ptr[b + 1])])
        score, parent, token, edge = score[keep], parent[keep], token[keep], edge[keep]
        # Order by (k, token), then a stable sort by score: equal scores keep (k, token) order.
        by_key = torch.argsort(parent * vocab + token)
        by_score = torch.sort(score[by_key], descending=True, stable=True).indices[:num_beams]
        chosen = by_key[by_score]
        n = chosen.numel()
        out_scores[b, :n] = score[chosen]
        out_parent[b, :n] = parent[chosen]
        out_token[b, :n] = token[chosen]
        out_node[b, :n] = edge[chosen]
    return out_scores, out_parent, out_token, out_node
