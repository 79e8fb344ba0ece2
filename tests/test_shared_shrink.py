"""One shrink pass for sibling LoRA linears reading one input (`tt.lora.share_shrink`, `ops.lora_shrink`).

Checked against the same model with sharing off (each layer's own fused `lora_linear`): in float64 the outputs
and every gradient agree to 1e-12 (the only difference is the order of float sums); the decoder in float32
to 1e-5 relative. Which layers share is learned at run time, so the tests also pin what is learned (q/k/v,
gate/up; never o_proj or a cross-attention query) and what must never happen (a slice of an earlier forward
reused, a stale slice after an in-place change of A, sharing with dropout, under compile, outside the parent's
forward). The Triton halves are checked under the interpreter in tests/test_triton_lora.py.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import tinytune as tt
from tinytune.ops import lora_expand_linear, lora_linear, lora_shrink

F64 = dict(dtype=torch.float64)


def _node(y: torch.Tensor) -> str:
    """The autograd Function under a LoRA layer's final view (a per-row batch: the row scatter)."""
    if y.grad_fn is None:
        return "no graph"
    below = y.grad_fn.next_functions[0][0]
    return below.name() if below is not None else y.grad_fn.name()


class Attention(nn.Module):
    """q/k/v read x; o reads the attention output; `post` has q's width but reads another tensor; with
    `cross`, k and v read `memory` instead of x. Records each projection's backward node."""

    def __init__(self, d=12, d_kv=6, cross=False, tamper=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d_kv), nn.Linear(d, d_kv), nn.Linear(d, d_kv)
        self.o, self.post = nn.Linear(d_kv, d), nn.Linear(d, d)
        self.cross, self.tamper, self.nodes = cross, tamper, {}

    def forward(self, x, memory=None):
        source = memory if self.cross else x
        q = self.q(x)
        if self.tamper:  # the factor changes in place between q's shared pass and k's call
            with torch.no_grad():
                self.k.lora_A.add_(0.5)
        k, v = self.k(source), self.v(source)
        self.nodes.update(q=_node(q), k=_node(k), v=_node(v))
        out = self.o(torch.tanh(q * k) * v)
        return self.post(out + x)


def lora_attention(mode: str, **kw) -> Attention:
    torch.manual_seed(0)
    model = Attention(**kw).double()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=3, alpha=6, targets=["q", "k", "v", "o", "post"]))
    with torch.no_grad():
        for layer in tt.lora.lora_layers(model):
            layer[1].lora_B.normal_(0.0, 0.3)
    tt.lora.share_shrink(model, mode)
    return model


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, x, memory=None, steps=3):
    """Forward + backward `steps` times on the same input objects; returns the last output and grads."""
    for _ in range(steps):
        model.zero_grad()
        y = model(x, memory)
        y.square().sum().backward()
    return y.detach(), grads(model)


def assert_same(a, b, tol=1e-12):
    (ya, ga), (yb, gb) = a, b
    assert torch.allclose(ya, yb, rtol=0, atol=tol)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=0, atol=tol), name


# ------------------------------------------------------------------------------ the ops
@pytest.mark.parametrize("bias", [False, True])
def test_shrink_then_expand_gradcheck_float64(bias):
    """Both Functions, a slice of a stacked shrink as u (as the group uses it), trainable W."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 7, **F64, requires_grad=True)
    w = torch.randn(4, 7, **F64, requires_grad=True)
    b = torch.randn(4, **F64, requires_grad=True) if bias else None
    stacked = torch.randn(5, 7, **F64, requires_grad=True)
    lora_b = torch.randn(4, 2, **F64, requires_grad=True)

    def layer(x, w, stacked, lora_b, *b):
        u = lora_shrink(x, stacked)[..., 3:]  # the second member's slice
        return lora_expand_linear(x, w, b[0] if b else None, u, lora_b, 1.5)

    assert torch.autograd.gradcheck(layer, (x, w, stacked, lora_b, *([b] if bias else [])))


def test_shrink_then_expand_equals_lora_linear():
    torch.manual_seed(2)
    x = torch.randn(9, 16, requires_grad=True)
    w, b = torch.randn(8, 16), torch.randn(8)
    a, lora_b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    fused = lora_linear(x, w, b, a, lora_b, 2.0)
    split = lora_expand_linear(x, w, b, lora_shrink(x, a), lora_b, 2.0)
    g = torch.randn_like(fused)
    want = torch.autograd.grad(fused, (x, a, lora_b), g)
    got = torch.autograd.grad(split, (x, a, lora_b), g)
    assert torch.allclose(split, fused, atol=1e-5)
    for w_, g_ in zip(want, got):
        assert torch.allclose(g_, w_, atol=1e-4)
    assert split.grad_fn.next_functions[0][0].name() == "LoRAExpandFunctionBackward"


def test_ops_name_bad_shapes_and_follow_autocast():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 6\), expected \(r, 8\)"):
        lora_shrink(x, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"lora_B has shape \(5, 3\), expected \(5, 4\)"):
        lora_expand_linear(x, torch.randn(5, 8), None, torch.randn(3, 4), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match=r"u has shape \(2, 4\)"):
        lora_expand_linear(x, torch.randn(5, 8), None, torch.randn(2, 4), torch.randn(5, 4), 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = lora_shrink(x, torch.randn(4, 8))
        y = lora_expand_linear(x, torch.randn(5, 8), None, u, torch.randn(5, 4), 1.0)
    assert u.dtype == y.dtype == torch.bfloat16


def test_lora_linear_with_a_given_xa_saves_and_differentiates_as_without():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, **F64, requires_grad=True)
    w, a, b = torch.randn(5, 8, **F64), torch.randn(4, 8, **F64, requires_grad=True), torch.randn(5, 4, **F64)
    b.requires_grad_(True)
    given = (x @ a.t()).detach()
    y = lora_linear(x, w, None, a, b, 1.5, given_xa=given)
    g = torch.randn_like(y)
    want = torch.autograd.grad(lora_linear(x, w, None, a, b, 1.5), (x, a, b), g)
    for got, w_ in zip(torch.autograd.grad(y, (x, a, b), g), want):
        assert torch.allclose(got, w_, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"given_xa of shape \(2, 3, 3\) needs dropout 0 and shape \(2, 3, 4\)"):
        lora_linear(x, w, None, a, b, 1.5, given_xa=given[..., :3])
    with pytest.raises(ValueError, match="got dropout=0.1"):
        lora_linear(x, w, None, a, b, 1.5, dropout=0.1, given_xa=given)


# ------------------------------------------------------------------------------ groups and what is learned
def test_groups_are_siblings_of_one_width_and_share_equals_separate():
    shared, separate = lora_attention("on"), lora_attention("off")
    assert tt.lora.share_shrink(shared, "on") == [["q", "k", "v", "post"]]  # o: another width
    x = torch.randn(2, 5, 12, **F64)
    assert_same(run(shared, x), run(separate, x))
    assert shared.q._shrink_group.sharers == {0, 1, 2}  # post reads another tensor
    assert shared.nodes == dict(q="LoRAExpandFunctionBackward", k="LoRAExpandFunctionBackward",
                                v="LoRAExpandFunctionBackward")
    assert separate.nodes["k"] == "LoRALinearFunctionBackward"


def test_a_member_reading_another_tensor_never_joins():
    """Cross-attention: q reads x, k and v read memory. Only k and v share; q computes its own."""
    shared, separate = lora_attention("on", cross=True), lora_attention("off", cross=True)
    x, memory = torch.randn(2, 5, 12, **F64), torch.randn(2, 5, 12, **F64)
    assert_same(run(shared, x, memory), run(separate, x, memory))
    assert shared.q._shrink_group.sharers == {1, 2}
    assert shared.nodes["q"] == "LoRALinearFunctionBackward" and shared.nodes["v"] == "LoRAExpandFunctionBackward"


def test_same_width_sibling_with_another_input_is_not_a_sharer():
    """A parent whose q/k/v and o all have one width (Llama's self_attn): o reads the attention output."""
    model = tt.models.build("llama-tiny", num_layers=1)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear", exclude=["lm_head"]))
    groups = tt.lora.share_shrink(model, "on")
    assert [[n.rpartition(".")[2] for n in g] for g in groups] == [["q_proj", "k_proj", "v_proj", "o_proj"],
                                                                   ["gate_proj", "up_proj"]]
    ids = torch.randint(0, 256, (2, 12))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj._shrink_group.sharers == {0, 1, 2}
    assert layer.mlp.gate_proj._shrink_group.sharers == {0, 1}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_decoder_training_equals_separate(checkpointing):
    def model_and_grads(mode):
        torch.manual_seed(3)
        model = tt.models.build("llama-tiny", num_layers=1)
        tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear", exclude=["lm_head"]))
        with torch.no_grad():
            for _, layer in tt.lora.lora_layers(model):
                layer.lora_B.normal_(0.0, 0.02)
        tt.lora.share_shrink(model, mode)
        model.train()  # checkpointing acts in training mode only
        if checkpointing:
            model.set_gradient_checkpointing(True)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
        for _ in range(2):
            model.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
        shared = model.model.layers[0].self_attn.q_proj._shrink_group.sharers
        # non-reentrant checkpointing too: there the forward pass is shared (module docstring)
        assert shared == (set() if mode == "off" else {0, 1, 2})
        return loss.detach(), grads(model)

    (loss_on, g_on), (loss_off, g_off) = model_and_grads("on"), model_and_grads("off")
    assert torch.allclose(loss_on, loss_off, rtol=1e-6)
    assert g_on.keys() == g_off.keys() and len(g_on) == 14
    for name in g_on:
        scale = g_off[name].abs().max()
        assert (g_on[name] - g_off[name]).abs().max() <= 1e-5 * scale + 1e-9, name


# ------------------------------------------------------------------------------ what must never happen
def test_no_sharing_with_dropout_in_training_but_in_eval():
    model = Attention().double()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=3, alpha=6, dropout=0.2, targets=["q", "k", "v"]))
    tt.lora.share_shrink(model, "on")
    x = torch.randn(2, 5, 12, **F64)
    for _ in range(2):
        model(x)
    assert model.nodes["k"] == "LoRALinearFunctionBackward"  # independent masks per projection, as PEFT
    model.eval()
    for _ in range(2):
        model(x)
    assert model.nodes["k"] == "LoRAExpandFunctionBackward"


def test_a_factor_changed_in_place_after_the_shared_pass_is_recomputed():
    shared, separate = lora_attention("on", tamper=True), lora_attention("off", tamper=True)
    x = torch.randn(2, 5, 12, **F64)
    assert_same(run(shared, x), run(separate, x))
    assert shared.nodes["k"] == "LoRALinearFunctionBackward"  # its slice was stale: computed its own


def test_nothing_is_shared_outside_the_parents_forward_or_in_auto_mode_on_cpu():
    model = lora_attention("on")
    x = torch.randn(2, 5, 12, **F64)
    run(model, x)
    assert _node(model.k(x)) == "LoRALinearFunctionBackward"  # called directly: the group is closed
    assert model.q._shrink_group._slices is None  # nothing kept after the forward
    auto = lora_attention("auto")
    run(auto, x)
    assert auto.nodes["k"] == "LoRALinearFunctionBackward"  # CPU torch backend: "auto" does not share


def test_other_adapters_and_per_row_adapters_stay_correct():
    model, separate = lora_attention("on"), lora_attention("off")
    cfg = tt.lora.LoraConfig(rank=5, alpha=5, targets=["q", "k", "v"])
    x = torch.randn(2, 5, 12, **F64)
    for m in (model, separate):
        tt.lora.add_adapter(m, "other", cfg)
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            if "other" in layer.adapters:
                layer._factor("lora_B", "other").normal_(0.0, 0.3)
    separate.load_state_dict(model.state_dict())
    run(model, x)  # sharers learned with "default"
    for m in (model, separate):
        tt.lora.set_adapter(m, "other")
    assert_same(run(model, x), run(separate, x))
    assert model.nodes["k"] == "LoRAExpandFunctionBackward"
    with tt.lora.adapter_per_row(model, ["default", "other"]), tt.lora.adapter_per_row(separate, ["default", "other"]):
        assert_same(run(model, x, steps=1), run(separate, x, steps=1))


def test_deepcopy_and_torch_save_keep_their_own_groups():
    model = lora_attention("on")
    x = torch.randn(2, 5, 12, **F64)
    run(model, x)
    clone = copy.deepcopy(model)
    group = clone.q._shrink_group
    assert group is not model.q._shrink_group and group.members[1] is clone.k and group.parent is clone
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert_same(run(other, x), run(model, x))
        assert other.nodes["k"] == "LoRAExpandFunctionBackward"
        assert len(other._forward_pre_hooks) == 1  # its own group's hook, once


def test_relinking_replaces_hooks_and_merge_and_unload_leaves_none():
    model = lora_attention("on")
    for mode in ("off", "auto", "on"):
        tt.lora.share_shrink(model, mode)
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1
    assert model.q._shrink_group.mode == "on"
    tt.lora.add_adapter(model, "other", tt.lora.LoraConfig(rank=2, alpha=2, targets=["q", "k"]))
    assert model.q._shrink_group.mode == "on" and len(model._forward_pre_hooks) == 1  # mode kept on relink
    tt.lora.merge_and_unload(model)
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 0
    with pytest.raises(ValueError, match=r"mode='sometimes' is not one of \['auto', 'on', 'off'\]"):
        tt.lora.share_shrink(model, "sometimes")


def test_compiled_model_with_sharing_on_is_one_graph():
    dynamo.reset()
    model = tt.models.build("llama-tiny", num_layers=1)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear", exclude=["lm_head"]))
    tt.lora.share_shrink(model, "on")
    ids = torch.randint(0, 256, (2, 8))
    model(ids, labels=ids).loss.backward()
    explained = dynamo.explain(lambda i: model(i, labels=i, num_items_in_batch=14).loss)(ids)
    dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_parent_trains_from_the_first_step(reentrant, monkeypatch):
    """A checkpoint's recompute must save what its forward saved, though sharers are learned in between:
    under saved-tensor hooks (non-reentrant) the pass is shared without grad and each layer runs its usual
    Function; reentrant checkpointing has no hooks and shares forward and backward."""
    from torch.utils.checkpoint import checkpoint

    from tinytune.peft.lora import shared_shrink

    passes = []
    monkeypatch.setattr(shared_shrink, "lora_shrink", lambda *a: passes.append(1) or lora_shrink(*a))
    shared, separate = lora_attention("on"), lora_attention("off")
    x = torch.randn(2, 5, 12, **F64, requires_grad=True)
    results = []
    for model in (shared, separate):
        for _ in range(3):
            model.zero_grad()
            x.grad = None
            checkpoint(model, x, use_reentrant=reentrant).square().sum().backward()
        results.append((x.grad.clone(), grads(model)))
    assert_same(*results)
    # one pass for q, k and v in: step 1's recompute (sharers learned in its forward), steps 2 and 3 and theirs
    assert len(passes) == 5
    assert shared.nodes["k"] == ("LoRAExpandFunctionBackward" if reentrant else "LoRALinearFunctionBackward")


def test_under_saved_tensor_hooks_the_layers_save_what_they_save_unshared(monkeypatch):
    """What a checkpoint compares between a forward and its recompute: the saved tensors, in order."""
    from tinytune.peft.lora import shared_shrink

    passes = []
    monkeypatch.setattr(shared_shrink, "lora_shrink", lambda *a: passes.append(1) or lora_shrink(*a))
    x = torch.randn(2, 5, 12, **F64, requires_grad=True)
    saved = {}
    for mode in ("on", "off"):
        model = lora_attention(mode)
        run(model, x)
        passes.clear()
        saved[mode] = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, seen=saved[mode]: seen.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
            model(x)
        assert len(passes) == (1 if mode == "on" else 0)  # shared under the hooks, forward only
    assert len(saved["on"]) > 10 and saved["on"] == saved["off"]


def test_a_model_without_references_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model = lora_attention("on")
    run(model, torch.randn(2, 5, 12, **F64))
    weight = weakref.ref(model.q.base.weight)
    gc.disable()
    try:
        del model
        assert weight() is None  # no cycle through the groups or the parent's hooks
    finally:
        gc.enable()


def test_under_autocast_the_group_saves_one_copy_of_x():
    from tinytune.ops import graph_saved_storages

    x = torch.randn(64, 12)
    kept = {}
    for mode in ("on", "off"):
        model = lora_attention(mode).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)  # learn
            y = model(x)
        kept[mode] = graph_saved_storages(y, exclude=list(model.parameters()))
        assert model.nodes["k"] == ("LoRAExpandFunctionBackward" if mode == "on" else "LoRALinearFunctionBackward")
    bf16_x = 64 * 12 * 2
    assert sum(kept["off"].values()) - sum(kept["on"].values()) >= 2 * bf16_x - 64 * 9 * 2  # 3 casts of x -> 1


def test_toggling_requires_grad_between_siblings_is_not_served_a_stale_slice():
    class Toggle(Attention):
        def forward(self, x, memory=None):
            q = self.q(x)
            x.requires_grad_(True)  # after q's shared pass, before k and v take their slices
            k, v = self.k(x), self.v(x)
            return (q * k * v).sum()

    grads_x = []
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = Toggle().double()
        tt.lora.apply(model, tt.lora.LoraConfig(rank=3, alpha=6, targets=["q", "k", "v"]))
        with torch.no_grad():
            for _, layer in tt.lora.lora_layers(model):
                layer.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
        tt.lora.share_shrink(model, mode)
        for _ in range(2):
            x = torch.randn(2, 5, 12, **F64, generator=torch.Generator().manual_seed(6))
            model(x).backward()
        grads_x.append(x.grad)
    assert torch.allclose(grads_x[0], grads_x[1], rtol=0, atol=1e-12)


def test_a_new_group_takes_the_models_mode_and_a_layer_copied_alone_has_no_group():
    model = Attention().double()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=3, alpha=6, targets=["k", "v"]))
    tt.lora.share_shrink(model, "off")
    tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=3, alpha=6, targets=["q", "k", "v"]))
    assert model.q._shrink_group.mode == "off"  # q had no group: the one the user set for the model
    alone = copy.deepcopy(model.q)
    assert alone._shrink_group is None  # the group stays with the parent
    assert torch.equal(alone(torch.ones(1, 12, **F64)), model.q(torch.ones(1, 12, **F64)))


def test_a_replaced_sharer_then_a_copy_or_a_save_keeps_the_others_sharing():
    model = lora_attention("on")
    x = torch.randn(2, 5, 12, **F64)
    run(model, x)
    model.k = nn.Linear(12, 6).double()  # the user swaps a sharer out: its weak reference dies
    for other in (copy.deepcopy(model), _saved_and_loaded(model)):
        y, _ = run(other, x)
        assert torch.allclose(y, run(model, x)[0], rtol=0, atol=1e-12)
        assert other.nodes["v"] == "LoRAExpandFunctionBackward"  # q and v still share
        assert other.q._shrink_group.members[1] is None and other.v._shrink_group is other.q._shrink_group


def _saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_layer_saved_alone_carries_neither_siblings_nor_parent():
    model = lora_attention("on")
    run(model, torch.randn(2, 5, 12, **F64))
    alone = io.BytesIO()
    torch.save(model.q, alone)
    plain = io.BytesIO()
    torch.save(copy.deepcopy(model.q), plain)  # a copy has no group at all
    assert abs(len(alone.getvalue()) - len(plain.getvalue())) < 200
    q = model.q
    del model  # the parent is gone; the layer still pickles and loads
    loaded = _saved_and_loaded(q)
    assert loaded._shrink_group is None
    assert torch.equal(loaded(torch.ones(1, 12, **F64)), q(torch.ones(1, 12, **F64)))


def test_a_layer_the_group_does_not_know_computes_its_own():
    """nn.DataParallel replicas share their __dict__ (and so the group) with the original."""
    model = lora_attention("on")
    x = torch.randn(2, 5, 12, **F64)
    run(model, x)
    stranger = copy.deepcopy(model.k)
    stranger._shrink_group = model.q._shrink_group
    model.q._shrink_group._open = True
    assert model.q._shrink_group.low_rank_input(stranger, x) is None
