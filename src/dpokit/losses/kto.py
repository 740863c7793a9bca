"""KTO: unpaired examples labelled only desirable or undesirable (Ethayarajh et al. 2024, arXiv 2402.01306).

Not in the LOSSES table: its batch is single completions with a bool label, not pairs,
and it needs log-probs of mismatched (prompt, completion) pairs for its KL baseline.
"""

from __future__ import annotations

from typing import Optional

import torch


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_policy_logps: Optional[torch.Tensor],
    kl_ref_logps: Optional[torch.Tensor],
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO loss (Ethayarajh et al. 2024, Eq. 7), TRL KTOTrainer semantics.

    policy_logps, ref_logps: (B,) log pi(y|x), summed over completion tokens.
    labels: (B,) bool, True = desirable.
    kl_policy_logps, kl_ref_logps: (B,) summed log-probs of mismatched pairs (x_i, y_j), j != i
      (TRL pairs each prompt with the previous example's completion); None for z0 = 0.
    r = log pi(y|x) - log ref(y|x)
    z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))), detached: the KL(pi || ref) baseline,
      estimated on mismatched pairs so it does not track the examples' own rewards.
    loss = desirable_weight * (1 - sigma(beta (r - z0)))     if desirable
           undesirable_weight * (1 - sigma(beta (z0 - r)))   otherwise
    Returns (losses (B,), rewards (B,) = beta * r detached, kl () = z0), in the input order
    (TRL returns desirable examples first); the batch loss is losses.mean(), as TRL's.
    Under data parallelism TRL averages z0 over processes before the clamp: pass the
    all-gathered kl_* tensors to reproduce that.
    """
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        raise ValueError("kto_loss needs both kl_policy_logps and kl_ref_logps, or neither")
    if kl_policy_logps is None:
        kl = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    else:
        kl = (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)  # () z0
    log_ratio = policy_logps - ref_logps  # (B,)
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio)))
    return torch.where(labels, desirable, undesirable), (beta * log_ratio).detach(), kl
