"""What the training and evaluation commands report: the task metrics of a model on held-out data, and the
facts of a run that go into the adapter's model card (`tt.save_adapter(..., card_info=...)`)."""
from __future__ import annotations

import math


def final_metrics(model, data, cfg) -> dict[str, float]:
    """The task's metrics of `model` on `data`: `tt.train.evaluate`'s dict ({"loss", "perplexity"} for a causal
    LM, {"loss", "accuracy", "macro_f1"} for classification, entity precision/recall/F1 for NER) as floats."""
    from ..train import evaluate
    return {k: float(v) for k, v in evaluate(model, data, cfg).items()}


def card_info(opts: dict, metrics: dict | None, cfg) -> dict:
    """`card_info` for the adapter's model card: the training data, the final held-out metrics and the main
    hyperparameters of a finetune run."""
    datasets = [str(opts["data"])] + ([str(opts["eval_data"])] if opts.get("eval_data") else [])
    training = {"task": opts["task"], "method": opts["method"], "steps": cfg.steps, "lr": cfg.lr,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "schedule": cfg.schedule,
                "warmup_steps": cfg.warmup_steps, "dtype": cfg.dtype, "seed": cfg.seed}
    if opts["method"] in ("lora", "dora"):
        training.update(rank=opts["rank"], alpha=opts["alpha"], dropout=opts["dropout"], targets=opts["targets"])
    info = {"datasets": datasets, "training": training,
            "description": f"Trained with `tinytune finetune --task {opts['task']}` on {opts['checkpoint']}."}
    if metrics:
        info["metrics"] = {k: v for k, v in metrics.items() if math.isfinite(v)}
    return info
