"""Code assignment after training: collision handling and code-usage statistics."""
import math

import numpy as np
import torch

from letter.errors import LetterError

from .clustering import sinkhorn_assign


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose identifier is not unique: (I - #distinct identifiers) / I."""
    if len(codes) == 0:
        return 0.0
    return (len(codes) - len(np.unique(codes, axis=0))) / len(codes)


def colliding_groups(codes: np.ndarray) -> list[np.ndarray]:
    """Groups (item index arrays, ascending) of items sharing one full identifier, in first-item order."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    # one sort of the colliding items by identifier, then a split (linear after the sort; one
    # scan of all items per group would be quadratic on a large catalog)
    colliding = np.flatnonzero(counts[inverse] > 1)
    colliding = colliding[np.argsort(inverse[colliding], kind="stable")]  # ascending items within a group
    bounds = np.flatnonzero(np.diff(inverse[colliding])) + 1
    groups = np.split(colliding, bounds) if len(colliding) else []
    return sorted(groups, key=lambda g: g[0])


def last_level_residuals(z: torch.Tensor, codes: np.ndarray, codebooks: list[torch.Tensor]) -> torch.Tensor:
    """r_{L-1} = z - sum_{l<L-1} C_l[c_l] for each item."""
    c = torch.as_tensor(codes)
    r = z.clone()
    for l, cb in enumerate(codebooks[:-1]):
        r -= cb[c[:, l]]
    return r


def sinkhorn_resolve(
    codes: np.ndarray,
    z: torch.Tensor,
    codebooks: list[torch.Tensor],
    epsilon: float,
    iters: int,
    rounds: int,
    movable: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """The authors' rule: re-assign the last level of each colliding group with a Sinkhorn-balanced
    assignment over that group, up to `rounds` rounds (all groups of a round in one batched
    Sinkhorn). Only `movable` items change (cold start keeps the catalog's codes). Unlike the
    authors' loop, the round with the fewest collisions is returned (a round can create new ones).
    Returns (codes, rounds run)."""
    movable = np.ones(len(codes), bool) if movable is None else movable
    r_last = last_level_residuals(z, codes, codebooks)
    last = codebooks[-1]
    best, best_rate = codes, collision_rate(codes)
    seen = set()  # Sinkhorn is deterministic: a group with the same members gives the same answer
    done = 0  # rounds that ran a Sinkhorn
    for _ in range(rounds):
        groups = []
        for group in colliding_groups(codes):
            members = group[movable[group]]
            key = tuple(members.tolist())
            if len(members) >= 2 and key not in seen:  # a one-row Sinkhorn is uniform: nothing to balance
                seen.add(key)
                groups.append(members)
        if not groups:
            break
        done += 1
        rows = np.concatenate(groups)
        group_of = torch.from_numpy(np.repeat(np.arange(len(groups)), [len(g) for g in groups]))
        dist = torch.cdist(r_last[torch.from_numpy(rows)], last) ** 2
        codes = codes.copy()
        codes[rows, -1] = sinkhorn_assign(dist, epsilon, iters, groups=group_of).numpy()
        rate = collision_rate(codes)
        if rate < best_rate:
            best, best_rate = codes, rate
        if rate == 0:
            break
    return best, done


def make_unique(
    codes: np.ndarray,
    z: torch.Tensor,
    codebooks: list[torch.Tensor],
    movable: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Guarantee unique identifiers by moving colliding items to the nearest unused code.

    In each colliding group the item nearest its quantized vector keeps the code (a fixed item
    always keeps it); each other (movable) item takes the nearest unused last-level code under its
    own prefix; if that prefix is full, it backs off one level at a time and searches deeper
    levels greedily by residual distance. Deterministic. Returns (codes, counts of moves by depth).
    """
    codes = codes.copy()
    movable = np.ones(len(codes), bool) if movable is None else movable
    L = codes.shape[1]
    used = {tuple(c) for c in codes.tolist()}
    moves = {"last_level": 0, "deeper": 0}
    cbs = [cb.detach() for cb in codebooks]
    for group in colliding_groups(codes):
        quant = sum(cbs[l][torch.as_tensor(codes[group, l])] for l in range(L))
        err = dict(zip(group.tolist(), ((z[group] - quant) ** 2).sum(1).tolist()))
        # Fixed items first, then by quantization error: the first one keeps the identifier.
        keep_order = sorted(err, key=lambda i: (bool(movable[i]), err[i], i))
        for item in keep_order[1:]:
            if not movable[item]:
                continue
            new = _nearest_free(z[item], codes[item], cbs, used)
            moves["last_level" if (new[:-1] == codes[item, :-1]).all() else "deeper"] += 1
            codes[item] = new
            used.add(tuple(new.tolist()))
    return codes, moves


def _nearest_free(z: torch.Tensor, code: np.ndarray, cbs: list[torch.Tensor], used: set) -> np.ndarray:
    L = len(cbs)
    for depth in range(L - 1, -1, -1):  # keep code[:depth], search levels depth..L-1
        r = z - sum((cbs[l][int(code[l])] for l in range(depth)), torch.zeros_like(z))
        found = _search(r, list(code[:depth].tolist()), depth, cbs, used)
        if found is not None:
            return np.asarray(found, dtype=np.int64)
    raise LetterError(f"unique identifiers impossible: all {math.prod(cb.shape[0] for cb in cbs)} identifiers of the "
                      "code space are taken (the catalog plus the new items outnumber it)")


def _search(r: torch.Tensor, prefix: list[int], level: int, cbs: list[torch.Tensor], used: set):
    """Depth-first over codes of `level` in order of distance to residual r; first unused identifier."""
    order = torch.argsort(((cbs[level] - r) ** 2).sum(1), stable=True).tolist()
    for j in order:
        if level == len(cbs) - 1:
            if tuple(prefix + [j]) not in used:
                return prefix + [j]
        else:
            found = _search(r - cbs[level][j], prefix + [j], level + 1, cbs, used)
            if found is not None:
                return found
    return None


def level_stats(codes: np.ndarray, sizes: list[int]) -> list[dict]:
    """Per level: codes used, assignment entropy (bits), perplexity 2^H, Gini of code counts."""
    out = []
    for l, n in enumerate(sizes):
        counts = np.bincount(codes[:, l], minlength=n).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        sorted_counts = np.sort(counts)
        cum = np.cumsum(sorted_counts)
        # Gini over all N codes: 0 = perfectly even use, -> 1 = everything on one code.
        gini = float((n + 1 - 2 * (cum / cum[-1]).sum()) / n) if cum[-1] > 0 else 0.0
        out.append(
            {
                "level": l + 1,
                "codebook_size": n,
                "used": int((counts > 0).sum()),
                "entropy_bits": round(entropy, 4),
                "perplexity": round(2.0**entropy, 2),
                "max_entropy_bits": round(math.log2(min(n, len(codes))) if len(codes) else 0.0, 4),
                "gini": round(gini, 4),
            }
        )
    return out
