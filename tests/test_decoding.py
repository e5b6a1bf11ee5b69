import os

import pytest
import torch

from conftest import available_backends
from letter.decoding import PrefixIndex, constrained_beam_search, hf_style_beam_search
from letter.errors import DataError
from letter_ext.trie import csr_from_rows

NEG_INF = float("-inf")
# The Triton interpreter is slow on CPU: whole searches run it on the small catalogs only.
BACKENDS = ["reference"] + available_backends("constrained_beam_step")
INTERPRETED = "triton" in BACKENDS and not torch.cuda.is_available()
SEARCH_CATALOGS = [(1, [3]), (6, [4]), (20, [3, 4]), (25, [2, 3, 3]), (30, [3, 2, 2, 3])]
EXHAUSTIVE_CASES = [
    (backend, *catalog)
    for backend in BACKENDS
    for catalog in SEARCH_CATALOGS
    if not (INTERPRETED and backend == "triton" and catalog[0] > 20)
]
REAL_ITEM_CASES = [
    (backend, *case)
    for backend in BACKENDS
    for case in [(500, [8, 8, 8, 8], 10), (300, [16, 4, 4], 7), (40, [5, 5], 1)]
    if not (INTERPRETED and backend == "triton" and case[0] > 40)
]


def random_codes(num_items, sizes, gen):
    return torch.stack([torch.randint(0, s, (num_items,), generator=gen) for s in sizes], 1)


class PrefixModel:
    """A toy decoder whose logits depend on the whole prefix through its state, the token history
    [B*K, t] that reorder_state must keep aligned with the beams (like a KV cache)."""

    def __init__(self, batch, vocab, levels, gen):
        self.user = 2 * torch.randn(batch, vocab, generator=gen)
        self.position = 2 * torch.randn(levels, vocab, vocab, generator=gen)
        self.reorders = 0

    def logits(self, users, history):
        out = self.user[users].clone()
        for pos in range(history.shape[1]):
            out += self.position[pos][history[:, pos]]
        return out

    def step(self, num_beams, first_rows_per_user):
        def step_fn(step, last_tokens, state):
            batch = self.user.shape[0]
            if step == 0:
                assert last_tokens is None
                rows = first_rows_per_user
                state = torch.empty((batch * rows, 0), dtype=torch.long)
            else:
                rows = num_beams
                state = torch.cat([state, last_tokens[:, None]], 1)
            users = torch.arange(batch).repeat_interleave(rows)
            return self.logits(users, state), state

        return step_fn

    def reorder(self, state, flat_parent):
        self.reorders += 1
        return state[flat_parent]

    def exhaustive(self, index):
        """log-prob of every identifier for every user: [B, num_leaves]."""
        tokens = index.trie.leaf_tokens()
        batch = self.user.shape[0]
        total = torch.zeros(batch, tokens.shape[0], dtype=torch.float64)
        for level in range(tokens.shape[1]):
            users = torch.arange(batch).repeat_interleave(tokens.shape[0])
            history = tokens[:, :level].repeat(batch, 1)
            logp = torch.log_softmax(self.logits(users, history).double(), 1)
            total += logp.gather(1, tokens[:, level].repeat(batch)[:, None]).view(batch, -1)
        return total


def build_index(num_items, sizes, gen, specials=3):
    offsets = [specials + sum(sizes[:l]) for l in range(len(sizes))]
    return PrefixIndex.from_codes(random_codes(num_items, sizes, gen), sizes, offsets)


def vocab_of(index):
    return index.trie.vocab_size + 2  # two unused ids past the codes as well


# Random catalogs share identifiers on purpose; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:.*share.*identifiers")


@pytest.mark.parametrize("backend,num_items,sizes", EXHAUSTIVE_CASES)
def test_equals_exhaustive_scoring_when_k_covers_catalog(backend, num_items, sizes):
    gen = torch.Generator().manual_seed(num_items * 10 + len(sizes))
    index = build_index(num_items, sizes, gen)
    batch, num_beams = 3, index.num_leaves + 2
    model = PrefixModel(batch, vocab_of(index), len(sizes), gen)
    result = constrained_beam_search(
        model.step(num_beams, num_beams), batch, index, num_beams, reorder_state=model.reorder, backend=backend
    )
    assert model.reorders == len(sizes) - 1
    expected = model.exhaustive(index)
    order = torch.sort(expected, dim=1, descending=True, stable=True)
    n = index.num_leaves
    assert torch.equal(result.leaves[:, :n], order.indices)
    torch.testing.assert_close(result.scores[:, :n].double(), order.values, atol=1e-5, rtol=1e-5)
    assert (result.scores[:, n:] == NEG_INF).all() and (result.items[:, n:] == -1).all()
    assert (result.codes[:, n:] == -1).all() and (result.leaves[:, n:] == -1).all()
    torch.testing.assert_close(result.codes[:, :n], index.leaf_codes()[order.indices])
    assert torch.equal(result.items[:, :n], index.first_item_of_leaf[order.indices])


@pytest.mark.parametrize("backend,num_items,sizes,num_beams", REAL_ITEM_CASES)
def test_returns_real_distinct_items(backend, num_items, sizes, num_beams):
    gen = torch.Generator().manual_seed(num_items + num_beams)
    codes = random_codes(num_items, sizes, gen)
    offsets = [3 + sum(sizes[:l]) for l in range(len(sizes))]
    index = PrefixIndex.from_codes(codes, sizes, offsets)
    batch = 4
    model = PrefixModel(batch, vocab_of(index), len(sizes), gen)
    result = constrained_beam_search(model.step(num_beams, 1), batch, index, num_beams, reorder_state=model.reorder, backend=backend)
    assert result.items.shape == (batch, num_beams) and result.codes.shape == (batch, num_beams, len(sizes))
    assert (result.items >= 0).all(), "the catalog has more than K items: every slot must be filled"
    assert torch.equal(codes[result.items], result.codes), "a returned identifier is not its item's codes"
    assert torch.equal(index.leaf_of_item[result.items], result.leaves)
    for row in result.items.tolist():
        assert len(set(row)) == len(row), "duplicate item in one row"
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all(), "not best first"
    # The first beams' scores are the true log-probs of the returned identifiers.
    expected = model.exhaustive(index).gather(1, result.leaves)
    torch.testing.assert_close(result.scores.double(), expected, atol=1e-5, rtol=1e-5)


def test_first_step_logits_per_user_or_per_beam_agree():
    gen = torch.Generator().manual_seed(3)
    index = build_index(200, [6, 6, 6], gen)
    model = PrefixModel(3, vocab_of(index), 3, gen)
    a = constrained_beam_search(model.step(5, 1), 3, index, 5, reorder_state=model.reorder)
    b = constrained_beam_search(model.step(5, 5), 3, index, 5, reorder_state=model.reorder)
    assert torch.equal(a.leaves, b.leaves) and torch.equal(a.scores, b.scores)


def test_hf_style_baseline_agrees():
    gen = torch.Generator().manual_seed(4)
    index = build_index(300, [7, 7, 7], gen)
    model = PrefixModel(4, vocab_of(index), 3, gen)
    ours = constrained_beam_search(model.step(6, 6), 4, index, 6, reorder_state=model.reorder)
    hf = hf_style_beam_search(model.step(6, 6), 4, index, 6, reorder_state=model.reorder)
    assert torch.equal(ours.leaves, hf.leaves) and torch.equal(ours.items, hf.items)
    assert torch.equal(ours.codes, hf.codes)
    torch.testing.assert_close(ours.scores, hf.scores)


def test_duplicate_identifiers_are_reported_and_grouped():
    codes = torch.tensor([[1, 2], [0, 1], [1, 2], [1, 0], [0, 1], [1, 2]])
    with pytest.warns(UserWarning, match="5 items share 2 identifiers"):
        index = PrefixIndex.from_codes(codes, [2, 3])
    assert index.num_leaves == 3 and index.duplicate_leaves.tolist() == [0, 2]
    assert index.items_of_leaf(0) == [1, 4] and index.items_of_leaf(1) == [3] and index.items_of_leaf(2) == [0, 2, 5]
    assert index.leaf_of_item.tolist() == [2, 0, 2, 1, 0, 2]
    logits = torch.zeros(1, index.trie.vocab_size)
    logits[0, index.vocab_offsets[1] + 2] = 5.0  # prefer code 2 at level 1

    def step_fn(step, last_tokens, state):
        return logits.expand(4 if step else 1, -1), state

    result = constrained_beam_search(step_fn, 1, index, 4)
    assert result.leaves.tolist() == [[2, 0, 1, -1]]
    assert result.items.tolist() == [[0, 1, 3, -1]]
    assert result.item_groups == [[[0, 2, 5], [1, 4], [3], []]]


def naive_children(codes, offsets):
    """{prefix tuple of tokens: sorted child tokens}, by brute force."""
    children = {}
    for row in codes.tolist():
        tokens = [c + o for c, o in zip(row, offsets)]
        for depth in range(len(tokens)):
            children.setdefault(tuple(tokens[:depth]), set()).add(tokens[depth])
    return {k: sorted(v) for k, v in children.items()}


@pytest.mark.parametrize("num_items,sizes", [(1, [5]), (100, [3, 9]), (2000, [8, 8, 8, 8]), (500, [2, 2, 2, 2, 2])])
def test_index_matches_brute_force_trie(num_items, sizes):
    gen = torch.Generator().manual_seed(num_items)
    codes = random_codes(num_items, sizes, gen)
    offsets = [5 + 2 * sum(sizes[:l]) for l in range(len(sizes))]  # gaps between level ranges
    index = PrefixIndex.from_codes(codes, sizes, offsets)
    trie = index.trie
    expected = naive_children(codes, offsets)
    prefixes = [()]
    for level in range(len(sizes)):
        assert trie.row_ptr[level].numel() - 1 == len(prefixes)
        next_prefixes = []
        for node, prefix in enumerate(prefixes):
            start, end = trie.row_ptr[level][node : node + 2].tolist()
            kids = trie.child_token[level][start:end].tolist()
            assert kids == expected[prefix]
            next_prefixes += [prefix + (t,) for t in kids]
        prefixes = next_prefixes
    tokens = torch.tensor(prefixes)
    assert torch.equal(trie.leaf_tokens(), tokens)
    assert torch.equal(tokens[index.leaf_of_item], codes + torch.tensor(offsets))
    assert sorted(index.leaf_items.tolist()) == list(range(num_items))


def test_save_load_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    index = build_index(400, [5, 6, 7], gen)
    path = str(tmp_path / "index.pt")
    index.save(path)
    assert os.listdir(tmp_path) == ["index.pt"], "a temporary file was left behind"
    loaded = PrefixIndex.load(path)
    assert loaded.vocab_offsets == index.vocab_offsets and loaded.level_sizes == index.level_sizes
    for a, b in zip(loaded.trie.row_ptr + loaded.trie.child_token, index.trie.row_ptr + index.trie.child_token):
        assert torch.equal(a, b)
    assert torch.equal(loaded.leaf_of_item, index.leaf_of_item)
    assert torch.equal(loaded.first_item_of_leaf, index.first_item_of_leaf)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a PrefixIndex"):
        PrefixIndex.load(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.pt"):
        PrefixIndex.load(str(tmp_path / "junk.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_build_equals_cpu_build():
    gen = torch.Generator().manual_seed(6)
    codes = random_codes(5000, [16, 16, 16], gen)
    cpu = PrefixIndex.from_codes(codes, [16, 16, 16])
    gpu = PrefixIndex.from_codes(codes, [16, 16, 16], device="cuda")
    for a, b in zip(cpu.trie.row_ptr + cpu.trie.child_token, gpu.trie.row_ptr + gpu.trie.child_token):
        assert torch.equal(a, b.cpu())
    assert torch.equal(cpu.leaf_of_item, gpu.leaf_of_item.cpu())


@pytest.mark.parametrize(
    "codes,sizes,offsets,exc,words",
    [
        ([[0, 1], [2, 5]], [3, 4], None, ValueError, "out of vocabulary at level 1"),
        ([[0, -1]], [3, 4], None, ValueError, "out of vocabulary at level 1"),
        ([[0, 1], [2]], [3, 4], None, ValueError, "rectangular"),
        (torch.zeros(0, 3, dtype=torch.long), [2, 2, 2], None, ValueError, "empty"),
        ([[0, 1]], [3], None, ValueError, "level_sizes must have one entry per level"),
        ([[0, 1]], [3, 4], [0], ValueError, "vocab_offsets must have one entry per level"),
        ([[0.5, 1.0]], [3, 4], None, TypeError, "codes must be an integer tensor"),
        ([0, 1], [3, 4], None, ValueError, "codes must be \\[I, L\\]"),
        ([[0, 1]], [3, 0], None, ValueError, "level_sizes must be >= 1"),
        # truncated by int() before: a vocabulary of 3 codes, offsets shifted
        ([[0, 1]], [3.5, 4], None, TypeError, "level_sizes must be a sequence of 2 integers"),
        ([[0, 1]], ["3", 4], None, TypeError, "level_sizes must be a sequence of 2 integers"),
        ([[0, 1]], [3, 4], [0, 3.5], TypeError, "vocab_offsets must be a sequence of 2 integers"),
    ],
)
def test_bad_codes(codes, sizes, offsets, exc, words):
    with pytest.raises(exc, match=words):
        PrefixIndex.from_codes(codes, sizes, offsets)


def test_bad_search_arguments():
    index = PrefixIndex.from_codes([[0, 1], [1, 0]], [2, 2])

    def step_fn(step, last_tokens, state):
        return torch.zeros(2 * 3, index.trie.vocab_size), state

    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        constrained_beam_search(step_fn, 2, index, 0)
    with pytest.raises(ValueError, match="batch_size must be"):
        constrained_beam_search(step_fn, -1, index, 3)
    with pytest.raises(TypeError, match="index must be a letter.decoding.PrefixIndex"):
        constrained_beam_search(step_fn, 2, index.trie, 3)
    with pytest.raises(ValueError, match="step_fn must return logits"):
        constrained_beam_search(step_fn, 2, index, 4)
    with pytest.raises(ValueError, match="logits has V="):
        constrained_beam_search(lambda s, t, st: (torch.zeros(6, 3), st), 2, index, 3)


# -- exclusion: banned leaves ------------------------------------------------------------------


def random_banned_rows(index, batch, gen, num_beams):
    """Per row: nothing / every leaf / all but num_beams - 1 leaves / the whole subtree of the
    first code of level 0 plus random leaves / random leaves, each row as a shuffled list with
    duplicates."""
    leaves = index.num_leaves
    first_code = index.leaf_codes()[:, 0]
    rows = []
    for b in range(batch):
        kind = b % 5
        if kind == 0:
            row = torch.zeros(0, dtype=torch.long)
        elif kind == 1:
            row = torch.arange(leaves)
        elif kind == 2:
            row = torch.randperm(leaves, generator=gen)[: max(leaves - (num_beams - 1), 0)]
        elif kind == 3:
            row = torch.cat([(first_code == first_code[0]).nonzero().squeeze(1), torch.randint(0, leaves, (3,), generator=gen)])
        else:
            row = torch.randint(0, leaves, (max(leaves // 3, 1),), generator=gen)
        row = torch.cat([row, row[:2]])
        rows.append(row[torch.randperm(row.numel(), generator=gen)].tolist())
    return rows


@pytest.mark.parametrize("backend,num_items,sizes", EXHAUSTIVE_CASES)
def test_banned_leaves_exhaustive(backend, num_items, sizes):
    """K covers the catalog: the result is every allowed identifier in exact score order."""
    gen = torch.Generator().manual_seed(num_items * 10 + len(sizes) + 1)
    index = build_index(num_items, sizes, gen)
    batch, num_beams = 5, index.num_leaves + 2
    rows = random_banned_rows(index, batch, gen, num_beams)
    model = PrefixModel(batch, vocab_of(index), len(sizes), gen)
    result = constrained_beam_search(
        model.step(num_beams, 1), batch, index, num_beams, reorder_state=model.reorder, backend=backend,
        banned_leaves=rows,
    )
    expected = model.exhaustive(index)
    for b, row in enumerate(rows):
        order = torch.sort(expected[b], descending=True, stable=True).indices.tolist()
        allowed = [f for f in order if f not in set(row)]
        n = len(allowed)
        assert result.leaves[b, :n].tolist() == allowed
        torch.testing.assert_close(result.scores[b, :n].double(), expected[b, allowed], atol=1e-5, rtol=1e-5)
        assert (result.leaves[b, n:] == -1).all() and (result.items[b, n:] == -1).all()


BAN_SEARCH_CASES = [
    (backend, *case)
    for backend in BACKENDS
    for case in [(500, [8, 8, 8, 8], 10), (300, [16, 4, 4], 7), (40, [5, 5], 1), (2000, [12, 12, 12], 20)]
    if not (INTERPRETED and backend == "triton" and case[0] > 300)
]


@pytest.mark.parametrize("backend,num_items,sizes,num_beams", BAN_SEARCH_CASES)
def test_banned_leaves_never_returned_and_slots_filled(backend, num_items, sizes, num_beams):
    """Beam search is approximate, but with bans pruned at every level it never wastes a beam on
    a prefix without an allowed leaf: each row gets min(K, allowed leaves) distinct allowed ones."""
    gen = torch.Generator().manual_seed(num_items + num_beams + 1)
    index = build_index(num_items, sizes, gen)
    batch = 10
    rows = random_banned_rows(index, batch, gen, num_beams)
    model = PrefixModel(batch, vocab_of(index), len(sizes), gen)
    ptr, leaf = csr_from_rows(rows)
    result = constrained_beam_search(
        model.step(num_beams, 1), batch, index, num_beams, reorder_state=model.reorder, backend=backend,
        banned_leaves=(ptr, leaf),
    )
    for b, row in enumerate(rows):
        got = [f for f in result.leaves[b].tolist() if f >= 0]
        allowed = index.num_leaves - len(set(row))
        assert len(got) == min(num_beams, allowed) and len(set(got)) == len(got)
        assert not set(got) & set(row)
        assert (result.leaves[b, len(got):] == -1).all()
    unbanned = constrained_beam_search(model.step(num_beams, 1), batch, index, num_beams, reorder_state=model.reorder,
                                       backend=backend)
    assert torch.equal(result.leaves[0], unbanned.leaves[0]), "a row without bans changed"


def test_banned_leaves_collision_rule():
    """A shared identifier is banned only when every item it names is excluded."""
    codes = torch.tensor([[1, 2], [0, 1], [1, 2], [1, 0], [0, 1], [1, 2]])
    with pytest.warns(UserWarning):
        index = PrefixIndex.from_codes(codes, [2, 3])
    # leaves: 0 = (0, 1) items 1, 4; 1 = (1, 0) item 3; 2 = (1, 2) items 0, 2, 5
    ptr, leaf = index.banned_leaves([[1], [1, 4], [0, 2], [0, 2, 5, 5, 3], [], [4, 1, 4, 3, 1]])
    assert ptr.tolist() == [0, 0, 1, 1, 3, 3, 5]
    assert leaf.tolist() == [0, 1, 2, 0, 1]
    logits = torch.zeros(1, index.trie.vocab_size)

    def step_fn(step, last_tokens, state):
        return logits.expand(3 * (4 if step else 1), -1), state

    result = constrained_beam_search(step_fn, 3, index, 4, banned_leaves=index.banned_leaves([[0, 2], [0, 2, 5], [1, 4, 3]]))
    assert sorted(f for f in result.leaves[0].tolist() if f >= 0) == [0, 1, 2]
    assert sorted(f for f in result.leaves[1].tolist() if f >= 0) == [0, 1]
    assert result.leaves[2].tolist() == [2, -1, -1, -1]


def test_banned_leaves_bad_input():
    index = PrefixIndex.from_codes([[0, 1], [1, 0]], [2, 2])
    with pytest.raises(ValueError, match=r"items_per_row\[1\] holds item id 7, outside \[0, 2\)"):
        index.banned_leaves([[0], [1, 7]])
    with pytest.raises(ValueError, match=r"items_per_row\[0\] holds item id -1"):
        index.banned_leaves([[-1]])
    with pytest.raises(TypeError, match="integer ids"):
        index.banned_leaves([["a"]])

    def step_fn(step, last_tokens, state):
        return torch.zeros(2 * 3, index.trie.vocab_size), state

    with pytest.raises(ValueError, match=r"banned_leaves must have one row per batch row \(2\), got 1"):
        constrained_beam_search(step_fn, 2, index, 3, banned_leaves=[[0]])
    with pytest.raises(ValueError, match=r"banned_leaf must hold ids in \[0, 2\)"):
        constrained_beam_search(step_fn, 2, index, 3, banned_leaves=[[0], [5]])
