"""PPO's value model: a decoder body and a scalar head `score` read at every token, `V(prefix)` (B, T).

    value = tt.rlhf.ValueModel.from_reward_model(rm)        # head initialised from the reward model's
    values = value(input_ids, attention_mask)               # (B, T) float32

The head is initialised from a reward model's `score` when there is one (TRL's and torchtune's PPO recipes:
the value of a finished completion starts at its reward), or at zero. Like `RewardModel` it declares
`peft_modules_to_save = ("score",)`, so any PEFT method keeps the head trainable and saves it with the
adapter. The body may be shared with the policy (one frozen base: the value model is then the base with
its own adapter active, see docs/rlhf.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.heads import _DecoderHead, hidden_states
from ..models.transformer import CausalLM
from .reward_model import RewardModel


class ValueModel(_DecoderHead):
    """A per-token value estimate on a `CausalLM`'s body.

    Args:
        backbone: a `CausalLM`; its body is shared (not copied), its `lm_head` not used.
        head: an `nn.Linear(hidden_size, 1)`, or None for a zero-initialised bias-free one.
        adapter_name: the LoRA adapter of `backbone` this value model computes with when the backbone is shared
            with the policy (PPO switches to it); None: the backbone is used as it is.

    Forward:
        input_ids (B, T), attention_mask (B, T) or None -> values (B, T) in float32: column t is the value
        of the prefix up to and including token t.

    Raises:
        TypeError: `backbone` is not a `CausalLM`, `head` not an `nn.Linear`.
        ValueError: a head whose shape is not (1, hidden_size).
    """

    peft_task_type = "TOKEN_CLS"
    peft_modules_to_save = ("score",)

    def __init__(self, backbone: CausalLM, head: nn.Linear | None = None, adapter_name: str | None = None):
        super().__init__(backbone, "ValueModel")
        self.adapter_name = adapter_name
        d = self.config.hidden_size
        if head is None:
            ref = backbone.model.embed_tokens.weight
            head = nn.Linear(d, 1, bias=False, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)
        elif not isinstance(head, nn.Linear):
            raise TypeError(f"ValueModel: head must be an nn.Linear(hidden_size, 1), got {type(head).__name__}")
        elif (head.in_features, head.out_features) != (d, 1):
            raise ValueError(f"ValueModel: head must map hidden_size={d} to 1 value, got "
                             f"nn.Linear({head.in_features}, {head.out_features})")
        self.score = head

    @classmethod
    def from_reward_model(cls, rm: RewardModel, backbone: CausalLM | None = None) -> "ValueModel":
        """A value model whose head is a copy of `rm`'s score head (its own parameters: training the value
        model never changes the reward model), on `backbone` (default: `rm`'s decoder, shared)."""
        if not isinstance(rm, RewardModel):
            raise TypeError(f"ValueModel.from_reward_model expects a RewardModel, got {type(rm).__name__}")
        head = nn.Linear(rm.score.in_features, 1, bias=rm.score.bias is not None,
                         device=rm.score.weight.device, dtype=rm.score.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(rm.score.weight)
            if head.bias is not None:
                head.bias.copy_(rm.score.bias)
        return cls(backbone if backbone is not None else rm.decoder, head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_methods()
        return self.score(hidden_states(self.decoder, input_ids, attention_mask)).squeeze(-1).float()  # (B, T)
