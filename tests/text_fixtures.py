"""Shared by the data tests: a tiny byte-level BPE tokenizer trained on a corpus, and JSONL writing."""
import json
import signal
import subprocess
import sys
import time

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tinytune.models import Tokenizer

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
PAD, BOS, EOS = 0, 1, 2


def bpe_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `corpus`, adding BOS like Llama; no unknown tokens possible."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return Tokenizer(backend, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def write_jsonl(path, rows):
    """Rows are dicts (dumped) or raw strings (written as is, for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_cli_inputs(root):
    """A one-layer llama-tiny checkpoint (`root/ckpt`) with the demo's character tokenizer, and a small
    instruction file (`root/data.jsonl`): what the command-line tests train on. Returns the tokenizer."""
    import tinytune as tt
    from tinytune.cli.demo_data import char_tokenizer

    tok = char_tokenizer()
    tt.save_pretrained(tt.models.build("llama-tiny", vocab_size=tok.vocab_size, num_layers=1), root / "ckpt",
                       tokenizer=tok)
    records = [{"instruction": "Reverse.", "input": w, "output": w[::-1]} for w in ["abc", "hello", "xyz", "tiny"]]
    write_jsonl(root / "data.jsonl", records)
    return tok


def run_cli(capsys, *argv):
    """`tinytune.cli.main(argv)` in-process: (exit code, stdout, stderr); arguments are str()-ed."""
    from tinytune.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def interrupt_after_first_step(argv, env: dict) -> subprocess.CompletedProcess:
    """Run `python -m tinytune ARGV` and send SIGINT once it logged step 1; the completed process, with every
    stdout line (those read before the signal too)."""
    proc = subprocess.Popen([sys.executable, "-m", "tinytune", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "no step logged"
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(lines) + stdout, stderr)
