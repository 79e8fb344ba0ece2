"""Preference examples (`tinytune.data.load_preferences`) to the tensors a reward model trains on."""
from __future__ import annotations

import torch

from ..data.collate import pad_batch
from ..data.preferences import preference_sequences


def preference_batch(examples, pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor | None]:
    """One padded batch of every completion of `examples`, each scored once, and the pairs as indices.

    A batch of E examples with K_e completions and P_e pairs each has N = sum K_e rows (prompt + completion)
    and P = sum P_e pairs: `r = rm(input_ids, attention_mask)` then `r[chosen]`, `r[rejected]` are the
    pairs' scores, for `reward_loss(..., margin)` or `grouped_reward_loss(..., group)`.

    Args:
        examples: preference examples (`prompt_ids`, `completion_ids`, `chosen`, `rejected`, `margin`, `group`).
        pad_id: the id of padded positions (never read: the mask marks them; it may equal EOS).
        padding_side: "right" or "left".

    Returns:
        {"input_ids", "attention_mask": (N, T) long; "labels": (N, T) long, the completion's ids on its
        tokens and -100 on the prompt and padding (what DPO scores); "chosen", "rejected": (P,) long row
        indices; "group": (P,) long, each pair's example `group`; "margin": (P,) float (a pair without one
        gets 0.0), or None when no pair has a margin}.

    Raises:
        ValueError: no examples, an example without pairs or with a pair index outside its completions (named),
            and what `pad_batch` refuses (pad_id None, a bad padding_side).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("preference_batch got no examples")
    rows, chosen, rejected, group, margin = [], [], [], [], []
    for e, example in enumerate(examples):
        k, offset = len(example["completion_ids"]), len(rows)
        pairs = list(zip(example["chosen"], example["rejected"]))
        bad = [p for p in pairs if not all(isinstance(i, int) and 0 <= i < k for i in p)]
        if not pairs or bad or len(example["margin"]) != len(pairs):
            raise ValueError(f"preference_batch: example {e} (group {example.get('group')!r}) has pairs {pairs[:4]} "
                             f"and {len(example['margin'])} margins for {k} completions; expected >= 1 pair of "
                             f"indices in [0, {k}) and one margin per pair")
        rows += preference_sequences(example)  # input_ids, and labels: -100 on the prompt
        chosen += [offset + i for i, _ in pairs]
        rejected += [offset + j for _, j in pairs]
        group += [example["group"]] * len(pairs)
        margin += example["margin"]
    batch = pad_batch(rows, pad_id, padding_side=padding_side)
    has_margin = any(m is not None for m in margin)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"],
            "chosen": torch.tensor(chosen, dtype=torch.long), "rejected": torch.tensor(rejected, dtype=torch.long),
            "group": torch.tensor(group, dtype=torch.long),
            "margin": torch.tensor([0.0 if m is None else float(m) for m in margin]) if has_margin else None}
