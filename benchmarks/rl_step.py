"""Benchmark: online-RL steps, tinytune vs transformers / TRL, on the same weights, adapter and prompts.

Setup (issue 12, point 9): the `llama-30m` preset (random weights, written once with `tinytune.save_pretrained`
and loaded by every side in fp32 from that directory; the preset has no EOS and no pad id), LoRA rank 16 /
alpha 32 / dropout 0.05 on every linear layer except the head. The adapter is made once by `tt.lora.apply`
(seeded), its B matrices are set to seeded N(0, 0.02) noise (so the adapter changes the outputs and the parity
check below tests it) and it is written with `tt.save_adapter` (PEFT layout); tinytune reads it with
`tt.load_adapter`, transformers / TRL with `peft.PeftModel.from_pretrained(..., is_trainable=True)`. 4 prompts of
32 random token ids in [2, vocab) (0 is the pad id and 1 the tokenizer's EOS id; no prompt is padded), G = 8
completions per prompt (32 rows), exactly 64 new tokens per row, temperature 1, no top-k / top-p.
No early stop: tinytune passes `stop_token_ids=[]` (rollouts) / leaves `GRPOConfig.stop_token_ids=None`,
which is the preset's EOS list, empty; transformers / TRL pass `min_new_tokens=64`, which masks EOS (id 1) out
of the first 64 steps (so that side never samples id 1, tinytune may: the only difference in distribution).

Parts (`--which`, see `PARTS`; each part is a tinytune / peer pair of variants):
  rollout (iii)  generation alone. tinytune: `tt.rlhf.generate_rollouts(model, prompts, group_size=8,
                 max_new_tokens=64, temperature=1.0, stop_token_ids=[])` (eval mode, KV cache, per-token
                 log-probs returned). transformers: `AutoModelForCausalLM` + the PEFT adapter, eval mode,
                 `model.generate(input_ids (32 rows), attention_mask, do_sample=True, temperature=1.0, top_k=0,
                 top_p=1.0, max_new_tokens=64, min_new_tokens=64)` without scores (TRL's GRPOTrainer does not ask
                 for them either: it recomputes log-probs in its loss). tokens/s = 32 * 64 generated tokens / time.
  grpo (ii)      one GRPO step, rewarded by `even_fraction` (the fraction of even completion ids; the same
                 function on both sides). tinytune: `task = tt.rlhf.grpo_task([even_fraction],
                 GRPOConfig(group_size=8, max_new_tokens=64, batch_size=4, lr=1e-5, loss_type="dapo", beta=0))`,
                 timed `loss, _ = task.loss(model, task.collate(prompts, 0, "cpu"), task.count(batch), model)`
                 + `loss.backward()` + torch AdamW step + zero_grad (what `fit` runs per step, without its
                 logging / checkpoint machinery). Its time split (generation / scoring / update): a timing
                 wrapper around the `generate_rollouts` the task calls, and the time inside the reward
                 function (both sides call it through the same timing wrapper); update is the rest
                 (advantages, `token_logprobs`, loss, backward, AdamW). TRL: `trl.GRPOTrainer(model=
                 <the PeftModel>, reward_funcs=[even_fraction], args=GRPOConfig(per_device_train_batch_size=32,
                 num_generations=8, max_completion_length=64, generation_kwargs={"min_new_tokens": 64},
                 temperature 1, top_k 0, top_p 1, beta=0.0, loss_type="dapo", num_iterations=1, lr 1e-5,
                 gradient_checkpointing=False (TRL's default is True; tinytune does not checkpoint),
                 disable_dropout=False, shuffle_dataset=False, use_vllm=False, fp32, report_to=[]),
                 train_dataset=<the 4 prompts as text>)`; a word-level tokenizer made here maps word "w<i>" to
                 id i, so TRL's own tokenisation of the text prompts gives exactly tinytune's prompt ids. Timed:
                 `trainer.training_step(model, batch, num_items_in_batch)` with the 32-row batch of its own
                 dataloader (its `_prepare_inputs` generates, decodes, scores and computes advantages there, then
                 `compute_loss` + backward) + torch AdamW step + zero_grad. TRL generates with the policy in
                 train mode (LoRA dropout active while sampling), as its trainer does. Its split: a timing
                 wrapper on the trainer's `_generate_single_turn` (generation), the reward function's time
                 (scoring); update is the rest (decoding, advantages, loss forward, backward, AdamW).
                 tokens/s = 32 * (32 + 64) / step time.
  ppo (i)        one PPO step with the reward model written once here (`tt.rlhf.save_reward_model`: a RewardModel
                 on the checkpoint, LoRA "reward" with the policy's hyperparameters, B and head seeded N(0, 0.02)),
                 on 8 prompts of 32 random ids (`--ppo-prompts`; one completion each, 64 new tokens, no stop as
                 above: `PPOConfig.stop_token_ids=None` is the preset's empty EOS list), `PPOConfig(batch_size=8,
                 max_new_tokens=64, lr=1e-5, ppo_epochs=1 (the default 4 multiplies the update time only),
                 num_mini_batches=1)`, fp32, other knobs default (kl_coef 0.05, normalised reward model scores).
                 Both variants: `task = tt.rlhf.ppo_task(roles, cfg)` on `tt.rlhf.PPOModels(roles)`, timed
                 `fit_step` (`prepare` (rollout, scores, old log-probs / values / reference, GAE) + each update's
                 `task.loss` + backward + AdamW step + zero_grad, no clipping). tinytune (one base): the checkpoint
                 + the adapter loaded as "policy", `tt.rlhf.load_reward_model(base, dir, adapter_name="reward")`,
                 `tt.rlhf.ppo_roles(base, rm)` (value adapter + head copied from the reward model's, reference =
                 adapters off). separate models (what TRL+PEFT / OpenRLHF hold): four copies of the weights:
                 policy = copy + the adapter, reference = a frozen copy, value = `ValueModel.from_reward_model`
                 on a copy carrying the reward model's adapter (adapter and head trainable), reward = the reward
                 model loaded onto a fourth copy; `ppo_roles(policy, rm, value=, reference=)`. Both compute the
                 same thing: from one seed their first step's loss and score agree (`ppo_first_step_abs_diff`).
                 Split: wrappers on `tinytune.rlhf.ppo.generate_rollouts` (generation) and `normalized_scores`
                 (scoring: the reward model's forward); update is the rest (old log-probs, values, reference
                 log-probs, GAE, loss, backward, AdamW). tokens/s = 8 * (32 + 64) / step time. Besides the peak
                 (which, as everywhere here, is measured above the loaded models, so it leaves the weight copies
                 out) each row records `weight_bytes` (the unique parameter + buffer storage of all its role
                 models) and `held_bytes` = weight_bytes + peak; the <= 0.4x target is checked on held_bytes. On
                 a 30M-parameter model activations and the vocabulary-sized log-probs weigh more against the
                 weights than at scale, so held_bytes understates the saving there; weight_ratio shows the 4 -> 1.

Speed: all variants of the chosen parts live in one process; after `--warmup` rounds, `--rounds` rounds run one
call of each variant in turn (the order rotates every round); the median is kept. Peak memory: a fresh
subprocess per variant (`--memory-runs` of them, interleaved; the median is kept) builds the variant, resets the
resident-set high-water mark and reports VmHWM minus the resident set before the first of 3 calls
(`tinytune.ops.PeakMemory`). Parity: the max |logit difference| of the two loaded models (adapter on)
on the prompts is recorded, and every row's completion length is checked to be 64.

Writes `benchmarks/results/rl_step_cpu.json` and `rl_step_cpu.png` beside it (see benchmarks/common.py for
`--out`, `--quick` (llama-tiny, 2 prompts of 8 ids (PPO: 2), 8 new tokens, 2 rounds), `--threads` and `--replot`).
Usage: python benchmarks/rl_step.py [--quick] [--which rollout grpo ppo] [--repeats N] [--warmup N] [--memory-runs N]
       [--preset P] [--prompts N] [--prompt-len N] [--new-tokens N] [--group-size G] [--ppo-prompts N]
       [--threads N] [--out PATH] [--replot]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import tinytune as tt  # noqa: E402
from charts import rl_step_chart as chart  # noqa: E402
from common import (add_common_args, fill_defaults, machine_info, median_run, output_path, peak_of_three,  # noqa: E402
                    replot, setup_threads, worker_env, write_checkpoint, write_results)

RANK, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-5
PAD, EOS = 0, 1  # the tokenizer's pad and EOS ids; prompts never use them, the preset has neither
# ppo's memory target is on the held memory (weights + the step's peak above them), see `report`
TARGETS = {"rollout": {"speed": 1.3}, "grpo": {"speed": 1.5, "memory": 0.6}, "ppo": {"memory": 0.4}}
# part -> (tinytune variant, peer variant)
PARTS = {"rollout": (("tinytune", "rollout"), ("hf", "rollout")),
         "grpo": (("tinytune", "grpo"), ("trl", "grpo")),
         "ppo": (("tinytune", "ppo"), ("separate", "ppo"))}
LABEL = {"tinytune": "tinytune", "hf": "transformers+peft", "trl": "TRL", "separate": "separate models",
         "rollout": "rollouts", "grpo": "GRPO step", "ppo": "PPO step"}


def even_fraction(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """The reward of both sides: the fraction of even ids in each completion (TRL passes `completion_ids`,
    tinytune without a tokenizer passes the id lists as `completions`)."""
    rows = completion_ids if completion_ids is not None else completions
    return [sum(1 for t in row if t % 2 == 0) / max(len(row), 1) for row in rows]


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


def write_adapter(ckpt: str, path: str) -> None:
    """tinytune's LoRA on the checkpoint (seeded), B set to seeded N(0, 0.02), saved in PEFT layout."""
    model, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    torch.manual_seed(0)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    tt.save_adapter(model, path)


def load_tinytune(ckpt: str):
    model, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    tt.load_adapter(model, str(Path(ckpt) / "adapter"))
    return model.train()


def load_hf(ckpt: str):
    import peft
    import transformers
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, str(Path(ckpt) / "adapter"), is_trainable=True).train()


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def tinytune_rollout(ckpt: str, setup: dict):
    model = load_tinytune(ckpt)

    def step() -> dict:
        r = tt.rlhf.generate_rollouts(model, setup["prompts"], group_size=setup["group_size"],
                                      max_new_tokens=setup["new_tokens"], temperature=1.0, stop_token_ids=[])
        return {"completion_lengths": r.completion_lengths.tolist()}

    return step


def hf_rollout(ckpt: str, setup: dict):
    model = load_hf(ckpt).eval()
    rows = [p for p in setup["prompts"] for _ in range(setup["group_size"])]
    ids = torch.tensor(rows)  # equal lengths: left padding is a no-op; the mask is all ones
    mask = torch.ones_like(ids)
    T = setup["new_tokens"]

    def step() -> dict:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=T, min_new_tokens=T, pad_token_id=PAD, eos_token_id=EOS)
        return {"completion_lengths": [out.shape[1] - ids.shape[1]] * len(rows)}

    return step


@contextlib.contextmanager
def _timed(module, name: str, phases: dict, key: str):
    """Replace `module.name` (a module's function or an instance's method) by a wrapper adding its wall time
    to `phases[key]` (restored on exit)."""
    original = getattr(module, name)

    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            phases[key] += time.perf_counter() - start

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        if isinstance(module, type(sys)):
            setattr(module, name, original)
        else:  # an instance: drop the wrapper, the class's method shows through again
            delattr(module, name)


def fit_step(task, model, batch: dict, opt) -> tuple[float, dict]:
    """One optimizer step of `task` as `tt.train.fit` takes it (fp32, one process, no clipping / logging):
    with a task `prepare` (the rollout made once per step), every update it plans, each one AdamW step over
    its micro-batches; without one, `task.loss` on the drawn batch. Returns (first update's loss, metrics)."""
    prepare = getattr(task, "prepare", None)
    updates, metrics = (prepare(model, [batch], model)[:2] if prepare is not None else ([[batch]], {}))
    losses = []
    for update in updates:
        scored = sum(task.count(b) for b in update)
        total = 0.0
        for b in update:
            loss, more = task.loss(model, b, scored, model)
            loss.backward()
            total += loss.item()
            metrics = {**more, **metrics}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses[0], metrics


def timed_reward(phases: dict):
    """`even_fraction` (same name, same values) adding its wall time to `phases["scoring_s"]`."""
    @functools.wraps(even_fraction)
    def reward(*a, **k):
        start = time.perf_counter()
        try:
            return even_fraction(*a, **k)
        finally:
            phases["scoring_s"] += time.perf_counter() - start

    return reward


def tinytune_grpo(ckpt: str, setup: dict):
    grpo_module = sys.modules["tinytune.rlhf.grpo"]  # the module (the package's `grpo` attribute is the function)
    model = load_tinytune(ckpt)
    cfg = tt.rlhf.GRPOConfig(group_size=setup["group_size"], max_new_tokens=setup["new_tokens"],
                             batch_size=len(setup["prompts"]), lr=LR, loss_type="dapo", beta=0.0,
                             temperature=1.0)
    assert not cfg.stop_token_ids and not model.config.eos_token_ids  # no stop: exactly new_tokens per row
    phases = {}
    task = tt.rlhf.grpo_task([timed_reward(phases)], cfg)
    batch = task.collate([{"prompt_ids": p} for p in setup["prompts"]], PAD, "cpu")
    opt = _optimizer(model)

    def step() -> dict:
        phases.update(generation_s=0.0, scoring_s=0.0)
        start = time.perf_counter()
        with _timed(grpo_module, "generate_rollouts", phases, "generation_s"):
            loss, metrics = fit_step(task, model, batch, opt)
        phases["update_s"] = time.perf_counter() - start - phases["generation_s"] - phases["scoring_s"]
        n = len(setup["prompts"]) * setup["group_size"]
        return {"loss": loss, "phases": dict(phases),
                "completion_length_mean": metrics["completion_length"][0] / n, "reward_mean": metrics["reward"][0] / n}

    return step


def word_tokenizer(vocab: int):
    """Word "w<i>" <-> id i (0 "<pad>", 1 "<eos>"), split on spaces, no special tokens added: TRL's tokenisation of
    " ".join("w<i>") is exactly the ids."""
    import tokenizers
    import transformers
    words = {"<pad>": PAD, "<eos>": EOS} | {f"w{i}": i for i in range(2, vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<eos>")


def trl_trainer(ckpt: str, setup: dict, reward=even_fraction):
    import datasets
    import trl
    rows = len(setup["prompts"]) * setup["group_size"]
    args = trl.GRPOConfig(
        output_dir=str(Path(ckpt) / "trl_grpo"), report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=rows, num_generations=setup["group_size"],
        max_completion_length=setup["new_tokens"], generation_kwargs={"min_new_tokens": setup["new_tokens"]},
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=LR,
        gradient_checkpointing=False, disable_dropout=False, shuffle_dataset=False, use_vllm=False,
        dataloader_num_workers=0, seed=0)
    text = [" ".join(f"w{i}" for i in p) for p in setup["prompts"]]
    data = datasets.Dataset.from_dict({"prompt": text})
    tokenizer = word_tokenizer(setup["vocab"])
    assert [tokenizer(t)["input_ids"] for t in text] == setup["prompts"]
    return trl.GRPOTrainer(model=load_hf(ckpt), reward_funcs=[reward], args=args, train_dataset=data,
                           processing_class=tokenizer)


def trl_grpo(ckpt: str, setup: dict):
    phases = {}
    with contextlib.redirect_stdout(io.StringIO()):  # dataset notices
        trainer = trl_trainer(ckpt, setup, timed_reward(phases))
    trainer.current_gradient_accumulation_steps = 1  # what `Trainer.train` sets before its first step
    batch = next(iter(trainer.get_train_dataloader()))  # 32 rows: each prompt G times, in order
    model = trainer.model
    model.train()
    opt = _optimizer(model)

    def step() -> dict:
        phases.update(generation_s=0.0, scoring_s=0.0)
        start = time.perf_counter()
        with _timed(trainer, "_generate_single_turn", phases, "generation_s"):
            loss = trainer.training_step(model, batch, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        phases["update_s"] = time.perf_counter() - start - phases["generation_s"] - phases["scoring_s"]
        m = trainer._metrics["train"]
        out = {"loss": loss.item(), "completion_length_mean": m["completions/mean_length"][-1],
               "reward_mean": m["reward"][-1], "phases": dict(phases)}
        for k in list(m):  # keep the metrics from piling up over rounds
            m[k].clear()
        return out

    return step


def write_reward_model(ckpt: str, path: str) -> None:
    """The reward model both PPO variants score with: a `RewardModel` on a copy of the checkpoint, LoRA
    adapter "reward" (the policy's hyperparameters, seeded A), B and the head set to seeded N(0, 0.02) (so
    the adapter and the score change the outputs), saved with `tt.rlhf.save_reward_model`."""
    base, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    torch.manual_seed(2)
    rm = tt.rlhf.RewardModel(base, adapter_name="reward")
    tt.lora.apply(rm, tt.lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear"),
                  adapter_name="reward")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if name.endswith("lora_B") or name.startswith("score."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    tt.rlhf.save_reward_model(rm, path)


def weight_bytes(*models) -> int:
    """Bytes of the unique parameter + buffer storages the models hold (shared storage counted once)."""
    seen = {}
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def ppo_one_base(ckpt: str):
    """Every PPO role on one frozen base: adapter "policy" (active), "reward" (the saved reward model, loaded
    beside it), "value" + head (made by `ppo_roles`, copied from the reward model's), reference = adapters off."""
    base, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    tt.load_adapter(base, str(Path(ckpt) / "adapter"), adapter_name="policy")
    rm = tt.rlhf.load_reward_model(base, str(Path(ckpt) / "reward_model"), adapter_name="reward")
    roles = tt.rlhf.ppo_roles(base, rm)
    return roles, (base, rm, roles.value)


def ppo_separate(ckpt: str):
    """What TRL+PEFT / OpenRLHF hold: four copies of the base weights. policy = copy 1 + the LoRA adapter
    ("default"); reference = copy 2, frozen; value = `ValueModel` on copy 3 with its own LoRA (the reward
    model's adapter) and head (the reward model's), both trainable; reward = the saved reward model on copy 4."""
    policy = load_tinytune(ckpt)
    reference, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    reference.requires_grad_(False).eval()
    body, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    value = tt.rlhf.ValueModel.from_reward_model(tt.rlhf.load_reward_model(body, str(Path(ckpt) / "reward_model")))
    value.requires_grad_(False)
    for name, p in value.named_parameters():  # the value adapter and head train, its base stays frozen
        p.requires_grad_("lora_" in name or name.startswith("score."))
    rm = tt.rlhf.load_reward_model(tt.load_pretrained(ckpt, dtype=torch.float32)[0], str(Path(ckpt) / "reward_model"))
    roles = tt.rlhf.ppo_roles(policy, rm, value=value, reference=reference)
    return roles, (policy, reference, value, rm)


def ppo_step(ckpt: str, setup: dict, build):
    """One PPO step as `fit` takes it (see `fit_step`) on `PPOModels(roles)`, timed in three phases."""
    ppo_module = sys.modules["tinytune.rlhf.ppo"]  # the module (the package's `ppo` attribute is the function)
    roles, held = build(ckpt)
    prompts = setup["ppo_prompts"]
    cfg = tt.rlhf.PPOConfig(batch_size=len(prompts), max_new_tokens=setup["new_tokens"], lr=LR, ppo_epochs=1,
                            num_mini_batches=1, temperature=1.0)
    assert not cfg.stop_token_ids and not roles.policy.config.eos_token_ids  # no stop: exactly new_tokens per row
    models = tt.rlhf.PPOModels(roles).train()
    task = tt.rlhf.ppo_task(roles, cfg)
    batch = task.collate([{"prompt_ids": p} for p in prompts], PAD, "cpu")
    opt = _optimizer(models)
    held_bytes = weight_bytes(*held)
    phases = {}

    def step() -> dict:
        phases.update(generation_s=0.0, scoring_s=0.0)
        start = time.perf_counter()
        with (_timed(ppo_module, "generate_rollouts", phases, "generation_s"),
              _timed(ppo_module, "normalized_scores", phases, "scoring_s")):
            loss, metrics = fit_step(task, models, batch, opt)
        phases["update_s"] = time.perf_counter() - start - phases["generation_s"] - phases["scoring_s"]
        n = len(prompts)
        return {"loss": loss, "phases": dict(phases), "weight_bytes": held_bytes,
                "completion_length_mean": metrics["completion_length"][0] / n, "reward_mean": metrics["score"][0] / n}

    return step


def tinytune_ppo(ckpt: str, setup: dict):
    return ppo_step(ckpt, setup, ppo_one_base)


def separate_ppo(ckpt: str, setup: dict):
    return ppo_step(ckpt, setup, ppo_separate)


BUILDERS = {("tinytune", "rollout"): tinytune_rollout, ("hf", "rollout"): hf_rollout,
            ("tinytune", "grpo"): tinytune_grpo, ("trl", "grpo"): trl_grpo,
            ("tinytune", "ppo"): tinytune_ppo, ("separate", "ppo"): separate_ppo}


def variants(which: list[str]) -> list[tuple[str, str]]:
    return [v for part in which for v in PARTS[part]]


def load_setup(ckpt: str) -> dict:
    return json.loads((Path(ckpt) / "setup.json").read_text())


def worker(args) -> None:
    """In a fresh process: peak memory of 3 calls of one variant, as JSON on stdout."""
    lib, part = args.worker.split(",")
    print(json.dumps(peak_of_three(BUILDERS[(lib, part)](args.ckpt, load_setup(args.ckpt)))))


def measure_memories(args, ckpt: str, vs: list) -> dict:
    runs = {v: [] for v in vs}
    for _ in range(args.memory_runs):
        for v in vs:
            cmd = [sys.executable, __file__, "--worker", ",".join(v), "--ckpt", ckpt]
            done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads))
            if done.returncode:
                raise RuntimeError(f"memory worker {v} failed:\n{done.stderr[-4000:]}")
            runs[v].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {v: median_run(runs[v]) for v in vs}


def measure_speed(args, ckpt: str, setup: dict, vs: list) -> tuple[dict, dict]:
    """(call times per variant, the outputs of every timed call per variant), rounds interleaved, order rotating."""
    steps = {v: BUILDERS[v](ckpt, setup) for v in vs}
    times, outputs = {v: [] for v in vs}, {v: [] for v in vs}
    for r in range(args.warmup + args.rounds):
        for v in vs[r % len(vs):] + vs[:r % len(vs)]:
            start = time.perf_counter()
            out = steps[v]()
            if r >= args.warmup:
                times[v].append(time.perf_counter() - start)
                outputs[v].append(out)
    return times, outputs


def logit_parity(ckpt: str, setup: dict) -> float:
    """max |logits difference| of tinytune's and transformers+peft's loaded models (eval) on the prompts."""
    ids = torch.tensor(setup["prompts"])
    with torch.no_grad():
        ours = load_tinytune(ckpt).eval()(ids)
        theirs = load_hf(ckpt).eval()(input_ids=ids).logits
    return float((ours - theirs).abs().max())


def ppo_parity(ckpt: str, setup: dict) -> dict:
    """|difference| of the first step's loss and mean score of the two PPO variants, each freshly built and run
    from the same seed (the same sampling, dropout and mini-batch draws): 0 up to rounding when both compute
    the same thing."""
    outs = []
    for v in PARTS["ppo"]:
        step = BUILDERS[v](ckpt, setup)
        torch.manual_seed(0)
        outs.append(step())
    return {k: abs(outs[0][k] - outs[1][k]) for k in ("loss", "reward_mean")}


def report(args, setup: dict, times: dict, outputs: dict, memory: dict) -> dict:
    n, P, T = len(setup["prompts"]) * setup["group_size"], setup["prompt_len"], setup["new_tokens"]
    tokens = {"rollout": n * T, "grpo": n * (P + T), "ppo": len(setup["ppo_prompts"]) * (P + T)}
    rows = []
    for part in args.which:
        for lib, _ in PARTS[part]:
            v = (lib, part)
            med = statistics.median(times[v])
            row = {"variant": f"{LABEL[lib]} {LABEL[part]}", "lib": lib, "part": part, "median_s": med,
                   "tokens": tokens[part], "tokens_per_s": tokens[part] / med, "call_s": times[v]}
            if memory:
                row |= {k: memory[v][k] for k in ("peak_bytes", "peak_bytes_runs", "process_hwm_bytes")}
            outs = outputs[v]
            if part == "rollout":
                lengths = {x for o in outs for x in o["completion_lengths"]}
                row["completion_lengths_seen"] = sorted(lengths)
            else:
                row["first_loss"] = outs[0]["loss"]
                row["completion_length_mean"] = statistics.mean(o["completion_length_mean"] for o in outs)
                row["reward_mean"] = statistics.mean(o["reward_mean"] for o in outs)
                if "phases" in outs[0]:
                    row["phases_median_s"] = {k: statistics.median(o["phases"][k] for o in outs)
                                              for k in outs[0]["phases"]}
                if "weight_bytes" in outs[0]:
                    row["weight_bytes"] = outs[0]["weight_bytes"]
                    if memory:
                        row["held_bytes"] = row["weight_bytes"] + row["peak_bytes"]
            rows.append(row)
    by = {(r["lib"], r["part"]): r for r in rows}
    for part in args.which:
        ours, peer = by[PARTS[part][0]], by[PARTS[part][1]]
        ours["speed_ratio"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        if "speed" in TARGETS[part]:
            ours["speed_target_met"] = ours["speed_ratio"] >= TARGETS[part]["speed"]
        if "weight_bytes" in ours:
            ours["weight_ratio"] = ours["weight_bytes"] / peer["weight_bytes"]
        if memory:
            ours["memory_ratio"] = ours["peak_bytes"] / peer["peak_bytes"]
            ours["process_hwm_ratio"] = ours["process_hwm_bytes"] / peer["process_hwm_bytes"]
            checked = "memory_ratio"
            if "held_bytes" in ours:  # ppo: the weight copies are the point, and peak_bytes excludes them
                ours["held_memory_ratio"] = ours["held_bytes"] / peer["held_bytes"]
                checked = "held_memory_ratio"
            if "memory" in TARGETS[part]:
                ours["memory_target_met"] = ours[checked] <= TARGETS[part]["memory"]
    info = {"preset": args.preset, "prompts": len(setup["prompts"]), "prompt_len": P, "group_size": setup["group_size"],
            "rows": n, "new_tokens": T, "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT, "lr": LR,
            "lora_targets": "all-linear except the head", "rounds": args.rounds, "warmup": args.warmup,
            "memory_runs": args.memory_runs, "parts": args.which,
            "ppo_prompts": len(setup["ppo_prompts"]), "ppo_epochs": 1, "ppo_num_mini_batches": 1,
            "tokens": {"rollout": "rows * new_tokens (generated)", "grpo": "rows * (prompt_len + new_tokens)",
                       "ppo": "ppo_prompts * (prompt_len + new_tokens) (one completion per prompt)"},
            "ppo_variants": {"tinytune": "one base: adapters policy / value / reward, reference = adapters off",
                             "separate": "four base copies: policy + LoRA, frozen reference, value + LoRA, "
                                         "reward + LoRA (what TRL+PEFT / OpenRLHF hold)"},
            "ppo_memory": "weight_bytes: unique parameter + buffer storage of all roles; held_bytes = "
                          "weight_bytes + peak_bytes (the step's peak above the loaded models); the 0.4x target "
                          "is checked on held_bytes",
            "stop": "tinytune: no stop ids; transformers/TRL: min_new_tokens = new_tokens (EOS id 1 masked)",
            "reward": "grpo: fraction of even completion ids (same function both sides); ppo: the saved "
                      "reward model (same adapter and head both sides)"}
    return {"setup": info, "targets": TARGETS, "rows": rows}


def print_rows(rows: list[dict]) -> None:
    print(f"{'variant':<32} {'tokens/s':>9} {'call s':>7} {'peak MiB':>9} {'speed x':>8} {'memory x':>9}")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:>9,.0f}" if "peak_bytes" in r else f"{'-':>9}"
        sx = f"{r['speed_ratio']:>8.2f}" if "speed_ratio" in r else f"{'':>8}"
        mx = f"{r['memory_ratio']:>9.2f}" if "memory_ratio" in r else f"{'':>9}"
        print(f"{r['variant']:<32} {r['tokens_per_s']:>9,.0f} {r['median_s']:>7.3f} {peak} {sx} {mx}")
        if "weight_bytes" in r:
            held = f", held {r['held_bytes'] / 2**20:,.0f} MiB" if "held_bytes" in r else ""
            ratios = "".join(f", {k.split('_')[0]} {r[k]:.2f}x" for k in ("weight_ratio", "held_memory_ratio")
                             if k in r)
            print(f"    weights {r['weight_bytes'] / 2**20:,.0f} MiB{held}{ratios}")
        if "phases_median_s" in r:
            print("    split: " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in r["phases_median_s"].items()))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "--rounds", "timed rounds (default 5; --quick 2)")
    p.add_argument("--which", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to measure")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default 2: first calls run up to 10x slower; --quick 1)")
    p.add_argument("--memory-runs", type=int, default=None,
                   help="fresh processes per variant for peak memory, median (default 3; --quick 1; 0: none)")
    for flag, kind in (("--preset", str), ("--prompts", int), ("--prompt-len", int), ("--new-tokens", int),
                       ("--group-size", int), ("--ppo-prompts", int)):
        p.add_argument(flag, type=kind, default=None, help="override the setup (default: the documented one)")
    for flag in ("--worker", "--ckpt"):  # internal: the memory subprocess
        p.add_argument(flag, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = output_path("rl_step_cpu", args.out, args.quick)
    if args.replot:
        return replot(out, chart)
    args.threads = setup_threads(args.threads)
    if args.worker:
        return worker(args)
    full = dict(preset="llama-30m", prompts=4, prompt_len=32, new_tokens=64, group_size=8, ppo_prompts=8, rounds=5,
                warmup=2, memory_runs=3)
    quick = dict(preset="llama-tiny", prompts=2, prompt_len=8, new_tokens=8, group_size=8, ppo_prompts=2, rounds=2,
                 warmup=1, memory_runs=1)
    fill_defaults(args, full, quick)
    info = machine_info(args.threads, ("transformers", "peft", "trl", "datasets"))
    with tempfile.TemporaryDirectory() as ckpt:
        vocab = write_checkpoint(args.preset, ckpt)
        write_adapter(ckpt, str(Path(ckpt) / "adapter"))
        write_reward_model(ckpt, str(Path(ckpt) / "reward_model"))
        setup = {"prompts": random_prompts(args.prompts, args.prompt_len, vocab), "prompt_len": args.prompt_len,
                 "ppo_prompts": random_prompts(args.ppo_prompts, args.prompt_len, vocab, seed=1),
                 "new_tokens": args.new_tokens, "group_size": args.group_size, "vocab": vocab}
        (Path(ckpt) / "setup.json").write_text(json.dumps(setup))
        vs = variants(args.which)
        memory = measure_memories(args, ckpt, vs) if args.memory_runs else {}
        times, outputs = measure_speed(args, ckpt, setup, vs)
        info["logit_max_abs_diff"] = logit_parity(ckpt, setup)
        if "ppo" in args.which:
            info["ppo_first_step_abs_diff"] = ppo_parity(ckpt, setup)
    info["load_avg_after"] = os.getloadavg()
    result = {"machine": info, **report(args, setup, times, outputs, memory)}
    print_rows(result["rows"])
    print(f"parity: max |logit diff| tinytune vs transformers+peft = {info['logit_max_abs_diff']:.2e}")
    if "ppo_first_step_abs_diff" in info:
        d = info["ppo_first_step_abs_diff"]
        print(f"parity: PPO one base vs separate models, same seed: |loss diff| {d['loss']:.2e}, "
              f"|score diff| {d['reward_mean']:.2e}")
    write_results(out, result, chart)


if __name__ == "__main__":
    main()
