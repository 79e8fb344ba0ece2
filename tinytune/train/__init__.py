"""Training: `TrainConfig` and `fit` (AdamW, schedules, accumulation, mixed precision, checkpoints, logs).

    import tinytune as tt
    history = tt.train.fit(model, examples, tt.train.TrainConfig(lr=1e-3, steps=100, batch_size=8))

Layers: `config` (the dataclass), `precision` (the one place that decides dtypes and autocast),
`optim` (AdamW + schedules), `checkpoint` (transactional save / validated resume), `state_codec` (nested
state as JSON + safetensors, no pickle), `logging` (progress bar or lines, JSONL), `loggers` (TensorBoard,
W&B: `report_to`), `callbacks` (`Callback`), `plots` (loss.png, matplotlib),
`forward` (one batch: model call, built-in task loss), `tasks` (the `Task` protocol fit trains through),
`evaluation` (`evaluate`), `distributed` (torchrun: DDP, FSDP, collectives),
`loop` (`fit`).
"""
from .checkpoint import (Checkpoint, apply_checkpoint, find_checkpoint, load_checkpoint, read_checkpoint,
                         save_checkpoint, trainable_state_dict)
from .callbacks import Callback
from .config import TrainConfig
from .logging import ProgressLogger
from .evaluation import evaluate, evaluate_task
from .loop import History, TrainingInterrupted, fit
from .losses import causal_lm_loss
from .plots import loss_figure, write_loss_png
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups
from .precision import Precision, prepare_model
from .tasks import BUILTIN_TASKS, Task, resolve_task

__all__ = [
    "Callback", "Checkpoint", "History", "Precision", "apply_checkpoint", "read_checkpoint", "ProgressLogger", "TrainConfig", "TrainingInterrupted", "build_optimizer",
    "build_scheduler", "BUILTIN_TASKS", "Task", "causal_lm_loss", "evaluate", "evaluate_task", "resolve_task", "find_checkpoint", "fit", "load_checkpoint",
    "loss_figure", "lr_factor", "param_groups", "prepare_model", "save_checkpoint", "trainable_state_dict",
    "write_loss_png",
]
