"""The `tinytune` command (`python -m tinytune` or the `tinytune` console script).

    tinytune finetune CHECKPOINT DATA.jsonl --method lora --rank 8 --steps 100 --out runs/x
    tinytune finetune --config run.toml --steps 10         # flags override the file
    tinytune params llama-30m --method lora --rank 16 --targets all-linear
    tinytune bench llama-30m --method lora --batch-size 8 --seq-len 256 --steps 5
    tinytune reward CHECKPOINT PREFS.jsonl --eval-data held_out.jsonl --out runs/rm   # a reward model
    tinytune dpo CHECKPOINT PREFS.jsonl --beta 0.1 --loss-type sigmoid --out runs/dpo  # a DPO adapter
    tinytune grpo CHECKPOINT PROMPTS.jsonl --reward my_rewards:exact --out runs/grpo   # a GRPO adapter
    tinytune ppo CHECKPOINT PROMPTS.jsonl --reward-model runs/rm/reward_model --out runs/ppo  # PPO
    tinytune finetune CHECKPOINT reviews.jsonl --task classification --eval-data dev.jsonl --out runs/clf
    tinytune eval CHECKPOINT --adapter runs/clf/adapter --data test.jsonl --json    # loss, accuracy, macro_f1
    tinytune generate CHECKPOINT --adapter runs/x/adapter --prompt "Hello" --max-new-tokens 32
    tinytune merge CHECKPOINT runs/x/adapter merged/       # LoRA folded in: a Hugging Face checkpoint
    tinytune demo                                          # offline end-to-end example, ~1-2 min on a CPU
    tinytune finetune ... --resume                         # go on from the latest checkpoint in --out

A user error (a bad flag or config value, a missing or damaged file) prints one line
`tinytune COMMAND: error: MESSAGE` and exits with status 2 (TINYTUNE_TRACEBACK=1 shows the traceback
instead). Ctrl-C (SIGINT) or SIGTERM during training saves a checkpoint, prints where and the command that
resumes from it, and exits with status 130.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .options import COMMAND_DEFAULTS, DEFAULTS, LOSS_TYPES, CLIError, add_method_options, add_train_options, resolve
from .options import _flag
from .parsers import add_eval, add_generate, add_merge
from ..rlhf import GRPO_LOSS_TYPES
from ..rlhf.advantages import SCALES

__all__ = ["main", "build_parser", "CLIError"]

_CHECKPOINT_HELP = "a Hugging Face checkpoint directory, or a preset name (llama-tiny, llama-30m, ...)"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (the usage of `finetune` alone is a screenful)."""

    commands: dict[str, argparse.ArgumentParser] = {}  # set on the top-level parser by build_parser

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but unrecognised arguments are reported by the subcommand they were given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train an adapter on a JSONL file",
                       description="Load a checkpoint (or build a preset), apply a PEFT method, train it with "
                       "tt.train.fit on a JSONL file and save the adapter (PEFT layout) into OUT/adapter.",
                       epilog="Config keys mirror the flags (batch_size or batch-size; checkpoint, data and out "
                       "too); one level of tables ([lora], [train]) is flattened. Flags override the file.")
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS, metavar="DATA.jsonl", help="training data")
    _flag(p, "--out", "output directory: adapter/, checkpoints, metrics.jsonl, loss.png", metavar="DIR")
    _flag(p, "--config", "a .toml or .json file of options", metavar="FILE")
    _flag(p, "--tokenizer", "tokenizer directory (tokenizer.json), required with a preset", metavar="DIR")
    _flag(p, "--resume", "go on from the latest checkpoint in --out (a fresh start when there is none), or "
          "from DIR: a checkpoint directory or a run's --out (give it after CHECKPOINT and DATA, or as "
          "--resume=DIR)", nargs="?", const=True, metavar="DIR")
    add_method_options(p)
    d = p.add_argument_group("data")
    _flag(d, "--task", "text | pairs | instructions | chats (a causal LM) | classification (JSONL text+label: a "
          "SequenceClassifier) | ner (tokens+tags: a TokenClassifier)", metavar="TASK")
    _flag(d, "--labels", "classification / ner: label names in id order (default: the data's, sorted); "
          "saved with the adapter", metavar="A,B,C")
    _flag(d, "--template", "alpaca | chatml | llama3 (instructions: alpaca, chats: chatml)", metavar="NAME")
    _flag(d, "--max-length", "longest example in tokens; longer ones are truncated (text: row length, 512)", type=int)
    _flag(d, "--on-error", "bad records: raise (stop, naming file:line) or skip (report and go on)", metavar="MODE")
    _flag(d, "--eval-data", "held-out examples (same --task), evaluated every --eval-every steps and at the end",
          metavar="FILE")
    _flag(d, "--eval-every", "evaluate --eval-data every N steps (0: only at the end)", type=int)
    add_train_options(p)
    _flag(p, "--save-every", "write a checkpoint every N steps (0: only at the end and on an interrupt)", type=int)


def _add_online_or_preference(sub, name: str, help: str, description: str, epilog: str, data: tuple[str, str],
                              out_files: str, kind: str, max_length_help: str) -> argparse.ArgumentParser:
    """The parser skeleton `reward`, `dpo` and `grpo` share: finetune's positionals (DATA's metavar and help
    from `data`), --out/--config/--tokenizer/--resume, the method options, a data group (`kind`: what the
    JSONL holds) and the training options with the command's defaults."""
    defaults = COMMAND_DEFAULTS.get(name, DEFAULTS)
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    p.add_argument("checkpoint", nargs="?", default=argparse.SUPPRESS, metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS, metavar=data[0], help=data[1])
    _flag(p, "--out", f"output directory: {out_files}, checkpoints, metrics.jsonl, loss.png", metavar="DIR")
    _flag(p, "--config", "a .toml or .json file of options", metavar="FILE")
    _flag(p, "--tokenizer", "tokenizer directory (tokenizer.json), required with a preset", metavar="DIR")
    _flag(p, "--resume", "go on from the latest checkpoint in --out, or from DIR (as finetune's)", nargs="?",
          const=True, metavar="DIR")
    add_method_options(p)
    d = p.add_argument_group(f"{kind} data")
    _flag(d, "--eval-data", f"held-out {kind}s, evaluated every --eval-every steps and at the end", metavar="FILE")
    _flag(d, "--eval-every", "evaluate --eval-data every N steps (0: only at the end)", type=int)
    _flag(d, "--template", "alpaca | chatml | llama3 (default: none for text prompts, chatml for chat prompts)",
          metavar="NAME")
    _flag(d, "--max-length", max_length_help, type=int)
    _flag(d, "--on-error", "bad records: raise (stop, naming file:line) or skip (report and go on)", metavar="MODE")
    add_train_options(p, defaults)
    return p


def _add_preference(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A `reward` or `dpo` parser: the shared skeleton with preference data."""
    return _add_online_or_preference(
        sub, name, help, description, "Config keys mirror the flags (as finetune's); flags override the file.",
        ("PREFS.jsonl", 'preferences: {"prompt", "chosen", "rejected"[, "margin"]} or {"prompt", "ranked": [...]}'),
        "reward_model/" if name == "reward" else "adapter/", "preference",
        "longest prompt + completion in tokens; a longer record is a bad record")


def _add_reward(sub) -> None:
    p = _add_preference(sub, "reward", "train a reward model on a preference file",
                        "Wrap the checkpoint (or preset) in tt.rlhf.RewardModel, apply a PEFT method, train it with "
                        "tt.rlhf.train_reward_model (Bradley-Terry loss) and save it into OUT/reward_model.")
    g = p.add_argument_group("reward objective")
    _flag(g, "--center-coef", "weight of mean((r_chosen + r_rejected)^2), keeping rewards near 0", type=float)


def _add_dpo(sub) -> None:
    p = _add_preference(sub, "dpo", "train a policy with DPO on a preference file",
                        "Apply a PEFT method to the checkpoint (or preset), train it with tt.rlhf.dpo (the "
                        "reference is the base, the adapters disabled) and save the adapter into OUT/adapter.")
    g = p.add_argument_group("DPO objective")
    defaults = COMMAND_DEFAULTS["dpo"]
    _flag(g, "--beta", "KL weight (SimPO: the reward scale)", defaults, type=float)
    _flag(g, "--loss-type", f"one of {', '.join(LOSS_TYPES)} (simpo: reference-free)", defaults, metavar="NAME")
    _flag(g, "--label-smoothing", "conservative DPO's flip probability, in [0, 0.5)", defaults, type=float)
    _flag(g, "--precompute-ref", "reference log-probs once before training, not every step", action="store_true")
    _flag(g, "--sft-weight", "weight of an added NLL on the chosen completions (RPO; 0: plain DPO)", defaults,
          type=float)


def _add_online(sub, name: str, help: str, description: str, defaults: dict, objective: str):
    """A `grpo` or `ppo` parser: the shared skeleton with prompt data, then the objective's group with
    --reward, --reward-weights and the sampling options (the command adds its own after them)."""
    p = _add_online_or_preference(
        sub, name, help, description,
        "Config keys mirror the flags (as finetune's; reward: a string or a list); flags override the file.",
        ("PROMPTS.jsonl", 'prompts: {"prompt": text or chat messages, ...other fields for the rewards}'),
        "adapter/" if name == "grpo" else "adapter/, value_model/", "prompt",
        "longest prompt in tokens; a longer record is a bad record")
    g = p.add_argument_group(objective)
    required = "required" if name == "grpo" else "or --reward-model"
    _flag(g, "--reward", "a reward function as module:function, f(prompts, completions, **fields) -> floats "
          f"(repeat for several; {required})", action="append", metavar="SPEC")
    _flag(g, "--reward-weights", "one weight per --reward, comma-separated (default: all 1.0)", metavar="W,W")
    _flag(g, "--max-new-tokens", "longest completion in tokens", defaults, type=int)
    _flag(g, "--temperature", "sampling temperature", defaults, type=float)
    _flag(g, "--top-k", "sample among the k likeliest tokens", defaults, type=int)
    _flag(g, "--top-p", "nucleus sampling, in (0, 1]", defaults, type=float)
    return g


def _add_grpo(sub) -> None:
    """The `grpo` parser: the shared skeleton with prompt data, and the objective."""
    defaults = COMMAND_DEFAULTS["grpo"]
    g = _add_online(sub, "grpo", "train a policy with GRPO on a prompt file and reward functions",
                    "Apply a PEFT method to the checkpoint (or preset), train it with tt.rlhf.grpo (group_size "
                    "completions per prompt, scored by --reward functions) and save the adapter into OUT/adapter.",
                    defaults, "GRPO objective")
    _flag(g, "--group-size", "completions per prompt (--batch-size counts prompts)", defaults, type=int)
    _flag(g, "--loss-type", f"one of {', '.join(GRPO_LOSS_TYPES)}", defaults, metavar="NAME")
    _flag(g, "--epsilon", "clip range", defaults, type=float)
    _flag(g, "--epsilon-high", "upper clip range (default: --epsilon)", type=float)
    _flag(g, "--beta", "weight of the KL to the base (the adapters disabled; 0: no reference)", defaults,
          type=float)
    _flag(g, "--scale-rewards", f"advantage scaling, one of {', '.join(SCALES)}", defaults, metavar="MODE")
    _flag(g, "--mask-truncated-completions", "leave completions without a stop token out of the loss",
          action="store_true")


def _add_ppo(sub) -> None:
    """The `ppo` parser: the online skeleton, --reward-model and PPOConfig's knobs."""
    from .ppo import PPO_DEFAULTS as defaults
    g = _add_online(sub, "ppo", "train a policy with PPO on a prompt file and a reward model or functions",
                    "Apply LoRA (or DoRA) to the checkpoint (or preset) as the policy, load --reward-model onto "
                    "the same base (or score with --reward functions), train policy and value model with "
                    "tt.rlhf.ppo and save the policy's adapter into OUT/adapter, the value model into "
                    "OUT/value_model.", defaults, "PPO objective")
    _flag(g, "--reward-model", "a reward model directory trained on CHECKPOINT (tinytune reward's "
          "OUT/reward_model); or --reward", metavar="DIR")
    _flag(g, "--ppo-epochs", "passes over each rollout batch", defaults, type=int)
    _flag(g, "--num-mini-batches", "updates per pass (<= --batch-size)", defaults, type=int)
    _flag(g, "--kl-coef", "initial weight of the per-token KL to the base (the adapters disabled)", defaults,
          type=float)
    _flag(g, "--kl-estimator", "k1 or k3", defaults, metavar="NAME")
    _flag(g, "--kl-target", "adapt --kl-coef to reach this KL per completion (default: fixed)", type=float)
    _flag(g, "--kl-horizon", "the adaptive controller's horizon", defaults, type=int)
    _flag(g, "--gamma", "GAE discount, in [0, 1]", defaults, type=float)
    _flag(g, "--lam", "GAE lambda, in [0, 1]", defaults, type=float)
    _flag(g, "--cliprange", "the policy ratio's clip range", defaults, type=float)
    _flag(g, "--cliprange-value", "the value's clip range", defaults, type=float)
    _flag(g, "--vf-coef", "weight of the value loss", defaults, type=float)
    _flag(g, "--whiten-rewards", "whiten the per-token rewards over the batch before GAE", action="store_true")
    _flag(g, "--missing-eos-penalty", "subtracted from the score of a completion without a stop token",
          type=float)
    _flag(g, "--no-normalize-reward", "score with the reward model's raw output, not normalised by its stored "
          "statistics (config: normalize_reward = false)", action="store_false", dest="normalize_reward")
    _flag(g, "--reward-clip", "clip scores to [-C, C] (default: no clip)", type=float)


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
    parser = _Parser(prog="tinytune", description="Fine-tune language models with LoRA on "
                                     "PyTorch alone.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_finetune, _add_reward, _add_dpo, _add_grpo, _add_ppo, add_eval, add_generate, add_merge,
                _add_params, _add_bench, _add_demo):
        add(sub)
    parser.commands = dict(sub.choices)
    return parser


def _run(args) -> None:
    from . import commands
    if args.command == "demo":
        from .demo import run_demo
        run_demo(steps=args.steps, out=args.out, use_cache=not args.no_cache, quick=args.quick)
        return
    if args.command in ("reward", "dpo"):
        from . import preference
        keys = {"reward": preference.REWARD_KEYS, "dpo": preference.DPO_KEYS}[args.command]
        opts = resolve(args, keys, COMMAND_DEFAULTS.get(args.command, DEFAULTS))
        getattr(preference, args.command)(opts)
        return
    if args.command == "grpo":
        from . import rl
        rl.grpo(resolve(args, rl.GRPO_KEYS, COMMAND_DEFAULTS["grpo"]))
        return
    if args.command == "ppo":
        from . import ppo
        ppo.ppo(resolve(args, ppo.PPO_KEYS, ppo.PPO_DEFAULTS))
        return
    if args.command in ("eval", "generate", "merge"):
        from . import generation, inference
        run = {"eval": inference.evaluate_adapter, "generate": generation.generate, "merge": inference.merge}
        run[args.command](vars(args))
        return
    keys = {"finetune": commands.FINETUNE_KEYS, "params": commands.PARAMS_KEYS, "bench": commands.BENCH_KEYS}
    opts = resolve(args, keys[args.command])
    getattr(commands, args.command)(opts)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the library raises for bad input or a failed save (its messages name the culprit); anything
    else is a bug. ValueError covers UnicodeDecodeError, json.JSONDecodeError, FieldError, IntegrityError."""
    from .. import SaveError  # a full disk, a directory without write permission: the old save is intact
    errors = (CLIError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, SaveError,
              ValueError, TypeError)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return errors
    return errors + (SafetensorError,)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _program() -> str:
    """How this process was started, as a command to type: `tinytune` or `<python> -m tinytune`."""
    if os.path.basename(sys.argv[0]) in ("tinytune", "tinytune.exe"):
        return "tinytune"
    return f"{shlex.quote(sys.executable)} -m tinytune"


def resume_command(argv: list[str], checkpoint) -> str:
    """The command line that resumes an interrupted run: the same arguments plus `--resume CHECKPOINT`
    (a later --resume wins over an earlier one, so the arguments are kept exactly as they were)."""
    args = list(argv)
    at = args.index("--") if "--" in args else len(args)
    args[at:at] = ["--resume", str(checkpoint)]
    return " ".join([_program()] + [shlex.quote(a) for a in args])


def _interrupted(command: str, err: KeyboardInterrupt, argv: list[str]) -> str:
    history = getattr(err, "history", None)  # a TrainingInterrupted from fit carries the run so far
    checkpoint = getattr(history, "checkpoint", None)
    if checkpoint is None:
        detail = f" ({_one_line(err)})" if str(err) else ""
        return f"tinytune {command}: interrupted{detail}"
    what = str(history.stopped_reason).split(";")[0]
    return (f"tinytune {command}: {what}; checkpoint saved to {checkpoint}; resume with: "
            f"{resume_command(argv, checkpoint)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a user error printed to stderr as one line, 130 an
    interrupt). A bad flag exits through argparse (SystemExit, status 2) with one line on stderr."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _run(args)
    except KeyboardInterrupt as err:  # fit's TrainingInterrupted too, once it saved a checkpoint
        print(_interrupted(args.command, err, argv), file=sys.stderr)
        return 130
    except _user_errors() as err:
        if os.environ.get("TINYTUNE_TRACEBACK"):
            raise
        print(f"tinytune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0
