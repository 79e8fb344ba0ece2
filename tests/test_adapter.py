"""Bottleneck adapters: invariants on llama-tiny and on plain module trees (tolerances next to each check)."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import tinytune as tt
from conftest import TinyLM
from tinytune.peft import adapter

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
D = 64  # llama-tiny hidden size (tinytune/models/presets.py)


def _llama():
    return tt.models.build("llama-tiny")


def _ids(batch=2, seq=9):
    return torch.randint(0, 256, (batch, seq))


def _randomise(model, std=0.2):
    """Make every adapter parameter non-zero, so adapters change the output."""
    with torch.no_grad():
        for _, layer in adapter.adapter_layers(model):
            for p in layer.adapter.parameters():
                p.normal_(std=std)


class Block(nn.Module):
    """A residual block of a user's own model (in == out features, so "parallel" fits)."""

    def __init__(self, d=16):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.ff(x)


class TupleAttention(nn.Module):
    """Returns (output, weights) as Hugging Face attention modules do; takes a keyword argument."""

    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden_states, scale=1.0):
        weights = torch.softmax(self.q_proj(hidden_states) @ hidden_states.transpose(-1, -2) * scale, -1)
        return self.o_proj(weights @ hidden_states), weights


class TupleModel(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.attn, self.head = TupleAttention(d), nn.Linear(d, 3)

    def forward(self, x):
        out, _ = self.attn(x, scale=0.5)
        return self.head(out)


CUSTOM = [  # (id, make model, targets, make input)
    ("sequential", lambda: nn.Sequential(nn.Linear(8, 16), Block(), Block(), nn.Linear(16, 4)), ["ff"],
     lambda: torch.randn(3, 8)),
    ("tiny-lm", TinyLM, None, lambda: torch.randint(0, 32, (2, 7))),
    ("tuple-output", TupleModel, ["attn"], lambda: torch.randn(2, 5, 16)),
]


def _adapted(make, placement, targets=None, **kw):
    model = make()
    base = copy.deepcopy(model)
    names = adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement=placement, targets=targets, **kw))
    return model.eval(), base.eval(), names


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_llama_equals_base_at_init_and_disabled_equals_base(placement):
    model, base, names = _adapted(_llama, placement)
    expected = ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert names == (expected if placement == "houlsby" else expected[1::2])
    ids = _ids()
    with torch.no_grad():
        reference = base(ids)
        assert torch.equal(model(ids), reference)  # up = 0: the adapters add exact zeros
        _randomise(model)
        assert (model(ids) - reference).abs().max() > 1e-3  # now they matter
        with adapter.disabled(model):
            assert torch.equal(model(ids), reference)
        assert not torch.equal(model(ids), reference)  # enabled again after the block


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind,make,targets,make_input", CUSTOM, ids=[c[0] for c in CUSTOM])
def test_custom_modules_equal_base_at_init_and_disabled(kind, make, targets, make_input, placement):
    model, base, names = _adapted(make, placement, targets)
    assert names and all(isinstance(model.get_submodule(n), adapter.AdapterLayer) for n in names)
    x = make_input()
    with torch.no_grad():
        reference = base(x)
        assert torch.equal(model(x), reference)
        _randomise(model)
        assert not torch.equal(model(x), reference)
        with adapter.disabled(model):
            assert torch.equal(model(x), reference)


def test_serial_and_parallel_maths_on_one_module():
    torch.manual_seed(1)
    sub = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    x = torch.randn(4, 6)
    for placement in PLACEMENTS:
        layer = adapter.AdapterLayer(copy.deepcopy(sub), 6, 3, placement, activation="silu", scaling=0.5)
        _randomise(nn.ModuleDict({"a": layer}))
        a = layer.adapter
        ref_a = lambda h: a.up(torch.nn.functional.silu(a.down(h)))  # noqa: E731  A(h) written out
        fx = layer.base(x)
        expected = fx + 0.5 * ref_a(x if placement == "parallel" else fx)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)  # fp32, same ops


def test_tuple_output_keeps_the_rest_and_parallel_reads_the_first_argument():
    model = TupleModel()
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement="parallel", targets=["attn"]))
    _randomise(model)
    x = torch.randn(2, 5, 16)
    out, weights = model.attn(x, scale=0.5)
    base_out, base_weights = model.attn.base(x, scale=0.5)
    assert torch.equal(weights, base_weights)  # the rest of the tuple is untouched
    torch.testing.assert_close(out, base_out + model.attn.adapter(x), rtol=0, atol=1e-6)
    out_kw, _ = model.attn(hidden_states=x, scale=0.5)  # keyword-only call: hidden_states is read
    assert torch.equal(out_kw, out)


def test_adapter_init_up_zero_and_down_kaiming():
    layer = adapter.BottleneckAdapter(256, 16)
    assert torch.count_nonzero(layer.up.weight) == 0 and torch.count_nonzero(layer.up.bias) == 0
    assert torch.count_nonzero(layer.down.bias) == 0
    assert 0 < layer.down.weight.abs().max() <= 1 / 256 ** 0.5  # kaiming_uniform(a=sqrt(5)), fan_in 256


def test_only_adapter_parameters_change_in_one_adamw_step():
    model, _, _ = _adapted(_llama, "houlsby")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # frozen ones have no grad
    ids = _ids()
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable and ".up." in n:
            assert not torch.equal(p, before[n]), n  # up gets a gradient at step 0
        elif n not in trainable:
            assert torch.equal(p, before[n]), n


def test_gradient_flows_into_up_at_init_and_into_down_once_up_is_nonzero():
    model, _, _ = _adapted(_llama, "pfeiffer")
    layer = model.model.layers[0].mlp
    model(_ids()).float().pow(2).mean().backward()
    assert layer.adapter.up.weight.grad.abs().sum() > 0
    assert layer.adapter.down.weight.grad.abs().sum() == 0  # exactly zero: up = 0 blocks it
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter." not in n)
    model.zero_grad()
    _randomise(model)
    model(_ids()).float().pow(2).mean().backward()
    assert layer.adapter.down.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model, _, _ = _adapted(_llama, "houlsby")
    _randomise(model, std=0.05)
    model.train()
    ids = _ids()
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])  # recomputation runs the same ops
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-5, atol=1e-7)  # fp32 accumulation order


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_kv_cache_generation_equals_full_forward(placement):
    model, base, _ = _adapted(_llama, placement)
    _randomise(model)
    prompt = _ids(2, 5)
    ids, logprobs = tt.generate(model, prompt, max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    seq = prompt
    with torch.no_grad():
        for step in range(6):  # greedy by recomputing the whole sequence, no cache
            logits = model(seq)[:, -1].float()
            token = logits.argmax(-1, keepdim=True)
            torch.testing.assert_close(logprobs[:, step], torch.log_softmax(logits, -1).gather(-1, token)[:, 0],
                                       rtol=1e-4, atol=1e-4)  # fp32: cached vs full attention sums
            seq = torch.cat((seq, token), dim=1)
    assert torch.equal(ids, seq)
    assert not torch.equal(ids, tt.generate(base, prompt, max_new_tokens=6, eos_token_id=[]))  # adapters matter


def test_state_dict_keys_and_bitwise_round_trip():
    model, _, _ = _adapted(_llama, "houlsby")
    _randomise(model)
    sd = adapter.state_dict(model)
    assert len(sd) == 4 * 4
    assert tuple(sd["base_model.model.model.layers.0.self_attn.adapter.down.weight"].shape) == (4, D)
    assert tuple(sd["base_model.model.model.layers.1.mlp.adapter.up.bias"].shape) == (D,)
    fresh, _, _ = _adapted(_llama, "houlsby")
    assert adapter.load_state_dict(fresh, sd) == ([], [])
    for k, v in adapter.state_dict(fresh).items():
        assert torch.equal(v, sd[k]), k
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    unprefixed = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    adapter.load_state_dict(fresh, unprefixed)  # the PEFT prefix is optional


def test_strict_load_names_bad_keys():
    model, _, _ = _adapted(_llama, "pfeiffer")
    sd = dict(adapter.state_dict(model))
    key = "base_model.model.model.layers.0.mlp.adapter.up.weight"
    with pytest.raises(ValueError, match=r"missing keys: \[.*layers\.0\.mlp\.adapter\.up\.weight"):
        adapter.load_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=r"unexpected keys: \['base_model\.model\.extra\.weight'\]"):
        adapter.load_state_dict(model, {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"mis-shaped keys: .*layers\.0\.mlp\.adapter\.up\.weight: given \(64, 8\)"):
        adapter.load_state_dict(model, {**sd, key: torch.zeros(D, 8)})
    missing, unexpected = adapter.load_state_dict(model, {key: sd[key], "extra.weight": torch.zeros(1)}, strict=False)
    assert len(missing) == 7 and unexpected == ["base_model.model.extra.weight"]


def test_peft_config_round_trip_and_applied_config():
    model, _, names = _adapted(_llama, "parallel", activation="gelu", scaling=2.0, dropout=0.1)
    cfg = adapter.applied_config(model)
    assert cfg.targets == names and cfg.placement == "parallel"
    data = json.loads(json.dumps(adapter.peft_config_dict(cfg)))
    assert data["peft_type"] == "BOTTLENECK_ADAPTER" and data["bottleneck_size"] == 4
    assert data["target_modules"] == names
    assert adapter.config_from_peft(data) == cfg
    fresh = _llama()
    assert adapter.apply(fresh, adapter.config_from_peft(data)) == names
    adapter.load_state_dict(fresh, adapter.state_dict(model))
    by_factor = adapter.AdapterConfig(reduction_factor=8, placement="pfeiffer")
    assert adapter.config_from_peft(adapter.peft_config_dict(by_factor)) == by_factor


def test_peft_config_errors():
    with pytest.raises(ValueError, match=r"peft_type='LORA'; expected 'BOTTLENECK_ADAPTER'"):
        adapter.config_from_peft({"peft_type": "LORA", "r": 8})
    with pytest.raises(ValueError, match="neither bottleneck_size nor reduction_factor"):
        adapter.config_from_peft({"peft_type": "BOTTLENECK_ADAPTER"})
    with pytest.raises(ValueError, match="AdapterConfig.targets is a callable"):
        adapter.peft_config_dict(adapter.AdapterConfig(targets=lambda n, m: False))
    with pytest.raises(ValueError, match="not all made by one adapter.apply"):
        adapter.applied_config(nn.Sequential(adapter.AdapterLayer(nn.Linear(4, 4), 4, 2)))


def _per_adapter(d, b):
    return 2 * d * b + b + d  # down (b x d + b) + up (d x b + d)


@pytest.mark.parametrize("placement,count", [("houlsby", 4), ("pfeiffer", 2), ("parallel", 2)])
def test_parameter_counts_llama(placement, count):
    model = _llama()
    total = tt.count_parameters(model).total
    adapter.apply(model, adapter.AdapterConfig(bottleneck=8, placement=placement))
    pc = tt.count_parameters(model)
    assert pc.trainable == count * (2 * 64 * 8 + 8 + 64) == count * adapter.parameter_count(D, 8)
    assert (pc.total, pc.frozen) == (total + pc.trainable, total)


def test_parameter_counts_custom_and_reduction_factor():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 12))
    adapter.apply(model, adapter.AdapterConfig(reduction_factor=4, targets=["0", "2"]))
    assert [layer.bottleneck for _, layer in adapter.adapter_layers(model)] == [5, 3]  # 20 // 4, 12 // 4
    assert tt.count_parameters(model).trainable == _per_adapter(20, 5) + _per_adapter(12, 3) == 225 + 87


def test_bf16_base_keeps_fp32_adapters_and_autocast_backward():
    model, _, _ = _adapted(lambda: tt.models.build("llama-tiny", dtype=torch.bfloat16), "houlsby")
    layer = model.model.layers[0].self_attn
    assert layer.adapter.up.weight.dtype == torch.float32
    _randomise(model)
    with torch.no_grad():
        assert model(_ids()).dtype == torch.bfloat16  # adapters cast to the compute dtype
    fp32, _, _ = _adapted(_llama, "parallel")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(_ids())
    out.float().sum().backward()
    grad = fp32.model.layers[0].mlp.adapter.up.weight.grad
    assert grad is not None and grad.dtype == torch.float32


def test_wrapper_reads_base_attributes_and_encoder_fast_path_sees_the_adapter():
    model, _, _ = _adapted(_llama, "houlsby")
    assert model.model.layers[0].self_attn.nh == 4 and model.model.layers[0].mlp.gate_proj.out_features == 128
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    adapter.apply(enc, adapter.AdapterConfig(bottleneck=4, placement="parallel", targets=["self_attn"]))
    _randomise(enc)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # eval + no_grad is when the fused fast path would run
        active = enc(x)
        with adapter.disabled(enc):
            plain = enc(x)
    assert (active - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    ({"bottleneck": 0}, r"bottleneck must be an integer >= 1, got bottleneck=0"),
    ({"bottleneck": None}, r"needs bottleneck or reduction_factor"),
    ({"placement": "serial"}, r"placement='serial'; expected one of 'houlsby', 'pfeiffer', 'parallel'"),
    ({"activation": "swish"}, r"activation='swish'; expected one of 'relu', 'gelu', 'silu', 'tanh'"),
    ({"scaling": 0.0}, r"scaling must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"reduction_factor": 0}, r"reduction_factor must be an integer >= 1"),
    ({"hidden_size": -2}, r"hidden_size must be an integer >= 1"),
    ({"bottleneck": 32, "reduction_factor": 16, "hidden_size": 64}, r"bottleneck=32 conflicts with reduction_factor=16"),
    ({"reduction_factor": 128, "hidden_size": 64}, r"reduction_factor=128 leaves no bottleneck"),
    ({"targets": "(unclosed"}, r"AdapterConfig.targets='\(unclosed' is not a valid regular expression"),
    ({"exclude": [""]}, r"AdapterConfig.exclude entries must be non-empty strings"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adapter.AdapterConfig(**kwargs)


def test_explicit_bottleneck_with_agreeing_reduction_factor_is_allowed():
    cfg = adapter.AdapterConfig(bottleneck=4, reduction_factor=16)
    assert adapter.apply(_llama(), cfg)  # 64 // 16 = 4 for every module


def test_apply_errors():
    with pytest.raises(ValueError, match=r"matched no module .* 'embed_tokens', 'layers', 'self_attn'"):
        adapter.apply(TinyLM(), adapter.AdapterConfig(targets=["attention"]))
    model = _llama()
    adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement="pfeiffer"))
    with pytest.raises(ValueError, match=r"already has bottleneck adapters on \['model.layers.0.mlp'"):
        adapter.apply(model, adapter.AdapterConfig(bottleneck=4, placement="houlsby"))
    with pytest.raises(ValueError, match=r"bottleneck=8 conflicts with reduction_factor=16: 'model.layers.0.mlp'"):
        adapter.apply(_llama(), adapter.AdapterConfig(bottleneck=8, reduction_factor=16, placement="pfeiffer"))
    with pytest.raises(TypeError, match=r"'model.layers' .* is a ModuleList, which has no forward"):
        adapter.apply(_llama(), adapter.AdapterConfig(targets=r"model\.layers"))
    with pytest.raises(ValueError, match=r"matched both 'model.layers.0.mlp' and modules inside it"):
        adapter.apply(_llama(), adapter.AdapterConfig(targets=r".*mlp.*"))
    with pytest.raises(TypeError, match="apply expects an AdapterConfig, got LoraConfig"):
        adapter.apply(_llama(), tt.lora.LoraConfig())


def test_hidden_size_errors():
    seq = lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 12))  # noqa: E731
    with pytest.raises(ValueError, match=r"placement='parallel' .* '0' \(Linear\) maps 10 -> 20"):
        adapter.apply(seq(), adapter.AdapterConfig(placement="parallel", targets=["0"]))
    with pytest.raises(ValueError, match=r"hidden_size=16 does not match '2' \(Linear\), which outputs 12"):
        adapter.apply(seq(), adapter.AdapterConfig(hidden_size=16, targets=["2"]))
    with pytest.raises(ValueError, match=r"cannot infer the hidden size of '1' \(ReLU\)"):
        adapter.apply(seq(), adapter.AdapterConfig(targets=["1"]))
    relu = seq()
    adapter.apply(relu, adapter.AdapterConfig(bottleneck=2, hidden_size=20, targets=["1"]))
    assert relu(torch.randn(3, 10)).shape == (3, 12)  # explicit hidden_size for a module without linears
    wrong = nn.Sequential(nn.Linear(10, 20), nn.ReLU())
    adapter.apply(wrong, adapter.AdapterConfig(bottleneck=2, hidden_size=16, targets=["1"]))
    with pytest.raises(ValueError, match=r"hidden size 16 but the sublayer's output has shape \(3, 20\)"):
        wrong(torch.randn(3, 10))
    with pytest.raises(TypeError, match="nn.MultiheadAttention reads its weights directly"):
        adapter.apply(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                      adapter.AdapterConfig(targets=["out_proj"]))


def test_without_adapters_and_unsupported_outputs():
    for call in (lambda: adapter.disabled(TinyLM()).__enter__(), lambda: adapter.load_state_dict(TinyLM(), {})):
        with pytest.raises(ValueError, match="TinyLM has no bottleneck adapters"):
            call()
    assert adapter.state_dict(TinyLM()) == {}
    layer = adapter.AdapterLayer(nn.ModuleDict({"x": nn.Linear(2, 2)}), 2, 1)
    layer.base.forward = lambda x: {"out": x}
    with pytest.raises(TypeError, match="returned dict; an adapter needs a tensor or a tuple"):
        layer(torch.randn(1, 2))
