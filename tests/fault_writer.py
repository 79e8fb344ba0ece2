"""The writer side of tests/test_fault_injection.py: builds the models once, saves two versions of them.

Imported by the test (the builders and `save`), and run as a fork server:

    python tests/fault_writer.py

which reads one command a line on stdin and answers on stdout (one line per message):

    save <kind> <path> <first>   fork a writer that saves versions first, 1-first, first, ... of <kind> to
                                 <path> for ever. After its first complete save it prints
                                 "ready <pid> <seconds the save took>" and stops itself (SIGSTOP) until the
                                 test sends SIGCONT; after each later one "saved <pid> <k>".
    fsize <kind> <path> <limit> <version>
                                 fork a writer that saves <version> once with RLIMIT_FSIZE=<limit> and
                                 SIGXFSZ ignored (writes past the limit fail with EFBIG, as on a full disk),
                                 then prints "outcome <pid> <json>".
    quit

and prints "dead <pid> <wait status>" once the writer is gone (the test SIGKILLs `save` writers). Forking
keeps each crash point cheap: torch is imported and the models are built once, in the server.

Kinds (two versions each, told apart by every file: weights all 1.0 or all 2.0, plus a config field):
    adapter     tt.save_adapter of LoRA on TinyLM; lora_alpha 8 or 16
    pretrained  tt.save_pretrained of a tiny Llama, one file; rope_theta 10000 or 20000
    sharded     the same, sharded: 3 shards (version 0) or 9 (version 1), so old shards must never linger
    tokenizer   (fsize only) a smaller Llama in 4 KB shards plus a ~7.5 KB tokenizer.json
    checkpoint  save_checkpoint of the same step directory again and again; the manifest's config
                holds {"version", "save" (k), "pid"}
    fit         tt.train.fit(resume=True, save_every=1): each writer resumes from the newest intact
                checkpoint and writes step-N directories (versions play no part)
"""
from __future__ import annotations

import copy
import io
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest (TinyLM), when run as a script

import tinytune as tt  # noqa: E402
from conftest import TinyLM  # noqa: E402
from tinytune.train import TrainConfig, build_optimizer, checkpoint as ckpt, fit  # noqa: E402

VALUES = (1.0, 2.0)  # every saved weight of version 0 / 1
ALPHAS = (8, 16)  # adapter: lora_alpha
THETAS = (10000.0, 20000.0)  # pretrained: rope_theta
SHARD_BYTES = (150_000, 60_000)  # sharded: 3 shards / 9 shards of the 427 KB tiny Llama
KINDS = ("adapter", "pretrained", "sharded", "checkpoint", "fit")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(version: int) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=ALPHAS[version], targets=LORA_TARGETS))
    fill_trainable(model, VALUES[version])
    return model


def fill_trainable(model, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(value)


def llama(version: int, small: bool = False):
    extra = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1) if small else {}
    model = tt.models.build("llama-tiny", rope_theta=THETAS[version], **extra)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(VALUES[version])
    return model


def tokenizer():
    """A WordLevel tokenizer of 32 long tokens: tokenizer.json (~7.5 KB) is the largest file of its save."""
    from tokenizers import Tokenizer as Backend, models

    vocab = {f"tok{i:03d}" + "x" * 200: i for i in range(32)}
    return tt.models.tokenizer.Tokenizer(Backend(models.WordLevel(vocab, unk_token=next(iter(vocab)))))


def fit_data() -> list[dict]:
    return [{"input_ids": [i % 32 for i in range(j, j + 10)], "labels": [i % 32 for i in range(j, j + 10)]}
            for j in range(16)]


def fit_config(out_dir, steps: int = 10**6) -> TrainConfig:
    return TrainConfig(lr=1e-2, steps=steps, batch_size=4, save_every=1, out_dir=Path(out_dir), resume=True,
                       log_every=10**6, keep_checkpoints=3)


def fit_model() -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=LORA_TARGETS))
    return model


def checkpoint_parts(version: int):
    """(model, optimizer, loop state) of a valid step-1 checkpoint whose every tensor is VALUES[version]."""
    model = lora_model(version)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fill_trainable(model, VALUES[version])
    with torch.no_grad():
        for state in optimizer.state.values():
            state["exp_avg"].fill_(VALUES[version])
            state["exp_avg_sq"].fill_(VALUES[version])
    value = VALUES[version]
    loop = {"step": 1, "data": {"num_examples": 16, "epoch": 0, "index": 4}, "scheduler": {"base_lrs": [1e-2]},
            "scaler": {}, "rng": ckpt.rng_state("cpu"), "history": {"losses": [value], "lrs": [value]},
            "loop": [0, float("inf"), 0]}
    return model, optimizer, loop


class Models:
    """Both versions of every kind, built once."""

    def __init__(self):
        self.adapter = [lora_model(v) for v in (0, 1)]
        self.llama = [llama(v) for v in (0, 1)]
        self.small = [llama(v, small=True) for v in (0, 1)]
        self.tokenizer = tokenizer()
        self.checkpoint = [checkpoint_parts(v) for v in (0, 1)]


def save(models: Models, kind: str, path, version: int, k: int = 0) -> None:
    """One save of `version` of `kind` to `path` (k: the writer's save counter, recorded by "checkpoint")."""
    path = Path(path)
    if kind == "adapter":
        tt.save_adapter(models.adapter[version], path)
    elif kind == "pretrained":
        tt.save_pretrained(models.llama[version], path)
    elif kind == "sharded":
        tt.save_pretrained(models.llama[version], path, max_shard_size=SHARD_BYTES[version])
    elif kind == "tokenizer":
        tt.save_pretrained(models.small[version], path, tokenizer=models.tokenizer, max_shard_size=4096)
    elif kind == "checkpoint":
        model, optimizer, loop = models.checkpoint[version]
        config = {"version": version, "save": k, "pid": os.getpid()}
        ckpt.save_checkpoint(path, 1, model, optimizer, loop, config, keep=3)
    else:
        raise ValueError(f"unknown kind {kind!r}")


# ------------------------------------------------------------------------------------------- server


def _say(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())  # one write: lines of the server and its writers never interleave


def _writer_loop(models: Models, proto: int, kind: str, path: str, first: int) -> None:
    me = os.getpid()
    if kind == "fit":
        _fit_writer(proto, path)
        return
    for k in range(10**9):
        start = time.perf_counter()
        save(models, kind, path, (first + k) % 2, k)
        if k == 0:
            _say(proto, f"ready {me} {time.perf_counter() - start:.6f}")
            os.kill(me, signal.SIGSTOP)  # the test looks at the directory, then sends SIGCONT
        else:
            _say(proto, f"saved {me} {k}")


def _fit_writer(proto: int, out_dir: str) -> None:
    """fit(resume=True, save_every=1) for ever; reports the step it resumed from, then each saved step."""
    me = os.getpid()
    seen: dict = {}

    def callback(step, history):
        # callback(step) runs before step `step` is saved: here step - 1 is complete on disk
        if "start" not in seen:
            seen["start"] = step
            _say(proto, f"resumed {me} {step - 1}")
        elif step == seen["start"] + 1:
            seen["t"] = time.perf_counter() - seen["t0"]
            _say(proto, f"ready {me} {seen['t']:.6f}")
            os.kill(me, signal.SIGSTOP)
        else:
            _say(proto, f"saved {me} {step - 1}")
        seen["t0"] = time.perf_counter()
        return False

    fit(fit_model(), fit_data(), fit_config(out_dir), callbacks=[callback], stream=io.StringIO())


def _fsize_writer(models: Models, proto: int, kind: str, path: str, limit: int, version: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    outcome = {"raised": None}
    try:
        if kind == "fit":
            step = ckpt.find_checkpoint(path)
            steps = int(step.name.split("-")[1]) + 1
            fit(fit_model(), fit_data(), fit_config(path, steps=steps), stream=io.StringIO())
        else:
            save(models, kind, path, version)
    except BaseException as err:  # noqa: BLE001 - reported to the test, which judges it
        outcome = {"raised": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err),
                   "is_save_error": isinstance(err, tt._transaction.SaveError),
                   "is_oserror": isinstance(err, OSError), "errno": getattr(err, "errno", None)}
    _say(proto, f"outcome {os.getpid()} {json.dumps(outcome)}")


def serve() -> None:
    torch.set_num_threads(1)  # forked writers: no thread pool to inherit half-initialised
    proto = os.dup(1)
    os.dup2(2, 1)  # anything printed (progress, warnings) goes to stderr, never into the protocol
    models = Models()
    _say(proto, "up")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if words[0] == "save":
                    _writer_loop(models, proto, words[1], words[2], int(words[3]))
                elif words[0] == "fsize":
                    _fsize_writer(models, proto, words[1], words[2], int(words[3]), int(words[4]))
                code = 0
            except BaseException:  # noqa: BLE001 - the traceback goes to stderr, the test reports it
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        _say(proto, f"dead {pid} {status}")


if __name__ == "__main__":
    serve()
