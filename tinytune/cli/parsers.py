"""The parsers of the commands that use a trained adapter: `eval`, `generate` and `merge`.

Unlike the training commands they take no --config file: each flag has its default here (shown in --help).
"""
from __future__ import annotations

from .options import TASKS, TEMPLATES

_CHECKPOINT_HELP = "the base: a Hugging Face checkpoint directory, or a preset name (with --tokenizer)"
GENERATE_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": None, "top_p": 1.0, "seed": None,
                     "device": "cpu"}


def add_eval(sub) -> None:
    """`tinytune eval CHECKPOINT --adapter DIR --data FILE`."""
    p = sub.add_parser("eval", help="evaluate base + adapter on a JSONL file (loss and the task's metrics)",
                       description="Load the base and the adapter (its task and labels from the tinytune_task.json "
                       "finetune writes beside it), run tt.train.evaluate on --data and print each metric.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter directory (finetune's OUT/adapter)")
    p.add_argument("--data", required=True, metavar="FILE", help="held-out examples in the task's JSONL format")
    p.add_argument("--task", default=None, metavar="TASK", help=f"one of {', '.join(TASKS)} (default: the "
                   "adapter's; instructions for an adapter without one)")
    p.add_argument("--labels", default=None, metavar="A,B,C", help="label names in id order, for an adapter "
                   "without saved labels")
    p.add_argument("--template", default=None, metavar="NAME", help="the data's template (default: the adapter's)")
    p.add_argument("--max-length", type=int, default=None, help="truncate longer examples (default: the adapter's)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (required with a preset)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    p.add_argument("--dtype", default="fp32", metavar="DTYPE", help="fp32 | bf16 | fp16 (default: fp32)")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def add_generate(sub) -> None:
    """`tinytune generate CHECKPOINT [--adapter DIR] (--prompt | --prompts | --chat)`."""
    d = GENERATE_DEFAULTS
    p = sub.add_parser("generate", help="complete prompts with base (+ adapter)",
                       description="Generate with tt.generate (KV cache, one left-padded batch) and print each "
                       "completion: the new tokens, decoded, up to the first EOS or end-of-turn token.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    p.add_argument("--adapter", default=None, metavar="DIR", help="an adapter directory to load onto the base")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (required with a preset)")
    g = p.add_argument_group("prompts (exactly one of)")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeat for several)")
    g.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='one {"prompt": text or [messages]} per line')
    g.add_argument("--chat", default=None, metavar="FILE.json", help='one conversation: [{"role", "content"}, ...]')
    c = p.add_argument_group("chat")
    c.add_argument("--template", default=None, metavar="NAME", help=f"a built-in chat template ({', '.join(TEMPLATES)}"
                   "); default: the tokenizer's chat template, else chatml. A plain --prompt with it is a user turn")
    c.add_argument("--system", default=None, metavar="TEXT", help="a system message before each prompt (a chat)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help=f"longest completion (default: {d['max_new_tokens']})")
    s.add_argument("--temperature", type=float, default=d["temperature"], help="0: greedy (default: 0)")
    s.add_argument("--top-k", type=int, default=d["top_k"], help="sample among the k likeliest (default: all)")
    s.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling, in (0, 1] (default: 1.0)")
    s.add_argument("--seed", type=int, default=d["seed"], help="seed of the sampling (default: torch's global RNG)")
    p.add_argument("--device", default=d["device"], metavar="DEVICE", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help='print one {"prompt", "completion"} JSON object per prompt')


def add_merge(sub) -> None:
    """`tinytune merge CHECKPOINT ADAPTER OUT`."""
    p = sub.add_parser("merge", help="fold a LoRA / (IA)3 adapter into the base: a Hugging Face checkpoint",
                       description="Load the base and the adapter and write them merged with tt.save_pretrained "
                       "(config.json, safetensors weights, the tokenizer's files) into OUT, a new directory. "
                       "Prompt, prefix and bottleneck adapters do not fold into weights and are refused; so are "
                       "classifier adapters.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=_CHECKPOINT_HELP)
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter directory (finetune's OUT/adapter)")
    p.add_argument("out", metavar="OUT", help="the merged checkpoint directory to write (new or empty)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (required with a preset)")
