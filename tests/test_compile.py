"""torch.compile sees a LoRA'd model whole: one graph, no breaks, eager's gradients.

Under compilation `tinytune.ops.lora_linear` runs its twin `lora_linear_traceable` (plain torch ops)
instead of the numpy-masked autograd Function; the chunked cross-entropy traces as it is. Dynamo's
`explain` and the "aot_eager" backend cost seconds; the inductor tests (a C++ compile) are `slow`.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

import tinytune as tt
from tinytune.ops import linear_cross_entropy, lora_linear, quantised_probability
from tinytune.ops import lora_linear_traceable
from tinytune.train.losses import causal_lm_loss

SCALING = 1.5
# float32 on a small model: compiled and eager run the same ops in another order (addmm vs mm + add,
# a fused backward), so they agree to rounding, not bit for bit.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def lora_model(dropout: float, dora: bool = False, train: bool = True) -> tt.models.CausalLM:
    """llama-tiny cut to 1 layer (d=64, V=256; compile time grows with depth), LoRA on every linear but
    the head (so the chunked loss applies), B drawn non-zero: with B = 0 neither A's gradient nor the
    dropout mask would show in the loss."""
    model = tt.models.build("llama-tiny", num_layers=1)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, dropout=dropout, targets="all-linear",
                                            exclude=["lm_head"], dora=dora))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, tt.lora.LoRALinear):
                layer.lora_B.normal_(0.0, 0.02, generator=generator)
    return model.train(train)


def ids_batch(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


def train_loss(model, ids: torch.Tensor, chunked: bool = True) -> torch.Tensor:
    """The loss `fit` computes: chunked from hidden states (plain head), or from logits; count passed in,
    as the loop does (counting inside would read a value back to the host)."""
    count = ids.shape[0] * (ids.shape[1] - 1)
    if chunked:
        return model(ids, labels=ids, num_items_in_batch=count).loss
    return causal_lm_loss(model(ids), ids, count)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model, loss_fn, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}


# ------------------------------------------------------------------- one graph, no breaks

@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-loss", "logits-loss"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_forward_and_loss_is_one_graph(chunked, dora):
    model = lora_model(dropout=0.1, dora=dora)
    assert model.chunked_head_weight() is not None  # the chunked path is the one `fit` takes here
    explained = dynamo.explain(lambda ids: train_loss(model, ids, chunked))(ids_batch())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_eval_forward_is_one_graph(dora):
    model = lora_model(dropout=0.1, dora=dora, train=False)
    with torch.no_grad():
        explained = dynamo.explain(lambda ids: model(ids))(ids_batch())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_padded_batch_with_a_2d_attention_mask_is_one_graph_and_equals_eager():
    """A padded batch (what `fit` feeds): the mask's all-ones shortcut must not break the graph."""
    model = lora_model(dropout=0.0, train=False)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in row 0
    with torch.no_grad():
        explained = dynamo.explain(lambda i, m: model(i, attention_mask=m))(ids, mask)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(lambda i, m: model(i, attention_mask=m), backend="aot_eager", fullgraph=True)
        for m in (mask, torch.ones_like(ids)):  # padded, and all ones (the eager shortcut's case)
            torch.testing.assert_close(compiled(ids, m), model(ids, attention_mask=m), rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_alone_is_one_graph():
    hidden = torch.randn(2, 16, 8, requires_grad=True)
    weight, labels = torch.randn(32, 8), torch.randint(0, 32, (2, 16))
    explained = dynamo.explain(lambda h: linear_cross_entropy(h, weight, labels, chunk_size=8))(hidden)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ---------------------------------------------------------- fullgraph training steps (aot_eager)

@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-loss", "logits-loss"])
def test_compiled_step_without_dropout_has_eager_gradients(chunked):
    model = lora_model(dropout=0.0)
    step = lambda ids: train_loss(model, ids, chunked)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ids = ids_batch()
    eager_loss, eager = grads_of(model, step, ids)
    compiled_loss, got = grads_of(model, compiled, ids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=RTOL, atol=ATOL)
    assert got.keys() == eager.keys() and len(got) == 2 * 7  # A and B of the 7 linears
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], rtol=RTOL, atol=ATOL, msg=name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_compiled_step_with_dropout_draws_fresh_masks_and_trains_a_and_b():
    model = lora_model(dropout=0.3)
    compiled = torch.compile(lambda ids: train_loss(model, ids), fullgraph=True, backend="aot_eager")
    ids = ids_batch()
    first_loss, first = grads_of(model, compiled, ids)
    second_loss, second = grads_of(model, compiled, ids)
    with torch.no_grad():
        clean = train_loss(model.eval(), ids)  # no dropout
    assert torch.isfinite(first_loss) and torch.isfinite(second_loss)
    assert first_loss != second_loss and first_loss != clean  # a new mask per call
    for name, grad in first.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert not torch.equal(grad, second[name]), name
    torch.manual_seed(7)  # masks come from torch's generator: the seed reproduces them
    again, _ = grads_of(model.train(), compiled, ids)
    torch.manual_seed(7)
    assert torch.equal(grads_of(model, compiled, ids)[0], again)


def test_compiled_eval_forward_equals_eager():
    model = lora_model(dropout=0.3, train=False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = ids_batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_compiled_chunked_cross_entropy_has_eager_gradients(weight_grad):
    hidden = torch.randn(3, 10, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=weight_grad)
    labels = torch.randint(0, 40, (3, 10))
    labels[0, :4] = -100
    loss = lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=7)  # noqa: E731 (5 chunks, last partial)
    inputs = (hidden, weight) if weight_grad else (hidden,)
    expected = torch.autograd.grad(loss(hidden, weight) * 3, inputs)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(hidden, weight) * 3, inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def _saved_by_compiled_forward(fn, *args) -> list[torch.Tensor]:
    """What the compiled forward hands its backward, as inductor partitions it (its decompositions and
    min-cut partitioner), without inductor's C++ compile."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved = []

    def keep_forward(gm, _):
        outputs = next(iter(gm.graph.find_nodes(op="output"))).args[0]
        saved.extend(n.meta["val"] for n in outputs[1:] if isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep_forward, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    torch.compile(fn, backend=backend, fullgraph=True)(*args).backward()
    return saved


@pytest.mark.parametrize("weight_grad", [False, True])
def test_compiled_chunked_cross_entropy_keeps_no_logits(weight_grad):
    hidden, labels = torch.randn(512, 64, requires_grad=True), torch.randint(0, 256, (512,))
    weight = torch.randn(256, 64, requires_grad=weight_grad)
    saved = _saved_by_compiled_forward(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=128), hidden, weight)
    shapes = sorted(tuple(t.shape) for t in saved if t.dim())
    assert shapes == [(128, 64)] * 4 + ([(256, 64)] if weight_grad else [])  # grad_hidden's chunks, grad_weight


# ------------------------------------------------------------------------- the twin itself

def _op_inputs(dtype=torch.float64, train_base=False, bias=True):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = rand(2, 3, 9).requires_grad_()
    w = rand(5, 9).requires_grad_(train_base)
    b = rand(5).requires_grad_(train_base) if bias else None
    return x, w, b, rand(3, 9).requires_grad_(), rand(5, 3).requires_grad_()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("train_base,bias", [(False, True), (True, True), (True, False)])
def test_twin_gradcheck_float64(p, train_base, bias):
    x, w, b, a, bb = _op_inputs(train_base=train_base, bias=bias)

    def twin(x, w, a, bb, *b):
        torch.manual_seed(0)  # the same mask on every evaluation gradcheck makes
        return lora_linear_traceable(x.reshape(-1, 9), w, b[0] if b else None, a, bb, SCALING, p)

    assert torch.autograd.gradcheck(twin, (x, w, a, bb) + ((b,) if bias else ()))


def test_twin_without_dropout_equals_the_fused_op():
    x, w, b, a, bb = _op_inputs()
    twin = lora_linear_traceable(x.reshape(-1, 9), w, b, a, bb, SCALING).view(2, 3, 5)
    torch.testing.assert_close(twin, lora_linear(x, w, b, a, bb, SCALING), rtol=1e-12, atol=1e-12)


def test_compiled_dropout_is_inverted_dropout_at_the_quantised_rate():
    # W = 0, b = 0, A = B = I, s = 1: the output is dropout(x) itself.
    d, p = 32, 0.25
    eye = torch.eye(d)
    x = torch.rand(512, d) + 1.0
    f = torch.compile(lambda x: lora_linear(x, torch.zeros(d, d), torch.zeros(d), eye, eye, 1.0, p),
                      fullgraph=True, backend="aot_eager")
    first, second = f(x), f(x)
    q = quantised_probability(p)
    kept = first != 0
    torch.testing.assert_close(first[kept], x[kept] / (1 - q), rtol=1e-6, atol=0)
    assert abs((~kept).float().mean().item() - q) < 0.02  # 16384 elements: sd of the rate ~0.0034
    assert not torch.equal(kept, second != 0)


def test_frozen_base_gets_no_gradient_work_under_compile():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def keep_backward(gm, _):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
    x, w, b, a, bb = _op_inputs(dtype=torch.float32)
    f = torch.compile(lambda *t: lora_linear(*t, SCALING, 0.2), backend=backend, fullgraph=True)
    f(x, w, b, a, bb).sum().backward()
    assert w.grad is None and b.grad is None and a.grad is not None and bb.grad is not None
    shapes = [tuple(n.meta["val"].shape) for n in backward_graphs[0].graph.nodes
              if n.op == "call_function" and n.target is torch.ops.aten.mm.default]
    assert tuple(w.shape) not in shapes and len(shapes) == 5  # gyb, grad_B, g W, gyb A, grad_A: no W gradient


def test_a_seed_is_refused_under_compile():
    x, w, b, a, bb = _op_inputs(dtype=torch.float32)
    f = torch.compile(lambda x: lora_linear(x, w, b, a, bb, SCALING, 0.1, seed=5), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"seed=5 cannot be honoured under torch.compile"):
        f(x)


def test_twin_under_autocast_matches_eager_op():
    x, w, b, a, bb = (t.detach().float() for t in _op_inputs())
    f = torch.compile(lambda x: lora_linear(x, w, b, a, bb, SCALING), fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = f(x), lora_linear(x, w, b, a, bb, SCALING)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------- inductor

@pytest.mark.slow
def test_inductor_training_step_has_eager_gradients_and_trains_with_dropout():
    model = lora_model(dropout=0.0)
    step = lambda ids: train_loss(model, ids)  # noqa: E731
    ids = ids_batch()
    eager_loss, eager = grads_of(model, step, ids)
    compiled_loss, got = grads_of(model, torch.compile(step, fullgraph=True), ids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=RTOL, atol=ATOL)
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], rtol=RTOL, atol=1e-5, msg=name)
    model = lora_model(dropout=0.2)
    compiled = torch.compile(lambda ids: train_loss(model, ids), fullgraph=True)
    first_loss, first = grads_of(model, compiled, ids)
    second_loss, _ = grads_of(model, compiled, ids)
    assert torch.isfinite(first_loss) and first_loss != second_loss
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in first.values())


@pytest.mark.slow
def test_inductor_dropout_rate_and_scale():
    d, p = 32, 0.1
    eye = torch.eye(d)
    x = torch.rand(1024, d) + 1.0
    y = torch.compile(lambda x: lora_linear(x, torch.zeros(d, d), None, eye, eye, 1.0, p), fullgraph=True)(x)
    kept = y != 0
    q = quantised_probability(p)
    torch.testing.assert_close(y[kept], x[kept] / (1 - q), rtol=1e-6, atol=0)
    assert abs((~kept).float().mean().item() - q) < 0.01
    assert F.mse_loss(y.mean(), x.mean()) < 1e-3  # inverted dropout keeps the mean
