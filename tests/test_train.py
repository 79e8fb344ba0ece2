"""tinytune.train: the loop, precision, schedules, checkpoints/resume, logs and errors, on tiny models."""
import io
import json
import math
import os
import signal

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import tinytune as tt
import tinytune.train
from tinytune.train import TrainConfig, fit

QUIET = io.StringIO  # progress output goes to a throwaway stream in tests


def _model(dropout: float = 0.0, targets="all-linear"):
    model = tt.models.build("llama-tiny")  # seeded: the same weights every call
    torch.manual_seed(1)  # LoRA init draws from the global generator
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=targets, dropout=dropout))
    return model


def _data(n: int = 32, seed: int = 0):
    """Counting sequences over 16 of the 256 tokens (next token = this + 1 mod 16): learnable in a few
    steps. Varied lengths, so batches are padded; the first two tokens are a prompt, not scored."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(0, 16, (1,), generator=gen))
        ids = [(start + k) % 16 for k in range(8 + i % 6)]
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def _cfg(**kw):
    base = dict(lr=1e-2, steps=6, batch_size=8, log_every=1000)
    return TrainConfig(**{**base, **kw})


def _trainable(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# ---------------------------------------------------------------------------------------- learning


def test_loss_decreases_on_a_learnable_task():
    # LoRA on lm_head too: the frozen random head caps the logits' range (and so how low the loss can go).
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    history = fit(_model(targets=targets), _data(), _cfg(steps=30), stream=QUIET())
    assert len(history.losses) == 30 and history.step == 30 and history.stopped_reason == "completed"
    first, last = sum(history.losses[:5]) / 5, sum(history.losses[-5:]) / 5
    assert last < first - 2.0, (first, last)  # measured: ~5.4 -> ~1.3
    assert history.tokens_per_s > 0


def test_only_trainable_parameters_move_and_base_is_bitwise_unchanged():
    model = _model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit(model, _data(), _cfg(steps=3), stream=QUIET())
    for name, param in model.named_parameters():
        if param.requires_grad:
            if name.endswith("lora_B"):  # B starts at 0 and must move
                assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    assert not model.training  # left in the mode it came in (build returns eval mode)


def test_any_module_returning_logits_works(tiny_lm):
    # conftest's TinyLM: forward(ids) without attention_mask, everything trainable (full fine-tuning)
    history = fit(tiny_lm, [{"input_ids": [i % 32 for i in range(j, j + 10)], "labels": [i % 32 for i in range(j, j + 10)]}
                            for j in range(16)], _cfg(steps=3, batch_size=4), stream=QUIET())
    assert all(math.isfinite(x) for x in history.losses)


def test_packed_examples_score_like_unpacked_ones():
    model, data = _model(), _data(12)
    packed = tt.data.pack_examples(data, max_length=40)  # position_ids + segment_ids per row
    assert len(packed) < len(data)
    cfg = _cfg(batch_size=4)
    # Tolerance: same tokens, positions and visibility; only the matmul shapes differ.
    assert tinytune.train.evaluate(model, packed, cfg) == pytest.approx(tinytune.train.evaluate(model, data, cfg),
                                                                        rel=1e-5)
    history = fit(model, packed, _cfg(steps=2, batch_size=2), stream=QUIET())
    assert all(math.isfinite(x) for x in history.losses)


def test_grad_accum_2x4_equals_1x8():
    a, b = _model(), _model()
    ha = fit(a, _data(), _cfg(batch_size=8, grad_accum=1), stream=QUIET())
    hb = fit(b, _data(), _cfg(batch_size=4, grad_accum=2), stream=QUIET())
    # Tolerance: only float summation order differs (measured max |diff| ~5e-7 on losses ~5.5).
    assert ha.losses == pytest.approx(hb.losses, rel=1e-5, abs=1e-5)
    for (name, pa), pb in zip(_trainable(a).items(), _trainable(b).values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def test_loss_is_mean_over_scored_tokens_with_shift():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [4, 5, -100, -100, -100]])
    expected = []
    for b in range(2):
        for t in range(1, 5):  # labels[t] scores logits[t - 1]
            if labels[b, t] != -100:
                expected.append(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
    got = tinytune.train.causal_lm_loss(logits, labels)
    torch.testing.assert_close(got, torch.stack(expected).mean())


def test_fp32_and_bf16_losses_agree():
    h32 = fit(_model(), _data(), _cfg(steps=8, dtype="fp32"), stream=QUIET())
    h16 = fit(_model(), _data(), _cfg(steps=8, dtype="bf16"), stream=QUIET())
    # Tolerance: bf16 autocast keeps ~3 significant digits; measured max |diff| ~0.03 on losses ~5.5.
    assert h16.losses == pytest.approx(h32.losses, abs=0.1)
    assert h16.losses[-1] < h16.losses[0]


def test_bf16_frozen_base_keeps_trainable_fp32():
    model = _model()
    history = fit(model, _data(), _cfg(steps=3, dtype="bf16", base_dtype="bf16"), stream=QUIET())
    assert all(math.isfinite(x) for x in history.losses)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name


def test_gradient_checkpointing_gives_the_same_losses():
    plain = fit(_model(), _data(), _cfg(steps=3), stream=QUIET())
    model = _model()
    ckpt = fit(model, _data(), _cfg(steps=3, grad_checkpointing=True), stream=QUIET())
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    assert model.model.gradient_checkpointing is False  # switched back off


# ---------------------------------------------------------------------------------------- optimizer


def test_schedule_warmup_then_cosine_matches_closed_form():
    steps, warmup, lr = 10, 3, 1e-2
    history = fit(_model(), _data(), _cfg(steps=steps, lr=lr, warmup_steps=warmup, schedule="cosine"), stream=QUIET())
    for s, got in enumerate(history.lrs):
        want = lr * ((s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
        assert got == pytest.approx(want, rel=1e-12), s
    linear = [tinytune.train.lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert linear == pytest.approx([1 - s / 10 for s in range(10)])
    assert tinytune.train.lr_factor(7, 10, 2, "constant") == 1.0


def test_no_weight_decay_on_biases_and_norms():
    model = tt.models.build("qwen2-tiny")  # q/k/v biases, RMSNorm weights; fully trainable
    opt = tinytune.train.build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(n.endswith("bias") or "norm" in n for n in no_decay["names"])
    assert {"model.norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= set(no_decay["names"])
    assert "model.layers.0.self_attn.q_proj.weight" in decay["names"]
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    lora = _model()
    names = [n for g in tinytune.train.build_optimizer(lora, TrainConfig()).param_groups for n in g["names"]]
    assert names and all("lora_" in n for n in names)  # frozen parameters are not in the optimizer


# ---------------------------------------------------------------------------------------- stopping


class _Poisonable(nn.Module):
    """Wraps a model; while `poison` is set its logits are NaN."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.poison = inner, False

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids, attention_mask=attention_mask)
        return logits * float("nan") if self.poison else logits


def test_non_finite_loss_skips_the_step_then_stops_after_k(tmp_path):
    model = _Poisonable(_model())

    def poison_after_4(step, history):
        model.poison = step >= 4

    cfg = _cfg(steps=20, save_every=2, max_bad_steps=3, out_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = fit(model, _data(), cfg, callbacks=[poison_after_4], stream=QUIET())
    assert history.step == 7 and history.skipped_steps == [5, 6, 7]
    assert "3 consecutive" in history.stopped_reason and "step-0000004" in history.stopped_reason
    assert history.checkpoint.name == "step-0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    saved = load_file(str(history.checkpoint / "trainable.safetensors"))
    for name, param in _trainable(model).items():  # skipped steps did not touch the weights
        assert torch.equal(saved[name], param), name


def test_a_single_non_finite_step_is_skipped_and_training_goes_on():
    model = _Poisonable(_model())
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        history = fit(model, _data(), _cfg(steps=4), callbacks=[lambda s, h: setattr(model, "poison", s == 1)],
                      stream=QUIET())
    assert history.skipped_steps == [2] and history.stopped_reason == "completed"
    assert math.isnan(history.losses[1]) and all(math.isfinite(x) for x in history.losses[2:])


def test_early_stopping_on_eval_loss():
    # lr so small that the eval loss cannot move: no improvement after the first evaluation.
    history = fit(_model(), _data(), _cfg(steps=20, lr=1e-12, eval_every=1, early_stopping_patience=2),
                  eval_data=_data(8, seed=1), stream=QUIET())
    assert history.step == 3 and history.eval_steps == [1, 2, 3]
    assert history.stopped_reason.startswith("early stopping at step 3")


# ---------------------------------------------------------------------------------------- checkpoints


def test_resume_gives_exactly_the_uninterrupted_losses(tmp_path):
    # Dropout, shuffling across epochs (32 examples / 8 per step), accumulation, warmup + cosine, eval:
    # everything that consumes RNG or position must carry over exactly.
    kw = dict(steps=6, batch_size=4, grad_accum=2, schedule="cosine", warmup_steps=2, eval_every=2,
              weight_decay=0.01)
    full_model = _model(dropout=0.1)
    full = fit(full_model, _data(), _cfg(**kw), eval_data=_data(8, seed=1), stream=QUIET())

    first = fit(_model(dropout=0.1), _data(), _cfg(**kw, out_dir=tmp_path), eval_data=_data(8, seed=1),
                callbacks=[lambda step, h: step == 3], stream=QUIET())
    assert first.stopped_reason == "stopped by a callback at step 3" and first.checkpoint.name == "step-0000003"
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG it starts with
    resumed_model = _model(dropout=0.1)
    resumed = fit(resumed_model, _data(), _cfg(**kw, out_dir=tmp_path, resume=True), eval_data=_data(8, seed=1),
                  stream=QUIET())
    assert resumed.losses == full.losses  # exactly, on CPU
    assert resumed.lrs == full.lrs and resumed.eval_losses == full.eval_losses
    for (name, a), b in zip(_trainable(full_model).items(), _trainable(resumed_model).values()):
        assert torch.equal(a, b), name


def test_checkpoint_files_hold_no_pickle(tmp_path):
    model = _model()
    history = fit(model, _data(), _cfg(steps=2, out_dir=tmp_path), stream=QUIET())
    path = history.checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "state.safetensors",
                                                      "tinytune_manifest.json", "trainable.safetensors"]
    from tinytune.train import state_codec
    decoded = state_codec.decode(json.loads((path / "state.json").read_text()),
                                 load_file(str(path / "state.safetensors")), "test")
    opt, state = decoded["optimizer"], decoded["loop"]
    assert state["step"] == 2 and set(state["rng"]) >= {"torch", "python", "numpy"}
    assert state["data"] == {"epoch": 0, "index": 16, "num_examples": 32}
    assert len(opt["state"]) == len(_trainable(model)) and set(opt["state"]) == set(range(len(opt["state"])))
    assert isinstance(opt["param_groups"][0]["betas"], tuple)  # types survive the JSON round trip
    weights = load_file(str(path / "trainable.safetensors"))
    assert set(weights) == set(_trainable(model)) and all("lora_" in k for k in weights)
    assert json.loads((path / "manifest.json").read_text())["step"] == 2
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
    (tmp_path / "checkpoints" / "step-0000099").mkdir()  # half-written: no manifest, never picked
    assert tinytune.train.find_checkpoint(tmp_path) == path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_restores_the_handler(tmp_path, sig):
    previous = signal.getsignal(sig)
    with pytest.raises(tinytune.train.TrainingInterrupted, match=f"interrupted by {sig.name} at step 2") as info:
        fit(_model(), _data(), _cfg(steps=10, out_dir=tmp_path),
            callbacks=[lambda step, h: step == 2 and os.kill(os.getpid(), sig)], stream=QUIET())
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.history.checkpoint.name == "step-0000002"
    assert (info.value.history.checkpoint / "manifest.json").is_file()
    assert signal.getsignal(sig) is previous


# ---------------------------------------------------------------------------------------- logs


def test_metrics_jsonl_loss_png_and_plain_progress_lines(tmp_path):
    out = QUIET()
    fit(_model(), _data(), _cfg(steps=4, log_every=2, eval_every=2, out_dir=tmp_path),
        eval_data=_data(8, seed=1), stream=out)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert {"lr", "tokens_per_s"} <= set(records[0])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [line for line in out.getvalue().splitlines() if "loss" in line and "eval" not in line]
    assert len(lines) == 2 and lines[0].startswith("step 2/4") and "tok/s" in lines[0] and "ETA" in lines[0]
    assert "\r" not in out.getvalue()


def test_terminal_progress_rewrites_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    fit(_model(), _data(), _cfg(steps=3), stream=out)
    assert out.getvalue().count("\r") == 3 and "step 3/3" in out.getvalue() and "ETA" in out.getvalue()


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="fp8"), r"TrainConfig.dtype='fp8' is not one of"),
    (dict(dtype="fp16"), r"dtype='fp16' needs device='cuda'"),
    (dict(batch_size=0), r"TrainConfig.batch_size must be an int >= 1"),
    (dict(lr=-1.0), r"TrainConfig.lr"),
    (dict(schedule="step"), r"TrainConfig.schedule='step'"),
    (dict(base_dtype="bf16"), r"base_dtype='bf16' needs dtype='bf16'"),
    (dict(max_grad_norm=0), r"TrainConfig.max_grad_norm"),
    (dict(early_stopping_patience=0), r"TrainConfig.early_stopping_patience"),
    (dict(resume=True), r"resume=True resumes from out_dir"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_fit_errors_name_the_offending_thing(tmp_path):
    data = _data(4)
    bad = [data[0], {"input_ids": [1, 2, 3], "labels": [1, 2]}]
    with pytest.raises(ValueError, match=r"train_data\[1\]: input_ids has 3 tokens, labels has 2"):
        fit(_model(), bad, _cfg())
    with pytest.raises(ValueError, match=r"eval_data\[0\] must be a dict with 'input_ids' and 'labels', got \['input_ids'\]"):
        fit(_model(), data, _cfg(), eval_data=[{"input_ids": [1, 2]}])
    frozen = tt.models.build("llama-tiny").requires_grad_(False)
    with pytest.raises(ValueError, match="CausalLM has no trainable parameter"):
        fit(frozen, data, _cfg())
    pooled = nn.Sequential(nn.Embedding(16, 16), nn.Flatten(0, 1))  # (B * T, 16): not (B, T, V)
    with pytest.raises(ValueError, match=r"Sequential must return logits of shape \(batch, seq, vocab\)"):
        fit(pooled, data, _cfg(steps=1))
    with pytest.raises(ValueError, match="packed examples .* need a model whose forward takes attention_mask"):
        fit(nn.Sequential(nn.Embedding(16, 16)), tt.data.pack_examples(data, 40), _cfg(steps=1))
    with pytest.raises(ValueError, match="Linear has no set_gradient_checkpointing"):
        fit(nn.Linear(3, 3), data, _cfg(grad_checkpointing=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        fit(_model(), data, _cfg(), resume_from=tmp_path)
