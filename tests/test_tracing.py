"""The op wrappers under tracing: on fake tensors (FakeTensorMode, as torch.library.opcheck, export and
torch.compile trace them) their checks that read values are skipped, not a stop of the trace; and
torch.compile(fullgraph=True) of each wrapper gives its eager result."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import letter_ext
from conftest import available_backends
from test_constrained_beam_step import random_step_inputs, random_trie


def _inputs():
    gen = torch.Generator().manual_seed(0)
    trie = random_trie(30, 2, gen)
    logits, beam_scores, nodes = random_step_inputs(trie, 1, 2, 3, gen)
    return {
        "x": torch.randn(5, 4, generator=gen), "codebooks": torch.randn(2, 3, 4, generator=gen),
        "q": torch.randn(6, 4, generator=gen), "keys": torch.randn(7, 4, generator=gen),
        "targets": torch.tensor([0, 1, 2, 3, 4, 5]), "exclude": torch.tensor([1, -1, 0, 2, -1, 6]),
        "bias": torch.randn(7, generator=gen), "positives": torch.tensor([1, 2, 3, 4, 5, 6]),
        "selected_idx": torch.tensor([0, 1, 2, 3, 4, 5]),
        "logits": logits, "beam_scores": beam_scores, "nodes": nodes, "trie": trie,
        # unsorted ids in a row: the wrapper sorts them (traced, it cannot tell whether it must)
        "banned_ptr": torch.tensor([0, 2, 3]), "banned_node": torch.tensor([5, 1, 0]),
    }


# (op whose backends are listed, call of its public wrapper on inputs `t`)
WRAPPER_CALLS = {
    "residual_quantize": ("residual_quantize", lambda t, backend: letter_ext.residual_quantize(
        t["x"], t["codebooks"], return_residuals=True, backend=backend)),
    "dot_product_cross_entropy": ("dot_product_cross_entropy_fwd", lambda t, backend: letter_ext.dot_product_cross_entropy(
        t["q"], t["keys"], t["targets"], exclude=t["exclude"], bias=t["bias"], reduction="none", backend=backend)),
    "dot_product_cross_entropy backward": ("dot_product_cross_entropy_fwd", lambda t, backend: torch.autograd.grad(
        letter_ext.dot_product_cross_entropy(t["q"].requires_grad_(), t["keys"], t["targets"], backend=backend),
        t["q"])),
    "info_nce": ("dot_product_cross_entropy_fwd", lambda t, backend: letter_ext.info_nce(
        t["q"], t["q"].flip(0), symmetric=True, backend=backend)),
    "codebook_diversity_loss": ("dot_product_cross_entropy_fwd", lambda t, backend: letter_ext.codebook_diversity_loss(
        t["q"], t["keys"], t["positives"], t["selected_idx"], backend=backend)),
    "constrained_beam_step": ("constrained_beam_step", lambda t, backend: letter_ext.constrained_beam_step(
        t["logits"], t["beam_scores"], t["nodes"], t["trie"], 1, 4, banned_ptr=t["banned_ptr"],
        banned_node=t["banned_node"], backend=backend)),
}
# The fused backends (the reference ones are Python specs that index by value; residual_quantize's traces)
CASES = [(name, backend) for name, (op, _) in WRAPPER_CALLS.items()
         for backend in available_backends(op) + (["reference"] if name == "residual_quantize" else [])]


def _fake(mode, inputs):
    fake = {k: mode.from_tensor(v) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    trie = inputs["trie"]
    fake["trie"] = trie._replace(row_ptr=tuple(map(mode.from_tensor, trie.row_ptr)),
                                 child_token=tuple(map(mode.from_tensor, trie.child_token)))
    return fake


@pytest.mark.parametrize("name,backend", CASES)
def test_wrapper_runs_on_fake_tensors_with_the_eager_result_shapes(name, backend):
    call = WRAPPER_CALLS[name][1]
    eager = call(_inputs(), backend)
    inputs = _inputs()
    with FakeTensorMode() as mode:
        traced = call(_fake(mode, inputs), backend)
    assert [(t.shape, t.dtype) for t in torch.utils._pytree.tree_leaves(traced)] == \
        [(t.shape, t.dtype) for t in torch.utils._pytree.tree_leaves(eager)]


@pytest.mark.skipif(not available_backends("residual_quantize"), reason="no compiled kernel")
@pytest.mark.parametrize("name", [name for name in WRAPPER_CALLS if name != "dot_product_cross_entropy backward"])
def test_wrapper_compiles_as_one_graph_with_the_eager_result(name):
    """torch.compile(fullgraph=True) of each wrapper, its default backend choice included (resolve
    used to break the graph); aot_eager traces the graph with fake tensors as inductor would, without
    inductor's C++ builds (minutes on a small machine)."""
    call = WRAPPER_CALLS[name][1]
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: call(t, None), fullgraph=True, backend="aot_eager")(_inputs())
    eager = call(_inputs(), None)
    for got, expected in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager),
                             strict=True):
        assert torch.equal(got, expected)


@pytest.mark.skipif(not available_backends("dot_product_cross_entropy_fwd"), reason="no compiled kernel")
def test_compiled_loss_has_the_eager_gradients():
    inputs, compiled_inputs = _inputs(), _inputs()
    for t in (inputs, compiled_inputs):
        t["q"].requires_grad_()
    call = WRAPPER_CALLS["dot_product_cross_entropy"][1]
    torch._dynamo.reset()
    torch.compile(lambda t: call(t, None).sum(), fullgraph=True, backend="aot_eager")(compiled_inputs).backward()
    call(inputs, None).sum().backward()
    torch.testing.assert_close(compiled_inputs["q"].grad, inputs["q"].grad, rtol=0, atol=0)
