"""Benchmark of constrained_beam_step: the HF-style prefix_allowed_tokens_fn baseline, the
vectorized pure-torch gather (STATIC-style) and the fused backends, per level and for a whole
L-level search, in the same run; on CPU the whole search also once per instruction set the machine
runs (cpu_avx2, cpu_avx512: letter_ext.set_isa). Also times the trie build.

Shapes: B=256 users, K=20 beams, L=4 levels of 256 codes (V = 1024 code tokens + 3 specials),
random uniform codes, catalogs of 10k, 100k and 1M items. Logits are random (model time excluded);
every method gets the same logits and the same beam states (those of the fused search).

Exclusion rows: the fused whole search without bans (None), with an empty ban CSR, and with
HISTORY banned leaves per user, taken from that user's top results of the unbanned search (so
every ban removes a result the search has to replace), timed interleaved in the same run; plus
the cost of TrieLevels.banned_nodes, which turns the banned leaves into per-level bans once.
"""
import time

import torch

from .._backend import has_compiled_op, triton_usable
from ..baselines import torch_gather_step
from ..hf_decoding import dict_trie, hf_style_step, prefix_allowed_tokens_fn
from ..constrained_beam_step import constrained_beam_step
from ..trie import build_trie_levels
from .common import bench_isas, interleaved_medians, median_time, sync, with_isa

B, K, L, CODES, SPECIALS = 256, 20, 4, 256, 3
HISTORY = 20  # banned leaves per user in the exclusion rows
# Millisecond methods get many repeats: their medians are what the ratios divide by, and a shared
# machine's noise is larger than the per-call time.
FAST_REPEAT = 31
QUICK_REPEAT = 3  # --quick: a smoke run of every row


def _fused_search(logits, trie, backend, states=None, bans=None):
    """Chained fused steps (no token history: the trie node is the whole decoding state); appends
    each level's input (beam_scores, nodes, history) to `states` when given; bans: per level
    (banned_ptr, banned_node). Returns the final (beam_scores, leaves)."""
    beam_scores = torch.zeros(B, 1, device=logits[0].device)
    nodes = torch.zeros(B, 1, dtype=torch.long, device=beam_scores.device)
    history = torch.empty(B, 0, dtype=torch.long, device=beam_scores.device)
    for level in range(L):
        k_in = beam_scores.shape[1]
        if states is not None:
            states.append((beam_scores, nodes, history))
        banned_ptr, banned_node = bans[level] if bans is not None else (None, None)
        beam_scores, parent, token, nodes = constrained_beam_step(
            logits[level], beam_scores, nodes, trie, level, K,
            banned_ptr=banned_ptr, banned_node=banned_node, backend=backend,
        )
        if states is not None:
            flat_parent = (parent + k_in * torch.arange(B, device=parent.device)[:, None]).reshape(-1)
            history = torch.cat([history[flat_parent], token.reshape(-1, 1)], 1)
    return beam_scores, nodes


def _torch_search(logits, trie, max_children):
    beam_scores = torch.zeros(B, 1, device=logits[0].device)
    nodes = torch.zeros(B, 1, dtype=torch.long, device=beam_scores.device)
    for level in range(L):
        beam_scores, _, _, nodes = torch_gather_step(logits[level], beam_scores, nodes, trie, level, K, max_children[level])
    return beam_scores


def _hf_search(logits, allowed):
    beam_scores = torch.zeros(B, 1, device=logits[0].device)
    history = torch.empty(B, 0, dtype=torch.long, device=beam_scores.device)
    for level in range(L):
        k_in = beam_scores.shape[1]
        beam_scores, parent, token = hf_style_step(logits[level], beam_scores, history, allowed, K)
        flat_parent = (parent + k_in * torch.arange(B, device=parent.device)[:, None]).reshape(-1)
        history = torch.cat([history[flat_parent], token.reshape(-1, 1)], 1)
    return beam_scores


def _timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def _exclusion_rows(num_items, logits, trie, backends, leaves, device, repeat) -> list[dict]:
    """Whole search with no bans, an empty ban CSR, and HISTORY banned leaves per user (their
    top HISTORY unbanned results)."""
    ptr = torch.arange(0, B * HISTORY + 1, HISTORY, device=device)
    banned_leaf = leaves[:, :HISTORY].reshape(-1)
    bans = trie.banned_nodes(ptr, banned_leaf)
    t_helper = median_time(lambda: trie.banned_nodes(ptr, banned_leaf), device, repeat=repeat)
    no_bans = torch.zeros(B + 1, dtype=torch.long, device=device)
    empty = [(no_bans, torch.zeros(0, dtype=torch.long, device=device))] * L
    settings = {"none": None, "empty CSR": empty, f"{HISTORY} leaves per user": bans}
    rows = [{"items": num_items, "level": "all", "bans": name} for name in settings]
    for be in backends:
        times = interleaved_medians(
            {name: (lambda b=b: _fused_search(logits, trie, be, bans=b)) for name, b in settings.items()},
            device, repeat=repeat,
        )
        for row in rows:
            row.update({f"{be}_ms": times[row["bans"]] * 1e3, f"{be}_vs_no_bans": times[row["bans"]] / times["none"]})
    scores, got = _fused_search(logits, trie, backends[0], bans=bans)
    user = trie.num_leaves * torch.arange(B, device=device)[:, None]  # (user, leaf) as one key
    returned = torch.isin(got + user, (leaves[:, :HISTORY] + user).reshape(-1))
    rows[-1].update(
        banned_nodes_ms=t_helper * 1e3,
        banned_returned=int(returned.sum()),
        empty_slots=int((scores == float("-inf")).sum()),
    )
    return rows


def run(device: torch.device, quick: bool = False) -> list[dict]:
    catalogs = [10_000] if quick else [10_000, 100_000, 1_000_000]
    fast_repeat, slow_repeat = (QUICK_REPEAT, 1) if quick else (FAST_REPEAT, 5)
    backends = []
    if has_compiled_op("constrained_beam_step", device.type):
        backends.append(device.type)
    if device.type == "cuda" and triton_usable(device):
        backends.append("triton")
    if not backends:
        return []
    # The whole search also once per instruction set of the C++ kernels (cpu_avx2, cpu_avx512 columns).
    cpu_isas = bench_isas() if "cpu" in backends else []
    vocab = SPECIALS + L * CODES
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for num_items in catalogs:
        codes = torch.randint(0, CODES, (num_items, L), generator=gen).to(device)
        offsets = [SPECIALS + CODES * level for level in range(L)]
        (trie, _, _), build_s = _timed(lambda: build_trie_levels(codes, [CODES] * L, offsets), device)
        max_children = [trie.max_children(level) for level in range(L)]
        root, dict_s = _timed(lambda: dict_trie(trie), device)
        allowed = prefix_allowed_tokens_fn(root)
        logits = [torch.randn((B if level == 0 else B * K), vocab, generator=gen).to(device) for level in range(L)]
        states = []
        final, leaves = _fused_search(logits, trie, backends[0], states)
        # Whole search: every method chains its own L steps on the same logits.
        row = {"items": num_items, "level": "all", "build_trie_s": build_s, "build_dict_trie_s": dict_s}
        t_hf = median_time(lambda: _hf_search(logits, allowed), device, repeat=slow_repeat)
        # The fast methods interleaved (see interleaved_medians): on a 2-vCPU guest the same search
        # timed in separate blocks differs by 2-3x from one block to the next.
        fns = {"torch": lambda: _torch_search(logits, trie, max_children)}
        fns.update({be: (lambda be=be: _fused_search(logits, trie, be)) for be in backends})
        fns.update({f"cpu_{name}": with_isa(name, lambda: _fused_search(logits, trie, "cpu")) for name in cpu_isas})
        times = interleaved_medians(fns, device, repeat=fast_repeat)
        t_torch = times.pop("torch")
        row.update(hf_ms=t_hf * 1e3, torch_ms=t_torch * 1e3)
        for label, t in times.items():
            row.update({f"{label}_ms": t * 1e3, f"{label}_vs_hf": t_hf / t, f"{label}_vs_torch": t_torch / t})
        row["scores_equal_torch"] = bool(torch.allclose(final, _torch_search(logits, trie, max_children), atol=1e-4))
        rows.append(row)
        rows.extend(_exclusion_rows(num_items, logits, trie, backends, leaves, device, fast_repeat))
        for level, (beam_scores, nodes, history) in enumerate(states):
            row = {"items": num_items, "level": level, "children_max": max_children[level]}
            t_hf = median_time(lambda: hf_style_step(logits[level], beam_scores, history, allowed, K), device, repeat=slow_repeat)
            fns = {"torch": lambda: torch_gather_step(logits[level], beam_scores, nodes, trie, level, K, max_children[level])}
            fns.update({be: (lambda be=be: constrained_beam_step(logits[level], beam_scores, nodes, trie, level, K,
                                                                 backend=be)) for be in backends})
            times = interleaved_medians(fns, device, repeat=fast_repeat)
            t_torch = times.pop("torch")
            row.update(hf_ms=t_hf * 1e3, torch_ms=t_torch * 1e3)
            for be, t in times.items():
                row.update({f"{be}_ms": t * 1e3, f"{be}_vs_hf": t_hf / t, f"{be}_vs_torch": t_torch / t})
            rows.append(row)
    return rows
