"""Direct Preference Optimization (Rafailov et al., 2023) on LoRA adapters.

The reference policy is the base model itself: the same weights with every adapter switched
off (`adapters_disabled`), so no second copy of the model is held. For a pair (chosen c,
rejected r) of answers to one prompt, with log pi(y|x) summed over the answer tokens only:

    loss = -log sigmoid(beta * ((log pi(c) - log pi(r)) - (log ref(c) - log ref(r))))

``beta * (...)`` is the *reward margin*; the pair is "won" (accuracy) when it is positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from souverain.finetune.data import PreferencePair, batch_tensors
from souverain.finetune.lora import adapters_disabled
from souverain.models.attention import PrefillAttention
from souverain.models.transformer import Transformer


def sequence_logps(model: Transformer, pairs: list[PreferencePair]) -> torch.Tensor:
    """(n_pairs, 2) log-probabilities of the chosen / rejected answers, answer tokens only.
    All 2n sequences go through one flat forward (block-diagonal attention)."""
    samples = [s for p in pairs for s in (p.chosen, p.rejected)]
    tokens, positions, targets, mask, lens = batch_tensors(samples)
    seq_id = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    rows = mask.nonzero().squeeze(1)  # logits only where the answer is predicted
    logits = model(tokens, positions, PrefillAttention(lens), logits_indices=rows)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[rows, None]).squeeze(1)
    sums = torch.zeros(len(lens), dtype=logp.dtype).index_add(0, seq_id[rows], logp)
    return sums.view(-1, 2)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and reward margins from (n, 2) chosen/rejected log-probs."""
    margin = beta * ((policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]))
    return -F.logsigmoid(margin), margin.detach()


def pair_losses(
    model: Transformer, pairs: list[PreferencePair], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses (with grad through the adapters) and margins of a microbatch of pairs."""
    with torch.no_grad(), adapters_disabled(model):
        reference = sequence_logps(model, pairs)
    policy = sequence_logps(model, pairs)
    return dpo_loss(policy, reference, beta)
