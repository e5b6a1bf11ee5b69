import itertools

import pytest
import torch

import letter_ext
from conftest import available_backends, devices, forced_isas
from letter_ext.trie import build_trie_levels

NEG_INF = float("-inf")
BACKEND_DEVICE = [(b, dev) for dev in devices() for b in available_backends("constrained_beam_step", dev)]
SPECIALS = 3  # PAD/EOS/BOS-like ids below the code tokens, never valid continuations


def random_trie(num_items, num_levels, gen, device="cpu"):
    """Random catalog; level sizes small enough that many nodes have few children."""
    sizes = torch.randint(2, 12, (num_levels,), generator=gen).tolist()
    codes = torch.stack([torch.randint(0, s, (num_items,), generator=gen) for s in sizes], 1)
    offsets = [SPECIALS + sum(sizes[:l]) for l in range(num_levels)]
    trie, _, _ = build_trie_levels(codes.to(device), sizes, offsets)
    return trie


def random_step_inputs(trie, level, batch, k_in, gen, device="cpu"):
    vocab = trie.vocab_size + 2 + (trie.vocab_size % 2)  # odd V with unused tail columns
    logits = 3 * torch.randn(batch * k_in, vocab, generator=gen)
    logits[:, :SPECIALS] += 5  # specials are likely tokens that must never be chosen
    beam_scores = -torch.rand(batch, k_in, generator=gen) * 4
    beam_scores[torch.rand(batch, k_in, generator=gen) < 0.2] = NEG_INF  # dead beams
    num_nodes = trie.row_ptr[level].numel() - 1
    nodes = torch.randint(0, num_nodes, (batch, k_in), generator=gen)
    return logits.to(device), beam_scores.to(device), nodes.to(device)


def assert_step_valid(out, ref, logits, beam_scores, nodes, trie, level, tol=1e-5):
    """Backend output vs the reference: same scores; every choice a real child with the score it
    claims; the same (parent, token) wherever the reference's score is not a near-tie."""
    scores, parent, token, node = (t.cpu() for t in out)
    r_scores, r_parent, r_token, r_node = ref
    assert torch.equal(scores == NEG_INF, r_scores == NEG_INF), "different number of valid continuations"
    torch.testing.assert_close(scores.double(), r_scores.double(), atol=tol, rtol=tol)
    logp = torch.log_softmax(logits.double().cpu(), 1)
    row_ptr, child = trie.row_ptr[level].cpu(), trie.child_token[level].cpu()
    batch, k_in = beam_scores.shape
    for b in range(batch):
        seen = set()
        for j in range(scores.shape[1]):
            if scores[b, j] == NEG_INF:
                assert (parent[b, j], token[b, j], node[b, j]) == (0, -1, -1)
                continue
            k, t, e = int(parent[b, j]), int(token[b, j]), int(node[b, j])
            n = int(nodes[b, k])
            assert row_ptr[n] <= e < row_ptr[n + 1] and child[e] == t, "not a child of the parent's node"
            expected = float(beam_scores[b, k]) + float(logp[b * k_in + k, t])
            assert abs(float(scores[b, j]) - expected) <= tol * (1 + abs(expected))
            assert (k, t) not in seen
            seen.add((k, t))
            gaps = [abs(float(r_scores[b, j]) - float(r_scores[b, i])) for i in (j - 1, j + 1) if 0 <= i < scores.shape[1]]
            if all(g > 1e-4 for g in gaps):
                assert (k, t, e) == (int(r_parent[b, j]), int(r_token[b, j]), int(r_node[b, j]))


SHAPES = list(itertools.product([1, 37, 5000], [1, 2, 3, 4], [1, 5, 20]))
# The Triton interpreter is slow: on CPU it gets a few shapes covering every K and L.
INTERPRETER_SHAPES = {(37, 1, 20), (5000, 2, 5), (37, 3, 1), (5000, 4, 5), (300, 2, 20)}
CASES = [
    (backend, device, *shape)
    for backend, device in BACKEND_DEVICE
    for shape in SHAPES + [(300, 2, 20)]
    if not (backend == "triton" and device == "cpu" and shape not in INTERPRETER_SHAPES)
]


@pytest.mark.parametrize("backend,device,items,levels,k", CASES)
def test_matches_reference(backend, device, items, levels, k):
    gen = torch.Generator().manual_seed(items * 100 + levels * 10 + k)
    trie = random_trie(items, levels, gen)
    interpreted = backend == "triton" and device == "cpu"
    batch = (1 if k == 20 else 2) if interpreted else 5
    for level in range(levels):
        k_in = 1 if level == 0 else k
        logits, beam_scores, nodes = random_step_inputs(trie, level, batch, k_in, gen)
        ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, level, k, backend="reference")
        out = letter_ext.constrained_beam_step(
            logits.to(device), beam_scores.to(device), nodes.to(device), trie.to(device), level, k, backend=backend
        )
        assert out[0].shape == (batch, k) and out[0].dtype == torch.float32
        assert all(t.dtype == torch.long and t.shape == (batch, k) for t in out[1:])
        assert_step_valid(out, ref, logits, beam_scores, nodes, trie, level)


@pytest.mark.parametrize("backend,device", [bd for bd in BACKEND_DEVICE if bd != ("triton", "cpu")])
def test_wide_nodes_match_reference(backend, device):
    """Real tokenizer shapes: 256 codes at the first level, so nodes have tens to 256 children
    (the vectorized child scan's chunks of 8 and its scalar tail)."""
    gen = torch.Generator().manual_seed(21)
    sizes = [256, 64, 7]
    codes = torch.stack([torch.randint(0, s, (3000,), generator=gen) for s in sizes], 1)
    trie, _, _ = build_trie_levels(codes, sizes, [SPECIALS + sum(sizes[:l]) for l in range(3)])
    for level, k_in in [(0, 1), (1, 20), (2, 20)]:
        logits, beam_scores, nodes = random_step_inputs(trie, level, 7, k_in, gen)
        ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, level, 20, backend="reference")
        out = letter_ext.constrained_beam_step(
            logits.to(device), beam_scores.to(device), nodes.to(device), trie.to(device), level, 20, backend=backend
        )
        assert_step_valid(out, ref, logits, beam_scores, nodes, trie, level)


@pytest.mark.parametrize("position", [3, 10])  # inside a vectorized chunk of 8 / in the scalar tail
def test_compiled_op_rejects_child_token_outside_logits(position):
    if not letter_ext._backend.has_compiled_op("constrained_beam_step", "cpu"):
        pytest.skip("compiled extension not built")
    child_token = torch.arange(SPECIALS, SPECIALS + 11)
    child_token[position] = 50
    logits = torch.randn(1, 20)
    with pytest.raises(ValueError, match="child token 50 outside the logits width 20"):
        torch.ops.letter.constrained_beam_step(
            logits, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.tensor([0, 11]), child_token, 4
        )


def test_reference_counts_valid_continuations():
    """The spec itself: fewer live children than K leaves -inf slots; specials never chosen."""
    codes = torch.tensor([[0, 1], [0, 2], [1, 0]])
    trie, _, _ = build_trie_levels(codes, [2, 3], [3, 5])
    logits = torch.zeros(3, 9)
    logits[:, :3] = 100.0  # specials dominate the softmax but are not continuations
    beam_scores = torch.tensor([[0.0, -1.0, NEG_INF]])
    nodes = torch.tensor([[0, 1, 0]])
    scores, parent, token, node = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend="reference")
    # beam 0 (prefix code 0) has children tokens 6, 7; beam 1 (prefix code 1) has token 5
    assert token.tolist() == [[6, 7, 5, -1, -1]]
    assert parent.tolist() == [[0, 0, 1, 0, 0]]
    assert node.tolist() == [[0, 1, 2, -1, -1]]
    lse = torch.logsumexp(logits[0], 0)
    torch.testing.assert_close(scores[0, :3], torch.stack([-lse, -lse, -1 - lse]))
    assert (scores[0, 3:] == NEG_INF).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_exact_ties_pick_lowest_beam_then_token(backend, device):
    gen = torch.Generator().manual_seed(7)
    trie = random_trie(300, 2, gen)
    num_nodes = trie.row_ptr[1].numel() - 1
    batch, k_in, k = 2, 4, 20
    row = torch.randn(1, trie.vocab_size + 1, generator=gen).round()  # many equal logits
    logits = row.repeat(batch * k_in, 1)
    beam_scores = torch.zeros(batch, k_in)
    nodes = torch.randint(0, num_nodes, (batch, k_in), generator=gen)
    ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, k, backend="reference")
    out = letter_ext.constrained_beam_step(
        logits.to(device), beam_scores.to(device), nodes.to(device), trie.to(device), 1, k, backend=backend
    )
    for a, b in zip(out, ref):
        assert torch.equal(a.cpu(), b) if not a.is_floating_point() else torch.allclose(a.cpu(), b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICE)
def test_all_dead_and_masked_children(backend, device):
    gen = torch.Generator().manual_seed(8)
    trie = random_trie(50, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 3, 4, gen)
    beam_scores[0] = NEG_INF  # a row without live beams
    logits[4:8] = NEG_INF  # row 1: every logit -inf (log_softmax is NaN) -> no candidates
    logits[8:, trie.child_token[1]] = NEG_INF  # row 2: every child masked by the model
    scores, parent, token, node = letter_ext.constrained_beam_step(
        logits.to(device), beam_scores.to(device), nodes.to(device), trie.to(device), 1, 5, backend=backend
    )
    assert (scores.cpu() == NEG_INF).all() and (token.cpu() == -1).all() and (node.cpu() == -1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(dtype):
    gen = torch.Generator().manual_seed(9)
    trie = random_trie(200, 3, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 2, 4, 5, gen)
    logits = logits.to(dtype)
    ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 2, 5, backend="reference")
    for backend in available_backends("constrained_beam_step"):
        if backend == "triton" and dtype != torch.float64:
            continue  # the Triton wrapper upcasts every dtype alike; once is enough in the interpreter
        out = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 2, 5, backend=backend)
        assert out[0].dtype == ref[0].dtype
        assert_step_valid(out, ref, logits, beam_scores, nodes, trie, 2)


def op_bans(trie, nodes, beam_scores, gen, with_bans):
    """The op's optional trailing arguments: random bans with each row sorted (the schema's
    contract; the public wrapper sorts), or none."""
    if not with_bans:
        return ()
    ptr, banned = random_bans(trie, 1, nodes.cpu(), beam_scores, gen)
    banned = torch.cat([banned[int(ptr[b]) : int(ptr[b + 1])].sort().values for b in range(ptr.numel() - 1)])
    return ptr.to(nodes.device), banned.to(nodes.device)


@pytest.mark.skipif("cpu" not in available_backends("constrained_beam_step"), reason="no compiled kernel")
@pytest.mark.parametrize("with_bans", [False, True])
def test_opcheck(with_bans):
    gen = torch.Generator().manual_seed(10)
    trie = random_trie(100, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 3, 4, gen)
    args = (logits, beam_scores, nodes, trie.row_ptr[1], trie.child_token[1], 6)
    args += op_bans(trie, nodes, beam_scores, gen, with_bans)
    torch.library.opcheck(torch.ops.letter.constrained_beam_step.default, args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_bans", [False, True])
def test_opcheck_triton(device, with_bans):
    if "triton" not in available_backends("constrained_beam_step", device):
        pytest.skip("triton not usable here")
    gen = torch.Generator().manual_seed(11)
    trie = random_trie(30, 2, gen, device)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 2, 3, gen, device)
    args = (logits, beam_scores, nodes, trie.row_ptr[1], trie.child_token[1], 4)
    args += op_bans(trie.to("cpu"), nodes, beam_scores, gen, with_bans)
    # The interpreter cannot run a traced (fake-tensor) launch on CPU; on CUDA all checks run.
    kwargs = {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")} if device == "cpu" else {}
    torch.library.opcheck(torch.ops.letter.constrained_beam_step_triton.default, args, **kwargs)


def _good_inputs():
    gen = torch.Generator().manual_seed(12)
    trie = random_trie(40, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 2, 3, gen)
    beam_scores[:] = 0.0
    return logits, beam_scores, nodes, trie


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (lambda a: a.update(logits=a["logits"][:-1]), ValueError, "logits must have B\\*K"),
        (lambda a: a.update(logits=a["logits"][:, :3]), ValueError, "logits has V="),
        (lambda a: a.update(logits=a["logits"].long()), TypeError, "logits must be a floating"),
        (lambda a: a.update(beam_scores=a["beam_scores"][0]), ValueError, "beam_scores must be"),
        (lambda a: a.update(nodes=a["nodes"].int()), TypeError, "nodes must be an int64"),
        (lambda a: a.update(nodes=a["nodes"] + 10**6), ValueError, "nodes of live beams"),
        (lambda a: a.update(nodes=a["nodes"][:, :2]), ValueError, "nodes .* must have the shape"),
        (lambda a: a.update(num_beams=0), ValueError, "num_beams must be an int >= 1"),
        (lambda a: a.update(level=2), ValueError, "level must be"),
        (lambda a: a.update(trie=tuple(a["trie"])), TypeError, "trie must be a letter_ext.TrieLevels"),
        (lambda a: a.update(beam_scores=a["beam_scores"].to("meta")), ValueError, "beam_scores is on"),
    ],
)
def test_bad_input(change, exc, words):
    logits, beam_scores, nodes, trie = _good_inputs()
    args = {"logits": logits, "beam_scores": beam_scores, "nodes": nodes, "trie": trie, "level": 1, "num_beams": 4}
    change(args)
    with pytest.raises(exc, match=words):
        letter_ext.constrained_beam_step(**args)


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
def test_live_node_out_of_range_is_a_value_error(backend):
    """The wrapper checks live nodes for the reference/Triton paths; the C++ kernel checks them itself."""
    logits, beam_scores, nodes, trie = _good_inputs()
    nodes[1, 2] = 10**6
    with pytest.raises(ValueError, match="nodes of live beams"):
        letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 4, backend=backend)
    beam_scores[1, 2] = NEG_INF  # a dead beam's node is ignored
    letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 4, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_beam_score_is_a_value_error(backend, bad):
    """-inf marks a dead beam; a NaN beam used to pass as dead and a +inf one to fill the slots."""
    logits, beam_scores, nodes, trie = _good_inputs()
    beam_scores[1, 2] = bad
    with pytest.raises(ValueError, match=r"beam_scores contains NaN or \+inf"):
        letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 4, backend=backend)
    beam_scores[1, 2] = NEG_INF
    letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 4, backend=backend)


@pytest.mark.skipif("cpu" not in available_backends("constrained_beam_step"), reason="no compiled kernel")
def test_fake_tensors_pass_the_value_checks():
    """Tracing runs the wrapper on fake tensors: checks that read values skip them (not stop the trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logits, beam_scores, nodes, trie = _good_inputs()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (logits, beam_scores, nodes)]
        trie = trie._replace(row_ptr=tuple(map(mode.from_tensor, trie.row_ptr)),
                             child_token=tuple(map(mode.from_tensor, trie.child_token)))
        scores, parent, token, node = letter_ext.constrained_beam_step(*fake, trie, 1, 4, backend="cpu")
    assert scores.shape == parent.shape == token.shape == node.shape == (2, 4)


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
def test_empty_batch(backend):
    gen = torch.Generator().manual_seed(13)
    trie = random_trie(20, 2, gen)
    logits = torch.zeros(0, trie.vocab_size)
    scores, parent, token, node = letter_ext.constrained_beam_step(
        logits, torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), trie, 1, 4, backend=backend
    )
    assert scores.shape == parent.shape == token.shape == node.shape == (0, 4)


def _nonfinite_inputs(vocab_extra=0):
    """3 batch rows x 4 live beams at level 1; V = 8m + 5, so the last 5 columns are the scalar tail
    of the CPU kernel's 8-wide passes."""
    gen = torch.Generator().manual_seed(15)
    trie = random_trie(60, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 3, 4, gen)
    vocab = (trie.vocab_size + 7) // 8 * 8 + 5 + vocab_extra
    logits = torch.cat([logits, torch.randn(logits.shape[0], vocab - logits.shape[1], generator=gen)], 1)
    beam_scores = -torch.rand(3, 4, generator=gen)  # all live
    return logits, beam_scores, nodes, trie


def _column(where, logits, nodes, trie, row):
    vocab = logits.shape[1]
    if where == "child":  # a continuation of the row's beam: not merely a dropped candidate
        node = int(nodes.view(-1)[row])
        return int(trie.child_token[1][trie.row_ptr[1][node]])
    return {"first": 0, "middle": vocab // 2, "tail": vocab - 3, "last": vocab - 1}[where]


BAD_ROW_MESSAGE = r"logits row 6 \(batch row 1, beam 2\) of a live beam contains NaN or \+inf"


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["first", "middle", "child", "tail", "last"])
def test_nan_or_inf_logit_of_live_beam_is_a_value_error(backend, dtype, value, where):
    logits, beam_scores, nodes, trie = _nonfinite_inputs()
    logits[6, _column(where, logits, nodes, trie, 6)] = value
    with pytest.raises(ValueError, match=BAD_ROW_MESSAGE):
        letter_ext.constrained_beam_step(logits.to(dtype), beam_scores, nodes, trie, 1, 5, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
def test_nan_in_wide_row_and_first_bad_row_is_named(backend):
    """V > 1024 (several Triton tiles, many 32-wide CPU blocks); rows 6 and 9 bad: row 6 is named."""
    logits, beam_scores, nodes, trie = _nonfinite_inputs(vocab_extra=1100)
    logits[9, 3] = float("inf")
    logits[6, 1100] = float("nan")  # in the second 1024-wide Triton tile
    with pytest.raises(ValueError, match=BAD_ROW_MESSAGE):
        letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
@pytest.mark.parametrize("fill", ["nan_among_neg_inf", "all_nan", "inf"])
def test_nan_row_whose_other_logits_are_neg_inf(backend, fill):
    """The kernels' maximum skips NaN: a row that is otherwise all -inf must still be an error."""
    logits, beam_scores, nodes, trie = _nonfinite_inputs()
    logits[6] = float("-inf") if fill != "all_nan" else float("nan")
    logits[6, logits.shape[1] // 2] = float("nan") if fill != "inf" else float("inf")
    with pytest.raises(ValueError, match=BAD_ROW_MESSAGE):
        letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend=backend)


@pytest.mark.skipif("cpu" not in available_backends("constrained_beam_step"), reason="no compiled kernel")
@pytest.mark.parametrize("force_isa", forced_isas(), indirect=True)
def test_every_isa_matches_reference(force_isa):
    """The C++ kernel on each instruction set this machine runs (AVX-512: 16-wide log-sum-exp with
    masked tails; AVX2: 8-wide with scalar tails; scalar)."""
    for items, levels, k in [(37, 3, 5), (5000, 4, 20), (300, 2, 20)]:
        test_matches_reference("cpu", "cpu", items, levels, k)
    test_wide_nodes_match_reference("cpu", "cpu")
    # V = 8m + 5 + extra: tails of every width of the passes (8, 16, 32, 64 floats per step)
    for extra in (0, 3, 11, 27, 59):
        logits, beam_scores, nodes, trie = _nonfinite_inputs(vocab_extra=extra)
        logits[4, :20] = NEG_INF  # impossible tokens, some of them children
        ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend="reference")
        out = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend="cpu")
        assert_step_valid(out, ref, logits, beam_scores, nodes, trie, 1)
        for value in (float("nan"), float("inf")):
            for where in ("first", "middle", "tail", "last"):
                bad = logits.clone()
                bad[6, _column(where, bad, nodes, trie, 6)] = value
                with pytest.raises(ValueError, match=BAD_ROW_MESSAGE):
                    letter_ext.constrained_beam_step(bad, beam_scores, nodes, trie, 1, 5, backend="cpu")


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
def test_dead_beams_nonfinite_logits_are_ignored(backend):
    logits, beam_scores, nodes, trie = _nonfinite_inputs()
    beam_scores[1, 2] = beam_scores[2, 0] = NEG_INF
    want = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend="reference")
    logits[6] = float("nan")
    logits[8, ::2] = float("inf")
    nodes[1, 2] = 10**6  # also ignored
    got = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b)


@pytest.mark.parametrize("backend", ["reference"] + available_backends("constrained_beam_step"))
def test_neg_inf_logits_are_impossible_tokens(backend):
    """-inf logits are legitimate (masked tokens): never chosen, no error, the rest unchanged."""
    logits, beam_scores, nodes, trie = _nonfinite_inputs()
    for row in range(logits.shape[0]):  # mask a child of every beam, and the first and last columns
        logits[row, _column("child", logits, nodes, trie, row)] = NEG_INF
    logits[:, 0] = logits[:, -1] = NEG_INF
    ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend="reference")
    out = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 5, backend=backend)
    assert_step_valid(out, ref, logits, beam_scores, nodes, trie, 1)
    for b in range(3):
        masked = {(k, _column("child", logits, nodes, trie, b * 4 + k)) for k in range(4)}
        chosen = {(int(k), int(t)) for k, t in zip(out[1][b], out[2][b]) if t >= 0}
        assert len(chosen) == 5 and not chosen & masked


# -- bans: per-row CSR of child nodes that are never chosen ------------------------------------


def random_bans(trie, level, nodes, beam_scores, gen, fraction=0.5):
    """Bans (ptr, node) for every batch row: about `fraction` of the children of its beams'
    nodes (so that bans hit real candidates) plus a few random nodes of the level, unsorted and
    with duplicates; rows 0 and 2 (when present) ban nothing."""
    row_ptr = trie.row_ptr[level]
    num_children = trie.child_token[level].numel()
    rows = []
    for b in range(beam_scores.shape[0]):
        if b in (0, 2):
            rows.append(torch.zeros(0, dtype=torch.long))
            continue
        edges = torch.cat([torch.arange(int(row_ptr[n]), int(row_ptr[n + 1])) for n in nodes[b].tolist()])
        chosen = edges[torch.rand(edges.numel(), generator=gen) < fraction]
        extra = torch.randint(0, num_children, (3,), generator=gen)
        row = torch.cat([chosen, extra, chosen[:2]])  # duplicates
        rows.append(row[torch.randperm(row.numel(), generator=gen)])
    ptr = torch.zeros(len(rows) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor([r.numel() for r in rows]), 0)
    return ptr, torch.cat(rows)


def assert_nothing_banned(node, banned_ptr, banned_node):
    for b, row in enumerate(node.cpu().tolist()):
        banned = set(banned_node[int(banned_ptr[b]) : int(banned_ptr[b + 1])].tolist())
        assert not banned & set(row), f"row {b} returned a banned child"


def assert_bans_match_reference(backend, device, logits, beam_scores, nodes, trie, level, k, ptr, banned):
    """The backend on `device` with bans vs the reference: a valid step, nothing banned returned."""
    ref = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, level, k, banned_ptr=ptr, banned_node=banned, backend="reference"
    )
    out = letter_ext.constrained_beam_step(
        logits.to(device), beam_scores.to(device), nodes.to(device), trie.to(device), level, k,
        banned_ptr=ptr.to(device), banned_node=banned.to(device), backend=backend,
    )
    assert_step_valid(out, ref, logits, beam_scores, nodes, trie, level)
    assert_nothing_banned(out[3], ptr, banned)


def test_reference_bans_are_the_next_best_allowed():
    """The spec against its definition: with bans, the K best of the unbanned candidate list
    once the banned ones are struck out (scores untouched)."""
    gen = torch.Generator().manual_seed(30)
    trie = random_trie(400, 3, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 5, 4, gen)
    ptr, banned = random_bans(trie, 1, nodes, beam_scores, gen)
    got = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 1, 6, banned_ptr=ptr, banned_node=banned, backend="reference"
    )
    every = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 4 * 12, backend="reference")
    for b in range(5):
        row_bans = set(banned[int(ptr[b]) : int(ptr[b + 1])].tolist())
        keep = [j for j in range(every[0].shape[1]) if every[3][b, j] >= 0 and int(every[3][b, j]) not in row_bans][:6]
        n = len(keep)
        for out, full in zip(got, every):
            assert torch.equal(out[b, :n], full[b, keep])
        assert (got[0][b, n:] == NEG_INF).all() and (got[3][b, n:] == -1).all()
    assert int((got[3] >= 0).sum()) > 0


BAN_SHAPES = [(37, 2, 5), (300, 2, 20), (5000, 3, 5), (5000, 4, 20), (37, 3, 1), (1, 1, 5)]
BAN_CASES = [
    (backend, device, *shape)
    for backend, device in BACKEND_DEVICE
    for shape in BAN_SHAPES
    if not (backend == "triton" and device == "cpu" and shape in {(5000, 4, 20), (5000, 3, 5)})
]


@pytest.mark.parametrize("backend,device,items,levels,k", BAN_CASES)
def test_bans_match_reference(backend, device, items, levels, k):
    gen = torch.Generator().manual_seed(items * 100 + levels * 10 + k + 1)
    trie = random_trie(items, levels, gen)
    batch = 3 if backend == "triton" and device == "cpu" else 5
    for level in range(levels):
        k_in = 1 if level == 0 else k
        logits, beam_scores, nodes = random_step_inputs(trie, level, batch, k_in, gen)
        ptr, banned = random_bans(trie, level, nodes, beam_scores, gen)
        assert_bans_match_reference(backend, device, logits, beam_scores, nodes, trie, level, k, ptr, banned)


@pytest.mark.parametrize("backend,device", [bd for bd in BACKEND_DEVICE if bd != ("triton", "cpu")])
def test_bans_in_wide_nodes_match_reference(backend, device):
    """256 children per node: bans inside the vectorized chunks of 8, in the scalar tail, and
    while the buffer has no threshold yet (the group-maxima bound must not count banned scores)."""
    gen = torch.Generator().manual_seed(31)
    sizes = [256, 64, 7]
    codes = torch.stack([torch.randint(0, s, (3000,), generator=gen) for s in sizes], 1)
    trie, _, _ = build_trie_levels(codes, sizes, [SPECIALS + sum(sizes[:l]) for l in range(3)])
    for level, k_in, k in [(0, 1, 20), (0, 1, 3), (1, 20, 20), (2, 20, 20)]:
        logits, beam_scores, nodes = random_step_inputs(trie, level, 7, k_in, gen)
        for fraction in (0.1, 0.9):
            ptr, banned = random_bans(trie, level, nodes, beam_scores, gen, fraction)
            assert_bans_match_reference(backend, device, logits, beam_scores, nodes, trie, level, k, ptr, banned)


def test_bans_hit_the_best_candidates_on_wide_nodes():
    """Ban exactly the K best children of the first beam (the ones the group-maxima bound would
    pick): every backend must fall back to the next K."""
    gen = torch.Generator().manual_seed(32)
    sizes = [256, 5]
    codes = torch.stack([torch.randint(0, s, (2000,), generator=gen) for s in sizes], 1)
    trie, _, _ = build_trie_levels(codes, sizes, [SPECIALS, SPECIALS + 256])
    logits, beam_scores, nodes = random_step_inputs(trie, 0, 4, 1, gen)
    beam_scores[:] = 0.0
    free = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 0, 16, backend="reference")
    ptr = torch.arange(0, 4 * 8 + 1, 8)
    banned = free[3][:, :8].reshape(-1)
    ref = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 0, 8, banned_ptr=ptr, banned_node=banned, backend="reference"
    )
    for out_part, free_part in zip(ref, free):
        assert torch.equal(out_part, free_part[:, 8:])
    for backend in available_backends("constrained_beam_step"):
        out = letter_ext.constrained_beam_step(
            logits, beam_scores, nodes, trie, 0, 8, banned_ptr=ptr, banned_node=banned, backend=backend
        )
        assert_step_valid(out, ref, logits, beam_scores, nodes, trie, 0)


ALL_BACKENDS = ["reference"] + available_backends("constrained_beam_step")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_bans_equal_no_bans(backend):
    gen = torch.Generator().manual_seed(33)
    trie = random_trie(300, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 4, 5, gen)
    want = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, 1, 7, backend=backend)
    got = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 1, 7,
        banned_ptr=torch.zeros(5, dtype=torch.long), banned_node=torch.zeros(0, dtype=torch.long), backend=backend,
    )
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unsorted_duplicate_bans_equal_sorted_distinct(backend):
    gen = torch.Generator().manual_seed(34)
    trie = random_trie(300, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 4, 5, gen)
    ptr, banned = random_bans(trie, 1, nodes, beam_scores, gen)
    rows = [sorted(set(banned[int(ptr[b]) : int(ptr[b + 1])].tolist())) for b in range(4)]
    clean_ptr = torch.tensor([0] + list(itertools.accumulate(len(r) for r in rows)))
    clean = torch.tensor([v for r in rows for v in r])
    want = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 1, 7, banned_ptr=clean_ptr, banned_node=clean, backend=backend
    )
    got = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 1, 7, banned_ptr=ptr, banned_node=banned, backend=backend
    )
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_row_banned_and_all_children_of_a_node(backend):
    """Every row bans something; in row 1 every child of beam 0's node is banned, so beam 0
    contributes nothing while the other beams fill the slots."""
    gen = torch.Generator().manual_seed(35)
    trie = random_trie(300, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 3, 4, gen)
    beam_scores[:] = -torch.rand(3, 4, generator=gen)
    logits[4, trie.child_token[1]] += 20  # beam 0 of row 1 would win every slot
    row_ptr = trie.row_ptr[1]
    node = int(nodes[1, 0])
    rows = [
        [int(row_ptr[int(nodes[0, 1])])],
        list(range(int(row_ptr[node]), int(row_ptr[node + 1]))),
        [int(row_ptr[int(nodes[2, 3])]), 0],
    ]
    ptr = torch.tensor([0] + list(itertools.accumulate(len(r) for r in rows)))
    banned = torch.tensor([v for r in rows for v in r])
    ref = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 1, 5, banned_ptr=ptr, banned_node=banned, backend="reference"
    )
    out = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 1, 5, banned_ptr=ptr, banned_node=banned, backend=backend
    )
    assert_step_valid(out, ref, logits, beam_scores, nodes, trie, 1)
    assert_nothing_banned(out[3], ptr, banned)
    same_node = nodes[1] == node  # other beams at the same node lose the same children
    filled = out[0][1] > NEG_INF
    assert filled.any() and not same_node[out[1][1][filled]].any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_leaf_banned_leaves_only_empty_slots(backend):
    gen = torch.Generator().manual_seed(36)
    trie = random_trie(200, 3, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 2, 2, 4, gen)
    leaves = torch.arange(trie.num_leaves)
    ptr = torch.tensor([0, trie.num_leaves, 2 * trie.num_leaves])
    scores, parent, token, node = letter_ext.constrained_beam_step(
        logits, beam_scores, nodes, trie, 2, 5, banned_ptr=ptr, banned_node=torch.cat([leaves.flip(0), leaves]),
        backend=backend,
    )
    assert (scores == NEG_INF).all() and (parent == 0).all() and (token == -1).all() and (node == -1).all()


def _ban_args(**change):
    logits, beam_scores, nodes, trie = _good_inputs()  # B = 2, level 1
    args = {"logits": logits, "beam_scores": beam_scores, "nodes": nodes, "trie": trie, "level": 1, "num_beams": 4,
            "banned_ptr": torch.tensor([0, 1, 2]), "banned_node": torch.tensor([0, 1])}
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"banned_ptr": None}, ValueError, "banned_ptr and banned_node go together"),
        ({"banned_node": None}, ValueError, "banned_ptr and banned_node go together"),
        ({"banned_ptr": [0, 1, 2]}, TypeError, "banned_ptr must be a torch.Tensor"),
        ({"banned_node": torch.tensor([0, 1], dtype=torch.int32)}, TypeError, "banned_node must be an int64"),
        ({"banned_ptr": torch.tensor([0, 2])}, ValueError, r"banned_ptr must be \[B \+ 1\] = \[3\]"),
        ({"banned_node": torch.tensor([[0, 1]])}, ValueError, "banned_node must be 1-D"),
        ({"banned_ptr": torch.tensor([0, 2, 1])}, ValueError, "banned_ptr must be a CSR row pointer"),
        ({"banned_ptr": torch.tensor([1, 1, 2])}, ValueError, "banned_ptr must be a CSR row pointer"),
        ({"banned_ptr": torch.tensor([0, 1, 3])}, ValueError, "banned_ptr must be a CSR row pointer"),
        ({"banned_node": torch.zeros(0, dtype=torch.long)}, ValueError, "banned_ptr must be a CSR row pointer"),
        ({"banned_node": torch.tensor([0, -1])}, ValueError, r"banned_node must hold ids in \[0, "),
        ({"banned_node": torch.tensor([0, 10**6])}, ValueError, r"banned_node must hold ids in \[0, "),
        ({"banned_node": torch.tensor([0, 1], device="meta")}, ValueError, "banned_node is on meta"),
    ],
)
def test_bad_bans(change, exc, words):
    for backend in ALL_BACKENDS:
        with pytest.raises(exc, match=words):
            letter_ext.constrained_beam_step(**_ban_args(**change), backend=backend)


def test_compiled_op_checks_its_bans():
    """Called directly (no wrapper to sort), the C++ kernel refuses what its binary search
    cannot use, with a ValueError."""
    if not letter_ext._backend.has_compiled_op("constrained_beam_step", "cpu"):
        pytest.skip("compiled extension not built")
    a = _ban_args()
    trie = a["trie"]
    base = (a["logits"], a["beam_scores"], a["nodes"], trie.row_ptr[1], trie.child_token[1], 4)
    with pytest.raises(ValueError, match="banned_node of batch row 1 is not sorted"):
        torch.ops.letter.constrained_beam_step(*base, torch.tensor([0, 0, 2]), torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="banned_ptr decreases at row 1"):
        torch.ops.letter.constrained_beam_step(*base, torch.tensor([0, 5, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pass both or neither"):
        torch.ops.letter.constrained_beam_step(*base, torch.tensor([0, 1, 2]), None)


# -- TrieLevels.banned_nodes: banned leaves -> wholly banned subtrees per level ----------------


def ancestors(trie):
    """[num_leaves, L + 1]: the node at every depth above each leaf (depth L = the leaf)."""
    node = torch.arange(trie.num_leaves)
    columns = [node]
    for level in reversed(range(trie.num_levels)):
        node = torch.searchsorted(trie.row_ptr[level], node, right=True) - 1
        columns.append(node)
    return torch.stack(columns[::-1], 1)


@pytest.mark.parametrize("items,levels", [(1, 1), (40, 2), (500, 3), (3000, 4)])
def test_banned_nodes_are_exactly_the_wholly_banned_subtrees(items, levels):
    gen = torch.Generator().manual_seed(items + levels)
    trie = random_trie(items, levels, gen)
    up = ancestors(trie)
    rows = []
    for b in range(5):
        if b == 0:
            rows.append([])
            continue
        if b == 1:
            rows.append(list(range(trie.num_leaves)) * 2)  # everything, twice
            continue
        # whole subtrees of a few random depth-1/depth-2 nodes, plus random single leaves
        depth = 1 + b % min(2, levels)
        roots = torch.randint(0, int(up[:, depth].max()) + 1, (2,), generator=gen)
        leaves = torch.isin(up[:, depth], roots).nonzero().squeeze(1)
        single = torch.randint(0, trie.num_leaves, (4,), generator=gen)
        row = torch.cat([leaves, single])
        rows.append(row[torch.randperm(row.numel(), generator=gen)].tolist())
    ptr = torch.tensor([0] + list(itertools.accumulate(len(r) for r in rows)))
    banned = torch.tensor([v for r in rows for v in r], dtype=torch.long)
    per_level = trie.banned_nodes(ptr, banned)
    assert len(per_level) == levels
    for level, (level_ptr, nodes) in enumerate(per_level):
        depth = level + 1
        for b, row in enumerate(rows):
            got = nodes[int(level_ptr[b]) : int(level_ptr[b + 1])].tolist()
            want = sorted(
                n for n in set(up[:, depth].tolist()) if set((up[:, depth] == n).nonzero().squeeze(1).tolist()) <= set(row)
            )
            assert got == want, (level, b)
    assert per_level[0][1].numel() >= 1  # row 1 bans the whole first level


def test_banned_nodes_bad_input():
    gen = torch.Generator().manual_seed(40)
    trie = random_trie(50, 2, gen)
    with pytest.raises(ValueError, match=r"banned_leaf must hold ids in \[0, "):
        trie.banned_nodes(torch.tensor([0, 1]), torch.tensor([trie.num_leaves]))
    with pytest.raises(ValueError, match="banned_ptr must be a CSR row pointer"):
        trie.banned_nodes(torch.tensor([0, 2]), torch.tensor([0]))
    with pytest.raises(TypeError, match="banned_leaf must be an int64"):
        trie.banned_nodes(torch.tensor([0, 1]), torch.tensor([0.0]))
