"""fit's logs: progress (lines, tqdm bar), grad_norm, TensorBoard / W&B, callbacks, the bf16 CPU warning, loss.png."""
import io
import json
import math
import re
import sys
import types

import pytest
import torch
import torch.nn as nn

import tinytune as tt
from tinytune.train import Callback, TrainConfig, fit
from tinytune.train import plots, precision

PNG = b"\x89PNG\r\n\x1a\n"


class Tiny(nn.Module):
    """Embedding + linear head: (B, T) ids -> (B, T, 16) logits; trains in milliseconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def _data(n: int = 16):
    return [{"input_ids": [(i + k) % 16 for k in range(6)], "labels": [-100] + [(i + k) % 16 for k in range(1, 6)]}
            for i in range(n)]


def _cfg(**kw):
    return TrainConfig(**{**dict(lr=1e-2, steps=4, batch_size=4, log_every=2), **kw})


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------- progress


def test_lines_show_smoothed_loss_lr_grad_norm_speed_elapsed_eta_and_every_eval_metric():
    out = io.StringIO()  # not a terminal: "auto" prints lines
    h = fit(Tiny(), _data(), _cfg(eval_every=2), eval_data=_data(4), stream=out)
    text = out.getvalue()
    steps = [line for line in text.splitlines() if " eval " not in line]
    assert [line.split()[1] for line in steps] == ["2/4", "4/4"] and "\r" not in text
    for field in ("loss", "lr", "grad_norm", "tok/s", "elapsed", "ETA"):
        assert all(field in line for line in steps), field
    shown = float(re.search(r"loss (\S+)", steps[0]).group(1))
    assert shown == pytest.approx(sum(h.losses[:2]) / 2, abs=1e-4)  # the mean of the window (4 decimals shown)
    evals = [line for line in text.splitlines() if " eval " in line]
    assert len(evals) == 2 and all(k in evals[-1] for k in h.eval_metrics[-1])


def test_grad_norm_is_recorded_before_clipping(tmp_path):
    free = fit(Tiny(), _data(), _cfg(max_grad_norm=None, steps=1), stream=io.StringIO())
    clipped = fit(Tiny(), _data(), _cfg(max_grad_norm=1e-3, steps=2, out_dir=tmp_path), stream=io.StringIO())
    first = free.metrics[0]["grad_norm"]
    assert first > 1e-3 and clipped.metrics[0]["grad_norm"] == pytest.approx(first, rel=1e-6)
    assert [r["grad_norm"] for r in _records(tmp_path)] == pytest.approx([m["grad_norm"] for m in clipped.metrics])


def test_bar_mode_draws_one_tqdm_line_per_step_into_the_stream():
    out = io.StringIO()
    fit(Tiny(), _data(), _cfg(progress="bar", steps=3), stream=out)
    text = out.getvalue()
    assert text.count("\r") == 3 and "step 3/3" in text and "grad_norm" in text and "ETA" in text
    assert text.endswith("\n")


def test_progress_none_prints_nothing_but_still_writes_metrics(tmp_path):
    out = io.StringIO()
    fit(Tiny(), _data(), _cfg(progress="none", out_dir=tmp_path), stream=out)
    assert out.getvalue() == "" and len(_records(tmp_path)) == 4


# ---------------------------------------------------------------------------------------- trackers


class Extra(Callback):
    def on_step(self, step, history, metrics):
        return {"doubled": 2.0 * step}

    def on_evaluate(self, step, history, metrics):
        return {"half_loss": metrics["loss"] / 2}


def test_tensorboard_events_hold_train_and_eval_scalars(tmp_path):
    pytest.importorskip("tensorboard")  # (a dev dependency; the extra tinytune[tensorboard])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = fit(Tiny(), _data(), _cfg(report_to="tensorboard", out_dir=tmp_path, eval_every=2), eval_data=_data(4),
            callbacks=[Extra()], stream=io.StringIO())
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/doubled",
            "eval/loss", "eval/half_loss"} | {f"eval/{k}" for k in h.eval_metrics[-1]} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    evals = events.Scalars("eval/loss")
    assert [e.step for e in evals] == [2, 4]
    assert [e.value for e in evals] == pytest.approx(h.eval_losses, rel=1e-6)  # stored as float32


def test_wandb_run_is_initialised_logged_and_finished(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw)
    fake.log = lambda data, step: calls["log"].append((step, data))
    fake.finish = lambda: calls.__setitem__("finish", calls["finish"] + 1)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "myrun"
    fit(Tiny(), _data(), _cfg(report_to=["wandb"], out_dir=out, eval_every=4), eval_data=_data(4),
        callbacks=[Extra()], stream=io.StringIO())
    (init,) = calls["init"]
    assert init["project"] == "tinytune" and init["name"] == "myrun" and init["dir"] == str(out)
    assert init["config"]["lr"] == 1e-2 and init["config"]["report_to"] == ["wandb"]
    train = [(s, d) for s, d in calls["log"] if "train/loss" in d]
    assert [s for s, _ in train] == [2, 4] and train[0][1]["train/doubled"] == 4.0
    assert [s for s, d in calls["log"] if "eval/loss" in d] == [4] and calls["finish"] == 1


@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_missing_tracker_package_fails_before_anything_changes(tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    model = Tiny().to(torch.float64)  # fit would make the trainable parameters fp32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ImportError, match=rf"{package} package is not installed.*pip install {package}"):
        fit(model, _data(), _cfg(report_to=package, out_dir=tmp_path / "run"), stream=io.StringIO())
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float64 for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(report_to="tb"), r"TrainConfig.report_to='tb' is not one of \['tensorboard', 'wandb'\]"),
    (dict(report_to=3), r"TrainConfig.report_to must be a name or a tuple/list"),
    (dict(report_to="tensorboard"), r"report_to includes 'tensorboard'.*out_dir and logging_dir are both None"),
    (dict(progress="tqdm"), r"TrainConfig.progress='tqdm' is not one of \['auto', 'bar', 'lines', 'none'\]"),
    (dict(wandb_project=""), r"TrainConfig.wandb_project must be a non-empty string"),
])
def test_reporting_fields_are_validated(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**kwargs)


def test_report_to_accepts_none_a_name_or_a_list():
    assert TrainConfig(report_to="none").report_to == () and TrainConfig(report_to="wandb").report_to == ("wandb",)
    assert TrainConfig(report_to=["wandb", "wandb"]).report_to == ("wandb",)


# ---------------------------------------------------------------------------------------- callbacks


def test_callback_metrics_reach_metrics_jsonl_and_history(tmp_path):
    h = fit(Tiny(), _data(), _cfg(out_dir=tmp_path, eval_every=2), eval_data=_data(4), callbacks=[Extra()],
            stream=io.StringIO())
    assert [m["doubled"] for m in h.metrics] == [2.0, 4.0, 6.0, 8.0]
    assert [m["half_loss"] for m in h.eval_metrics] == pytest.approx([v / 2 for v in h.eval_losses], rel=1e-12)
    records = _records(tmp_path)
    assert [r["doubled"] for r in records if "loss" in r] == [2.0, 4.0, 6.0, 8.0]
    assert [r["eval_half_loss"] for r in records if "eval_loss" in r] == pytest.approx(
        [v / 2 for v in h.eval_losses], rel=1e-12)


def test_plain_callable_and_stop_requested_stop_training():
    h = fit(Tiny(), _data(), _cfg(steps=6), callbacks=[lambda step, history: step == 2], stream=io.StringIO())
    assert h.step == 2 and h.stopped_reason == "stopped by a callback at step 2"

    class StopAt3(Callback):
        def on_step(self, step, history, metrics):
            history.stop_requested = step == 3
            return {"seen": 1.0}

    h = fit(Tiny(), _data(), _cfg(steps=6), callbacks=[StopAt3()], stream=io.StringIO())
    assert h.step == 3 and h.metrics[-1]["seen"] == 1.0 and "callback" in h.stopped_reason


@pytest.mark.parametrize("callback, match", [
    (type("Yes", (Callback,), {"on_step": lambda self, s, h, m: "yes"}), r"callback Yes\.on_step returned 'yes'"),
    (type("Evals", (Callback,), {"on_evaluate": lambda self, s, h, m: True}), r"Evals\.on_evaluate returned True"),
    (type("Strs", (Callback,), {"on_step": lambda self, s, h, m: {"a": "b"}}), r"returned \{'a': 'b'\}"),
])
def test_bad_callback_return_raises_a_type_error_naming_it(callback, match):
    with pytest.raises(TypeError, match=match):
        fit(Tiny(), _data(), _cfg(steps=1), eval_data=_data(4), callbacks=[callback()], stream=io.StringIO())


def test_plain_callable_returning_a_number_raises():
    def three(step, history):
        return 3

    with pytest.raises(TypeError, match=r"callback .*three returned 3 \(int\)"):
        fit(Tiny(), _data(), _cfg(steps=1), callbacks=[three], stream=io.StringIO())


def test_on_save_gets_each_committed_checkpoint(tmp_path):
    seen = []

    class Saves(Callback):
        def on_save(self, step, history, path):
            seen.append((step, path.name, (path / "manifest.json").is_file()))

    h = fit(Tiny(), _data(), _cfg(out_dir=tmp_path, save_every=2), callbacks=[Saves()], stream=io.StringIO())
    assert seen == [(2, "step-0000002", True), (4, "step-0000004", True)] and h.checkpoint.name == "step-0000004"


# ---------------------------------------------------------------------------------------- bf16 on CPU


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(monkeypatch, tmp_path):
    with pytest.warns(RuntimeWarning, match=r"vector flags avx avx2\).*several times slower.*dtype='fp32'"):
        assert precision.warn_if_slow_cpu_bf16("bf16", "cpu", lambda: frozenset({"fpu", "avx", "avx2"}))
    for flags in ({"avx512_bf16"}, {"amx_bf16"}, {"asimd", "bf16"}):
        assert not precision.warn_if_slow_cpu_bf16("bf16", "cpu", lambda: frozenset(flags))
    assert not precision.warn_if_slow_cpu_bf16("bf16", "cpu", lambda: None)  # unknown CPU: nothing said
    assert not precision.warn_if_slow_cpu_bf16("fp32", "cpu", lambda: frozenset())
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n\nprocessor\t: 1\nFeatures\t: fp\n")
    assert precision.cpu_flags(info) == {"fp", "asimd", "bf16"} and precision.cpu_flags(tmp_path / "no") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse2"}))
    with pytest.warns(RuntimeWarning, match="several times slower") as caught:
        fit(Tiny(), _data(), _cfg(steps=2, dtype="bf16"), stream=io.StringIO())
    assert sum("several times slower" in str(w.message) for w in caught) == 1


# ---------------------------------------------------------------------------------------- loss.png


def test_loss_png_is_written_and_log_scale_is_chosen_when_losses_span_decades(tmp_path):
    pytest.importorskip("matplotlib")  # (a dev dependency; the extra tinytune[plot])
    fit(Tiny(), _data(), _cfg(out_dir=tmp_path, eval_every=2), eval_data=_data(4), stream=io.StringIO())
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG and not (tmp_path / "loss.svg").exists()
    assert plots.use_log_scale([10.0, 0.2]) and not plots.use_log_scale([10.0, 0.5])  # 1.7 vs 1.3 decades
    assert not plots.use_log_scale([10.0, math.nan, -1.0, 0.0, 2.0]) and not plots.use_log_scale([5.0])
    assert plots.loss_figure([100.0, 10.0, 1.0, 0.1]).axes[0].get_yscale() == "log"
    fig = plots.loss_figure([3.0, 2.5, 2.0], [2, 3], [2.7, 2.2], title="causal_lm loss")
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss"
    assert ax.get_title() == "causal_lm loss" and len(ax.lines) == 3  # raw, smoothed, eval
    assert plots.smooth([1.0, 3.0, math.nan, 5.0], 2) == [1.0, 2.0, 3.0, 5.0]


def test_without_matplotlib_nothing_is_drawn_and_the_run_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(plots, "_told_no_matplotlib", [])
    outs = [io.StringIO(), io.StringIO()]
    for k, out in enumerate(outs):
        fit(Tiny(), _data(), _cfg(steps=1, out_dir=tmp_path / str(k)), stream=out)
        assert not (tmp_path / str(k) / "loss.png").exists()
    assert "pip install matplotlib" in outs[0].getvalue() and "metrics.jsonl" in outs[0].getvalue()
    assert "matplotlib" not in outs[1].getvalue()
