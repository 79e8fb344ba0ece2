"""The `tinytune` command (`python -m tinytune` or the `tinytune` console script).

    tinytune finetune CHECKPOINT DATA.jsonl --method lora --rank 8 --steps 100 --out runs/x
    tinytune finetune --config run.toml --steps 10         # flags override the file
    tinytune params llama-30m --method lora --rank 16 --targets all-linear
    tinytune bench llama-30m --method lora --batch-size 8 --seq-len 256 --steps 5
    tinytune demo                                          # offline end-to-end example, ~1-2 min on a CPU
"""
from __future__ import annotations

import argparse
import sys

from .options import CLIError, add_method_options, add_train_options, resolve
from .options import _flag

__all__ = ["main", "build_parser", "CLIError"]

_CHECKPOINT_HELP = "a Hugging Face checkpoint directory, or a preset name (llama-tiny, llama-30m, ...)"


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train an adapter on a JSONL file",
                       description="Load a checkpoint (or build a preset), apply a PEFT method, train it with "
                       "tt.train.fit on a JSONL file and save the adapter (PEFT layout) into OUT/adapter.",
                       epilog="Config keys mirror the flags (batch_size or batch-size; checkpoint, data and out "
                       "too); one level of tables ([lora], [train]) is flattened. Flags override the file.")
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS, metavar="DATA.jsonl", help="training data")
    _flag(p, "--out", "output directory: adapter/, checkpoints, metrics.jsonl, loss.svg", metavar="DIR")
    _flag(p, "--config", "a .toml or .json file of options", metavar="FILE")
    _flag(p, "--tokenizer", "tokenizer directory (tokenizer.json), required with a preset", metavar="DIR")
    add_method_options(p)
    d = p.add_argument_group("data")
    _flag(d, "--task", "text | pairs | instructions | chats", metavar="TASK")
    _flag(d, "--template", "alpaca | chatml | llama3 (instructions: alpaca, chats: chatml)", metavar="NAME")
    _flag(d, "--max-length", "longest example in tokens; longer ones are truncated (text: row length, 512)", type=int)
    _flag(d, "--on-error", "bad records: raise (stop, naming file:line) or skip (report and go on)", metavar="MODE")
    add_train_options(p)


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="print the parameter table of a method config, without training",
                       description="Apply the method to a checkpoint or preset and print tt.count_parameters.")
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    _flag(p, "--config", "a .toml or .json file of options", metavar="FILE")
    _flag(p, "--tokenizer", "tokenizer directory; a preset's vocabulary is resized to it", metavar="DIR")
    add_method_options(p)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="training-step tokens/s and peak memory",
                       description="Time forward + loss + backward + AdamW steps on random tokens and report "
                       "tokens/s (median step) and peak memory (CPU: VmHWM delta; CUDA: max_memory_allocated).")
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    _flag(p, "--config", "a .toml or .json file of options", metavar="FILE")
    _flag(p, "--tokenizer", "tokenizer directory", metavar="DIR")
    add_method_options(p)
    g = p.add_argument_group("benchmark")
    _flag(g, "--batch-size", "sequences per step", type=int)
    _flag(g, "--seq-len", "tokens per sequence", type=int)
    _flag(g, "--steps", "timed steps", type=int)
    _flag(g, "--warmup", "untimed steps first", type=int)
    _flag(g, "--dtype", "fp32 | bf16 | fp16 (autocast)", metavar="DTYPE")
    _flag(g, "--grad-checkpointing", "recompute activations per block", action="store_true")
    _flag(g, "--device", "cpu or cuda", metavar="DEVICE")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end example (pre-train a tiny model, LoRA fine-tune it)",
                       description="Builds a tiny Llama with a character tokenizer, pre-trains it briefly on "
                       "generated text (cached), fine-tunes it with LoRA on a letter-shift instruction task "
                       "and prints exact match before/after, the parameter table, tokens/s and generations.")
    p.add_argument("--steps", type=int, default=None, help="LoRA fine-tuning steps (default: 150; --quick: 3)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: a new temporary one)")
    p.add_argument("--no-cache", action="store_true", help="pre-train again instead of using the cached base")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (for tests)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `tinytune` command."""
    parser = argparse.ArgumentParser(prog="tinytune", description="Fine-tune language models with LoRA on "
                                     "PyTorch alone.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_finetune, _add_params, _add_bench, _add_demo):
        add(sub)
    return parser


def _run(args) -> None:
    from . import commands
    if args.command == "demo":
        from .demo import run_demo
        run_demo(steps=args.steps, out=args.out, use_cache=not args.no_cache, quick=args.quick)
        return
    keys = {"finetune": commands.FINETUNE_KEYS, "params": commands.PARAMS_KEYS, "bench": commands.BENCH_KEYS}
    opts = resolve(args, keys[args.command])
    getattr(commands, args.command)(opts)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a user error printed to stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _run(args)
    except CLIError as err:
        print(f"tinytune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:  # from the library: its messages name the culprit
        print(f"tinytune {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
